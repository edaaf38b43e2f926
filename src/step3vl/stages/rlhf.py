"""RLHF stage: train the GenRM judge, then RL on its preferences plus behaviour regularisation.

1. GenRM: preference pairs (data prep's ``preference`` set) become judge conversations in both
   presentation orders (:func:`step3vl.rl.genrm.genrm_records`), written as a dataset, packed at
   2x the SFT seq_len (the judge reads a prompt and two responses) and trained from the starting
   model by SFT on the one training loop. Its pairwise accuracy is measured on held-out pairs
   (the preference family's ``eval`` split, with any prompt seen in training removed).
2. RL: ``run_rl("rlhf", ...)`` with :class:`step3vl.rl.genrm.RLHFReward`. The reference each
   sample is judged against is the frozen starting policy's greedy answer to the same prompt.
3. Measurement on the held-out eval set: the GenRM win-rate of the RLHF policy against the
   starting model (both orders; T=1, the recipe's evaluation setting, and greedy) and the
   verifiable accuracy of both (greedy).

Layout under the stage's output URI::

    genrm/checkpoints/ …  genrm/model/    the judge (resumable like any training)
    genrm/data/raw/ …     genrm/data/packed/   its dataset (local output URIs only)
    checkpoints/ …        model/          the RLHF policy (see ``step3vl.stages.rl``)
    rl_curves.png, metrics.json
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step3vl import tracking
from step3vl.config import PhaseConfig, PipelineConfig, TrainConfig
from step3vl.rl.genrm import GenRMSettings

log = logging.getLogger(__name__)

GENRM_SET = "genrm"


@dataclass
class RLHFOutputs:
    model_uri: str
    genrm_uri: str
    rl: Any  # RLStageOutputs
    metrics: dict[str, float] = field(default_factory=dict)


def preference_set(cfg: PipelineConfig) -> str:
    """The name of the data prep set holding preference pairs (exactly one is expected)."""
    names = [n for n, s in cfg.data.sets.items() if s.purpose == "preference"]
    if len(names) != 1:
        raise ValueError(f"RLHF needs exactly one data set with purpose 'preference', found {names or 'none'}")
    return names[0]


def genrm_train_config(cfg: PipelineConfig, s: GenRMSettings) -> TrainConfig:
    """The GenRM's SFT: assistant-token loss at 2x the SFT context, on the one training loop."""
    return TrainConfig(
        phases=(PhaseConfig(data=GENRM_SET, steps=s.steps, lr_start=s.lr_start, lr_end=s.lr_end),),
        loss_on="assistant", seq_len=2 * cfg.sft.seq_len, batch_size=s.batch_size, warmup_steps=s.warmup_steps,
        weight_decay=cfg.sft.weight_decay, precision=cfg.sft.precision, grad_clip=cfg.sft.grad_clip,
        checkpoint_every=max(1, s.steps // 2), log_every=10,
    )


def heldout_pairs(cfg: PipelineConfig, data_dir: Path, n: int) -> list[dict[str, Any]]:
    """``n`` preference pairs of the eval split whose prompts never occur in the training pairs."""
    from step3vl.data import families
    from step3vl.data.gate import content_hash, dataset_hashes
    from step3vl.stages.data import set_seed

    name = preference_set(cfg)
    spec = cfg.data.sets[name]
    seen = dataset_hashes(data_dir / "raw" / name)
    fams = list(spec.families.items()) or [("preference", None)]
    out: list[dict[str, Any]] = []
    for k, (fam, fs) in enumerate(fams):
        want = n * (k + 1) // len(fams) - len(out)
        diff = list(fs.difficulty) if fs is not None else [1]
        start = 0
        while want > 0:
            batch = families.generate(fam, max(want, 32), set_seed(cfg.data, "genrm_heldout"), diff, "eval",
                                      cfg.data.image_size, start=start)
            start += len(batch)
            fresh = [r for r in batch if content_hash(r) not in seen][:want]
            out.extend(fresh)
            want -= len(fresh)
            if start > 50 * n + 1000:
                raise RuntimeError(f"cannot find {n} held-out preference pairs unseen in training")
    return out


def build_genrm_data(cfg: PipelineConfig, data_dir: Path, work: Path, tokenizer: Any, processor: Any,
                     s: GenRMSettings, progress: bool) -> tuple[Path, dict[str, Any]]:
    """Judge records from the preference set → ``work/raw`` (dataset format) → ``work/packed``."""
    from step3vl.data.io import iter_records, write_dataset
    from step3vl.data.pack import INDEX_FILE, pack_dataset
    from step3vl.rl.genrm import genrm_records
    from step3vl.stages.data import set_seed
    from step3vl.storage import StorageError, verify_dir

    raw, packed = work / "raw", work / "packed"
    try:
        verify_dir(packed)
        return packed, json.loads((packed / INDEX_FILE).read_text())
    except (StorageError, FileNotFoundError):
        pass  # not built yet (or a partial build): rebuild, it is deterministic
    for d in (raw, packed):
        if d.exists():
            shutil.rmtree(d)
    pref_dir = data_dir / "raw" / preference_set(cfg)
    pairs = (r.record for r in iter_records(pref_dir) if r.record is not None)
    write_dataset(raw, genrm_records(pairs, pref_dir, tokenizer, s.max_response_tokens),
                  shard_size=cfg.data.shard_size)
    index = pack_dataset(raw, str(packed), tokenizer=tokenizer, processor=processor, seq_len=2 * cfg.sft.seq_len,
                         loss_on="assistant", seed=set_seed(cfg.data, GENRM_SET), open_rows=cfg.data.pack_open_rows,
                         progress=progress, extra_meta={"source": GENRM_SET})
    return packed, index


def train_genrm(cfg: PipelineConfig, data_dir: Path, init_uri: str, genrm_uri: str, work: Path | None,
                s: GenRMSettings, *, progress: bool = True) -> dict[str, float]:
    """Train the judge from ``init_uri`` into ``genrm_uri/model``; resumes from ``genrm_uri/checkpoints``.

    Its dataset is built under ``work`` (kept, and reused on resume) or, if None, in a temporary
    directory removed afterwards (remote output URIs: the packed shards must be local files).
    """
    from step3vl.checkpoint import save_checkpoint
    from step3vl.data.pack import PackedDataset
    from step3vl.model.loading import checkpoint_config, load_model
    from step3vl.storage import StorageError, join_uri, verify_published
    from step3vl.train.loop import seed_everything, train

    model_uri = join_uri(genrm_uri, "model")
    try:
        meta = verify_published(model_uri).get("meta", {})
        log.warning("GenRM %s already trained; reusing it", model_uri)
        return {"genrm_steps": float(meta.get("step", s.steps))}
    except StorageError:
        pass
    if work is None:
        with tempfile.TemporaryDirectory(prefix="step3vl-genrm-") as tmp:
            return train_genrm(cfg, data_dir, init_uri, genrm_uri, Path(tmp), s, progress=progress)
    seed_everything(cfg.seed)
    lm = load_model(init_uri)
    packed, index = build_genrm_data(cfg, data_dir, work, lm.tokenizer, lm.processor, s, progress)
    tcfg = genrm_train_config(cfg, s)
    tok_dir = str(lm.tokenizer_dir)
    ckpt_config = checkpoint_config(lm.cfg, lm.tokenizer, stage="genrm")

    def on_metrics(m: dict[str, float], step: int) -> None:
        tracking.log_metrics({f"genrm/{k}": v for k, v in m.items()}, step=step)

    res = train(lm.model, tcfg, [PackedDataset(packed, lm.processor)], ckpt_root=join_uri(genrm_uri, "checkpoints"),
                seed=cfg.seed, save_extra=lambda: {"config": ckpt_config, "tokenizer_dir": tok_dir},
                on_metrics=on_metrics, progress=progress)
    save_checkpoint(model_uri, model_state=lm.model.state_dict(), config=ckpt_config, tokenizer_dir=tok_dir,
                    extra_meta={"stage": "genrm", "step": res.step}, overwrite=True)
    return {"genrm_steps": float(res.step), "genrm_loss_first": res.history[0]["loss"] if res.history else float("nan"),
            "genrm_loss_last": res.final_loss, "genrm_records": float(index["samples"]),
            "genrm_dropped_too_long": float(index["dropped_too_long"])}


def win_rate(genrm: Any, prompts: list[Any], policy: list[str], base: list[str]) -> dict[str, float]:
    """GenRM win-rate of ``policy`` answers over ``base`` answers: win 1, tie 0.5, loss 0.

    Identical answers are ties without asking the judge; otherwise the judge's order-averaged
    P(policy better) decides (exactly 0.5 is a tie). ``pref_mean`` averages P itself.
    """
    import numpy as np

    diff = [i for i, (a, b) in enumerate(zip(policy, base)) if a.strip() != b.strip()]
    p = [0.5] * len(prompts)
    if diff:
        for i, q in zip(diff, genrm.compare([prompts[i] for i in diff], [policy[i] for i in diff],
                                            [base[i] for i in diff])):
            p[i] = q
    score = [1.0 if x > 0.5 else 0.0 if x < 0.5 else 0.5 for x in p]
    return {"win_rate": float(np.mean(score)), "pref_mean": float(np.mean(p)),
            "wins": float(sum(s == 1.0 for s in score)), "losses": float(sum(s == 0.0 for s in score)),
            "ties": float(sum(s == 0.5 for s in score)), "n": float(len(p))}


def data_sets(cfg: PipelineConfig) -> list[str]:
    """The sets of the data directory :func:`run` reads (``raw/<name>``): the preference pairs (GenRM), the RL
    prompts and ``eval`` (the before/after comparison). From an ``s3://`` data directory the node copies these."""
    return list(dict.fromkeys([preference_set(cfg), cfg.rlhf.data, "eval"]))


def run(
    cfg: PipelineConfig,
    data_dir: str | Path,
    init_uri: str,
    out_uri: str,
    *,
    progress: bool = True,
    settings: GenRMSettings | None = None,
    stop_after_iteration: int | None = None,
    ckpt_uri: str | None = None,
) -> RLHFOutputs:
    """The RLHF stage from ``init_uri`` (the SFT or RLVR model): GenRM, RL, then the comparison.

    With ``ckpt_uri`` (a location that outlives one task attempt), the GenRM (its checkpoints and
    final judge) lives under ``<ckpt_uri>/genrm`` and the policy's checkpoints under
    ``<ckpt_uri>/policy``, so a killed stage neither retrains a finished judge nor restarts RL.
    """
    from step3vl.eval.suite import EVAL_SAMPLING, GREEDY, evaluate, load_records, to_prompt
    from step3vl.devices import default_device
    from step3vl.model.loading import load_model
    from step3vl.rl.genrm import GenRM, ReferenceAnswers, RLHFReward, pairwise_accuracy
    from step3vl.rl.rollout import TorchEngine
    from step3vl.stages.data import local_copy
    from step3vl.stages.rl import require_single_process, run_rl
    from step3vl.storage import is_s3_uri, join_uri

    require_single_process("rlhf")
    t0 = time.perf_counter()
    settings = settings or GenRMSettings(steps=cfg.rlhf.genrm_steps, heldout_pairs=cfg.rlhf.genrm_heldout_pairs)
    data_dir = local_copy(data_dir, data_sets(cfg))
    genrm_uri = join_uri(ckpt_uri or out_uri, "genrm")
    local = not is_s3_uri(out_uri)
    work = Path(out_uri.removeprefix("file://")) / "genrm" / "data" if local else None
    metrics: dict[str, float] = {}

    metrics.update(train_genrm(cfg, data_dir, init_uri, genrm_uri, work, settings, progress=progress))
    t1 = time.perf_counter()
    genrm = GenRM.load(join_uri(genrm_uri, "model"), max_response_tokens=settings.max_response_tokens,
                       max_judgment_tokens=settings.max_judgment_tokens)
    acc = pairwise_accuracy(genrm, heldout_pairs(cfg, data_dir, settings.heldout_pairs))
    metrics.update({f"genrm_{k}": v for k, v in acc.items()})
    t2 = time.perf_counter()

    base = load_model(init_uri, device=default_device())
    for p in base.model.parameters():
        p.requires_grad_(False)
    base_engine = TorchEngine(base.model, base.tokenizer, base.processor)
    rl_dir = data_dir / "raw" / cfg.rlhf.data
    reward = RLHFReward.from_config(cfg.rlhf, genrm, ReferenceAnswers(base_engine, lambda r: to_prompt(r, rl_dir),
                                                                      cfg.rlhf.max_response_tokens),
                                    lambda r: to_prompt(r, rl_dir), settings.length_factor)
    rl = run_rl("rlhf", cfg, data_dir, init_uri, out_uri, reward_fn=reward, progress=progress,
                stop_after_iteration=stop_after_iteration,
                ckpt_uri=join_uri(ckpt_uri, "policy") if ckpt_uri else None)
    t3 = time.perf_counter()
    out = RLHFOutputs(model_uri=rl.model_uri, genrm_uri=join_uri(genrm_uri, "model"), rl=rl, metrics=metrics)
    metrics.update({f"rl/{k}": v for k, v in rl.metrics.items()})
    if rl.result.iteration < cfg.rlhf.iterations:
        return out  # interrupted on purpose: no final policy to compare

    policy = load_model(rl.model_uri, device=default_device())
    policy_engine = TorchEngine(policy.model, policy.tokenizer, policy.processor)
    ev_dir = data_dir / "raw" / "eval"
    ev = load_records(ev_dir)
    greedy = _seeded(GREEDY, cfg.seed)
    before = evaluate(base_engine, ev, ev_dir, params=greedy)
    after = evaluate(policy_engine, ev, ev_dir, params=greedy)
    acc_b, acc_a = before.metrics()["mean_accuracy"], after.metrics()["mean_accuracy"]
    metrics.update(accuracy_before=acc_b, accuracy_after=acc_a, accuracy_delta=acc_a - acc_b)
    for fam in after.families:
        metrics[f"accuracy_before/{fam}"] = before.accuracy(fam)
        metrics[f"accuracy_after/{fam}"] = after.accuracy(fam)

    sub = load_records(ev_dir, per_family=settings.winrate_per_family)
    prompts = [to_prompt(r, ev_dir) for r in sub]
    for mode, params in (("", _seeded(EVAL_SAMPLING, cfg.seed)), ("_greedy", greedy)):
        mine = [g[0].text for g in policy_engine.generate(prompts, 1, params)]
        theirs = [g[0].text for g in base_engine.generate(prompts, 1, params)]
        metrics.update({f"{k}{mode}": v for k, v in win_rate(genrm, prompts, mine, theirs).items()})
    t4 = time.perf_counter()
    metrics.update(seconds_genrm_train=t1 - t0, seconds_genrm_eval=t2 - t1, seconds_rl=t3 - t2,
                   seconds_compare=t4 - t3, seconds=t4 - t0)
    if local:
        Path(out_uri.removeprefix("file://"), "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    tracking.log_metrics({f"rlhf/{k}": v for k, v in metrics.items()})
    return out


def _seeded(params: Any, seed: int) -> Any:
    """``params`` with its seed set (evaluation samples are reproducible)."""
    from dataclasses import replace

    return replace(params, seed=seed)
