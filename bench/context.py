"""What the entries of one ``make bench`` run share: a work directory, the data they train on,
its tokenizer, and a helper that times the project's own training loop step by step.

The data is the micro test pipeline's (``tests/conf/micro.yaml``) run through the real data prep
stage, restricted to two pre-training sets:

- ``mixed``: the micro ``pretrain_broad`` mixture (captions, counting and math over images, text),
- ``text``: text-only families, for FLOP accounting where only decoder FLOPs are counted,
- ``rl``: the micro RL prompt set (verifiable records), for rollout, RL and PaCoRe timings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from bench.machine import CpuSnapshot

ROOT = Path(__file__).resolve().parent.parent
MICRO = ROOT / "tests" / "conf" / "micro.yaml"
TEXT_FAMILIES = {"text": 200, "text_math": 200}


class Context:
    """Lazily built shared inputs; ``quick`` shrinks every entry's repetitions (development only)."""

    def __init__(self, workdir: Path, *, quick: bool = False) -> None:
        self.workdir = Path(workdir)
        self.quick = quick
        self._packed: dict[tuple[str, int, int], Path] = {}

    def rounds(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    @cached_property
    def pipeline(self) -> Any:
        from step3vl import config
        from step3vl.config import DatasetSpec, FamilySpec, PipelineConfig

        cfg = config.load(PipelineConfig, MICRO)
        sets = {
            "mixed": cfg.data.sets["pretrain_broad"],
            "text": DatasetSpec(purpose="pretrain", families={f: FamilySpec(n=n) for f, n in TEXT_FAMILIES.items()}),
            "rl": cfg.data.sets["rl"],
        }
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sets=sets))

    @cached_property
    def data(self) -> Any:
        """The data prep stage's outputs (raw JSONL, tokenizer, packed shards at the micro seq_len)."""
        from step3vl.stages import data

        return data.run(self.pipeline, self.workdir / "data", progress=False)

    @cached_property
    def tokenizer(self) -> Any:
        from step3vl.model.tokenizer import load_tokenizer

        return load_tokenizer(self.data.tokenizer_dir)

    @cached_property
    def processor(self) -> Any:
        from step3vl.model.processor import ImageProcessor

        return ImageProcessor(self.pipeline.model.vision)

    def prompts(self, n: int, *, families: set[str] | None = None) -> tuple[list[dict[str, Any]], list[Any]]:
        """The first ``n`` verifiable records of the ``rl`` set (of ``families``) and their prompts."""
        from step3vl.eval.suite import load_records, to_prompt

        raw = self.data.raw("rl")
        recs = load_records(raw, families=families)[:n]
        if len(recs) < n:
            raise ValueError(f"the rl set has {len(recs)} records of {families}, {n} wanted")
        return recs, [to_prompt(r, raw) for r in recs]

    def packed(self, name: str, seq_len: int, open_rows: int | None = None) -> Path:
        """``name`` packed with loss on every text token at ``seq_len`` (data prep's own packer, with
        ``open_rows`` rows open for best-fit; default: the pipeline's ``data.pack_open_rows``)."""
        rows = self.pipeline.data.pack_open_rows if open_rows is None else open_rows
        if seq_len == self.pipeline.pretrain.seq_len and rows == self.pipeline.data.pack_open_rows:
            return self.data.packed(name)
        key = (name, seq_len, rows)
        if key not in self._packed:
            from step3vl.data.pack import pack_dataset

            out = self.workdir / "packed" / f"{name}-{seq_len}-open{rows}"
            pack_dataset(self.data.raw(name), str(out), tokenizer=self.tokenizer, processor=self.processor,
                         seq_len=seq_len, loss_on="all", seed=0, open_rows=rows, progress=False)
            self._packed[key] = out
        return self._packed[key]


@dataclass
class StepTimes:
    """Per optimizer step: wall seconds (time spent in ``between`` excluded), real tokens, token
    slots computed, and the CPU share other processes took meanwhile."""

    seconds: list[float]
    tokens: list[int]
    slots: list[int]
    others: list[float]

    def tokens_per_s(self, skip: int) -> float:
        """Throughput over steps ``skip+1 …`` (the first ``skip`` are warm-up)."""
        return sum(self.tokens[skip:]) / sum(self.seconds[skip:])

    def others_share(self, skip: int) -> float:
        """CPU share other processes took over steps ``skip+1 …`` (time-weighted)."""
        return sum(o * t for o, t in zip(self.others[skip:], self.seconds[skip:])) / sum(self.seconds[skip:])

    def padding(self, skip: int) -> float:
        """Fraction of the computed token slots that were padding, over steps ``skip+1 …``."""
        return 1 - sum(self.tokens[skip:]) / sum(self.slots[skip:])


def project_steps(ctx: Context, model: Any, data_path: Path, *, seq_len: int, batch_size: int, steps: int,
                  precision: str = "fp32", lr: float = 1e-3, micro_batch_size: int = 0,
                  between: Callable[[int], None] | None = None) -> StepTimes:
    """Run ``steps`` optimizer steps of the project's loop (``step3vl.train.loop.train``) on ``model``.

    The loop is called as the training stage calls it, one phase at a constant LR. ``between(step)``
    runs after each step, outside the timed span (used to interleave a reference measurement).
    The first step's time includes the loop's start-up: callers discard it as warm-up.
    """
    from step3vl.config import PhaseConfig, TrainConfig
    from step3vl.data.pack import PackedDataset
    from step3vl.train.loop import train

    class Counting(PackedDataset):
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            self.tokens: list[int] = []
            self.slots: list[int] = []

        def batch(self, refs):  # type: ignore[no-untyped-def]
            b = super().batch(refs)
            self.tokens.append(b.n_tokens)
            self.slots.append(b.input_ids.numel())
            return b

    ds = Counting(data_path, ctx.processor)
    # one step more than run, stopped early: the loop's end-of-stage checkpoint is never written
    tcfg = TrainConfig(phases=(PhaseConfig(data="bench", steps=steps + 1, lr_start=lr, lr_end=lr),),
                       seq_len=seq_len, batch_size=batch_size, micro_batch_size=micro_batch_size,
                       precision=precision, checkpoint_every=10**9, log_every=1)
    marks: list[tuple[CpuSnapshot, CpuSnapshot]] = []

    def on_metrics(_m: dict[str, float], step: int) -> None:
        t_in = CpuSnapshot.take()
        if between is not None:
            between(step)
        marks.append((t_in, CpuSnapshot.take()))

    t0 = CpuSnapshot.take()
    train(model, tcfg, [ds], ckpt_root=str(ctx.workdir / "ckpt-unused"), seed=0,
          save_extra=lambda: {"config": {}}, on_metrics=on_metrics, progress=False, stop_after_step=steps)
    per_step = batch_size // (micro_batch_size or batch_size)
    starts = [t0] + [out for _, out in marks[:-1]]

    def per(xs: list[int]) -> list[int]:
        return [sum(xs[i * per_step:(i + 1) * per_step]) for i in range(len(marks))]

    return StepTimes(seconds=[t_in.wall - s.wall for (t_in, _), s in zip(marks, starts)], tokens=per(ds.tokens),
                     slots=per(ds.slots), others=[t_in.others_share_since(s) for (t_in, _), s in zip(marks, starts)])
