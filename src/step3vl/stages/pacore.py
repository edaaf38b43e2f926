"""PaCoRe training: teach the policy to synthesise its own parallel responses (outcome-based).

A curriculum of steps (``cfg.pacore.curriculum``; the recipe's smaller set, then a larger one). Each step:

1. **Message sets**, from the policy as it is at that step (on-policy caching): ``prompts`` problems of
   the PaCoRe prompt set, ``width`` responses each at T=1 (one batched ``generate`` per chunk),
   compacted to their conclusions, shuffled with a seeded RNG and rendered into the controller prompt
   (:mod:`step3vl.pacore.inference`); ``pacore.subset_share`` of the sets show only a seeded random
   1 .. width-1 of their references, so the synthesis reads any PaCoRe width. They are written as a
   dataset (the problem's images included, its reference answer as the assistant turn), reused on rerun
   and published to ``messages_uri`` (default ``<out>/messages/``; the pipeline's ``messages`` Dataset).
2. **Warm-up** (``sft_steps``): SFT on those conversations on the one training loop (assistant tokens):
   the message sets ``pacore.synthesis_filter`` keeps (all; those a reference solves; those whose
   references disagree), with the reference's trace or only its answer as the target
   (``pacore.synthesis_target``), plus ``solver_mix`` plain problems.
3. **RL** (``rl_iterations``): the RL loop on the synthesis prompts with the records' verifiers.

Layout under ``ckpt_uri`` (defaults to ``out_uri``): ``step-<k>/{messages,packed}`` (local work),
``step-<k>/sft/{checkpoints,model}``, ``step-<k>/rl/{checkpoints,model}``, ``step-<k>/model`` (the
step's result; a finished step is never redone). Under ``out_uri``: ``model/`` (the final policy),
``metrics.json`` and, with ``pacore.scaling_per_family``, the
accuracy-vs-rollouts curve (``scaling.json``, ``scaling.png``, also an MLflow artifact). Under ``messages_uri``:
``step-<k>/`` (each step's message sets, a published dataset). Every sub-phase resumes exactly.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from step3vl import tracking
from step3vl.config import PaCoReConfig, PhaseConfig, PipelineConfig, TrainConfig
from step3vl.errors import Step3VLError

log = logging.getLogger(__name__)

SYNTHESIS_SET = "pacore_synthesis"
MESSAGE_CACHE = "pacore-message-cache"  # the pipeline's message_cache, under storage.root: <key>/{messages,warmup}
REPORT_FILES = ("metrics.json", "scaling.json", "scaling.png")  # written beside model/ and messages/


@dataclass
class PaCoReOutputs:
    model_uri: str
    messages_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    plot: Path | None = None


def synthesis_records(engine: Any, records: list[dict[str, Any]], src_dir: Path, width: int, pc: PaCoReConfig,
                      seed: int, step: int, progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One message set: ``width`` responses per record, compacted, shuffled and put in the controller prompt.

    Returns the synthesis records (the record's reference answer as the assistant turn) and statistics
    of the cached responses: how often they are right, what voting or any-of-them would score, and how
    many were cut at ``max_response_tokens`` (``references_clip_ratio``).
    """
    from step3vl.data.families import final_answer, think
    from step3vl.eval.suite import is_correct, to_prompt
    from step3vl.pacore.inference import compact, controller_prompt, majority_vote, shuffled
    from step3vl.rl.rewards import score
    from step3vl.rl.rollout import SamplingParams

    sp = SamplingParams(temperature=pc.temperature, top_p=pc.top_p, max_tokens=pc.max_response_tokens,
                        seed=seed * 7919 + step)
    prompts = [to_prompt(r, src_dir) for r in records]
    chunk = max(1, 512 // width)
    groups = []
    rng = range(0, len(prompts), chunk)
    if progress:
        from step3vl.progress import track

        rng = track(rng, desc=f"pacore messages (step {step})", unit="chunk")
    for i in rng:
        groups.extend(engine.generate(prompts[i : i + chunk], width, replace(sp, seed=sp.seed * 1000 + i)))
    out, ref_acc, maj, any_ok, clipped = [], [], [], [], []
    for idx, (rec, p, group) in enumerate(zip(records, prompts, groups)):
        ok = [is_correct(rec, score(c.text, rec)) for c in group]
        clipped.extend(c.finish_reason == "length" for c in group)
        ref_acc.append(float(np.mean(ok)))
        maj.append(float(ok[majority_vote([c.text for c in group])]))
        any_ok.append(float(any(ok)))
        shown = _shown(len(group), pc.subset_share, seed, step, idx)
        group, ok = [group[i] for i in shown], [ok[i] for i in shown]
        concl = shuffled([compact(c.text) for c in group], seed, idx, step)
        cp = controller_prompt(p, concl)
        target = next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "assistant")
        if pc.synthesis_target == "answer":
            target = think("", final_answer(target))
        out.append({
            "id": f"pacore-s{step}-{rec['id']}", "task": rec["task"], "split": "train",
            "reward": rec["reward"], "answer": rec["answer"], "images": list(p.images),
            "messages": [*cp.messages, {"role": "assistant", "content": target}],
            "meta": {"source": rec["id"], "width": len(group), "references_correct": int(sum(ok))},
        })
    stats = {"references_accuracy": float(np.mean(ref_acc)), "references_majority": float(np.mean(maj)),
             "references_pass": float(np.mean(any_ok)), "problems": float(len(records)),
             # responses cut at pacore.max_response_tokens: no conclusion reaches the controller prompt
             "references_clip_ratio": float(np.mean(clipped))}
    return out, stats


def _shown(width: int, share: float, seed: int, step: int, idx: int) -> list[int]:
    """Indices of the references a message set shows: all of them, or (a seeded ``share`` of the sets) a
    random subset of 1 .. width-1 of them, so the synthesis learns to read any number of references."""
    rng = np.random.default_rng([seed, step, idx, 0x5B5E7])
    if width < 2 or share <= 0.0 or rng.random() >= share:
        return list(range(width))
    k = int(rng.integers(1, width))
    return sorted(rng.choice(width, size=k, replace=False).tolist())


def _filtered(recs: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    """The message sets the warm-up trains on (``PaCoReConfig.synthesis_filter``)."""
    if how == "all":
        return recs
    out = []
    for r in recs:
        right, width = r["meta"]["references_correct"], r["meta"]["width"]
        if right > 0 and (how == "solved" or right < width):
            out.append(r)
    return out


def _take(records: list[dict[str, Any]], n: int, seed: int, step: int) -> list[dict[str, Any]]:
    """``n`` problems for curriculum step ``step``: a seeded permutation, a fresh slice per step (cycling)."""
    order = np.random.default_rng([seed, 0xC0DE]).permutation(len(records)).tolist()
    return [records[order[(step * 7919 + i) % len(order)]] for i in range(n)]


def _solver_records(problems: list[dict[str, Any]], src_dir: Path, mix: float, seed: int,
                    step: int, pool: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """``mix`` x len(problems) plain problems (their own conversations, images loaded) for the warm-up:
    the step's own problems, or a seeded draw from ``pool`` (records of ``src_dir``) when given."""
    from step3vl.data.io import resolve_image

    n = int(round(mix * len(problems)))
    if pool:
        order = np.random.default_rng([seed, 0x501, step]).permutation(len(pool)).tolist()
        picked = [pool[order[i % len(order)]] for i in range(n)]
    else:
        picked = [problems[(i * 7 + step) % len(problems)] for i in range(n)]
    out = []
    for i, r in enumerate(picked):
        imgs = [resolve_image(src_dir, ref, record_id=r["id"]) for ref in r.get("images", [])]
        out.append({**r, "id": f"solver-s{step}-{i}-{r['id']}", "images": imgs})
    return out


def _publish_dataset(dest: Path, records: list[dict[str, Any]], shard_size: int,
                     stats: dict[str, float] | None = None) -> None:
    """Write a dataset next to ``dest`` and publish it there atomically (with a checksum manifest)."""
    from step3vl.data.io import write_dataset
    from step3vl.storage import publish_dir

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-staging-", dir=dest.parent)) / "set"  # never shared
    try:
        write_dataset(staging, records, shard_size=shard_size)
        if stats is not None:
            (staging / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
        publish_dir(staging, str(dest), overwrite=True, move=True)
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)


def _from_cache(cache: str, msg_dir: Path, warm_dir: Path) -> dict[str, float] | None:
    """A step's message sets and warm-up set copied from the cache, verified, and their statistics; None on a miss
    (nothing there, or a part of it that does not verify). Each file is read once: the copy verifies it."""
    from step3vl.storage import NotPublishedError, StorageError, fetch_dir, join_uri

    try:
        fetch_dir(join_uri(cache, "warmup"), warm_dir, overwrite=True)
        fetch_dir(join_uri(cache, "messages"), msg_dir, overwrite=True)  # stored last: the entry is whole
    except StorageError as e:
        if not isinstance(e, NotPublishedError):
            log.warning("pacore: cached message sets at %s unusable (%s); generating them", cache, e)
        for d in (msg_dir, warm_dir):
            shutil.rmtree(d, ignore_errors=True)
        return None
    log.warning("pacore: message sets reused from %s (made from the same policy and settings)", cache)
    _mark_used(cache)
    return json.loads((msg_dir / "stats.json").read_text())


USED_MARKER = "LAST_USED"


def _mark_used(cache: str) -> None:
    """Rewrite the entry's ``LAST_USED`` object (the time, in UTC), so ``step3vl cache prune`` ages the entry from its
    last use rather than from when it was stored. A marker that cannot be written is reported and nothing else
    changes: the entry was read whole, and only its age as prune sees it is older than it should be."""
    from datetime import datetime, timezone

    from step3vl.storage import StorageError, open_store

    try:
        open_store(cache).write_bytes(USED_MARKER, datetime.now(timezone.utc).isoformat().encode() + b"\n")
    except (StorageError, OSError) as e:
        log.warning("pacore: could not mark %s as used (%s); cache prune will age it from when it was stored", cache, e)


def _to_cache(cache: str, msg_dir: Path, warm_dir: Path) -> None:
    """Store a step's message sets and warm-up set under ``cache`` (the messages last: a reader checks both). Another
    run storing the same key first is no error: the key fixes the content. A store that fails is reported, and the
    stage goes on with the sets it made (only a later run's reuse is lost)."""
    from step3vl.storage import StorageError, join_uri, publish_dir

    for name, d in (("warmup", warm_dir), ("messages", msg_dir)):
        dest = join_uri(cache, name)
        if _published(dest):
            continue
        try:
            publish_dir(d, dest, overwrite=True)  # over a copy that does not verify
        except (StorageError, OSError) as e:
            if not _published(dest):
                log.warning("pacore: could not store message sets at %s (%s); later runs will generate them", dest, e)
                return


def _published(uri: str) -> bool:
    from step3vl.storage import StorageError, verify_published

    try:
        verify_published(uri)
        return True
    except StorageError:
        return False


@dataclass(frozen=True)
class CacheEntry:
    """One key of a PaCoRe message cache: where it is, how many files and bytes it holds, when it was last used (its
    newest object: a run that reuses it rewrites its ``LAST_USED``, one that stores it writes the rest), and whether
    it is whole (its message sets published; they are stored last)."""

    key: str
    uri: str
    files: int
    size: int
    used: float
    whole: bool


def cache_entries(cache: str) -> list[CacheEntry]:
    """The entries of the message cache at ``cache`` (a folder or ``s3://…``), oldest first; [] when there is none."""
    from step3vl.storage import MANIFEST_NAME, join_uri, open_store

    store = open_store(cache)
    by_key: dict[str, list[Any]] = {}
    for obj in store.list_info():
        key, _, rest = obj.key.partition("/")
        if rest:
            by_key.setdefault(key, []).append(obj)
    entries = [CacheEntry(key, join_uri(store.uri, key), len(objs), sum(o.size for o in objs),
                          max(o.modified for o in objs), any(o.key == f"{key}/messages/{MANIFEST_NAME}" for o in objs))
               for key, objs in by_key.items()]
    return sorted(entries, key=lambda e: (e.used, e.key))


def prune_cache(cache: str, older_than_s: float, *, dry_run: bool = False, now: float | None = None,
                entries: list[CacheEntry] | None = None) -> list[CacheEntry]:
    """Remove the entries of the message cache at ``cache`` last used more than ``older_than_s`` seconds ago,
    whole or not; the removed ones (with ``dry_run``, those that would be). A run that needs a removed entry
    generates its message sets again (and stores them again); an entry being stored now is recent, so it stays.
    ``entries``: the cache's :func:`cache_entries` when the caller already listed them."""
    import time

    from step3vl.storage import open_store

    if older_than_s < 0:
        raise Step3VLError(f"older_than_s must be >= 0, got {older_than_s}")
    now = time.time() if now is None else now
    old = [e for e in (cache_entries(cache) if entries is None else entries) if now - e.used > older_than_s]
    if not dry_run:
        store = open_store(cache)
        for e in old:
            store.delete_prefix(e.key + "/")
            log.info("pacore: removed cached message sets %s (%d files, %d bytes)", e.uri, e.files, e.size)
    return old


def _scaling(cfg: PipelineConfig, data_dir: Path, model_uri: str, out: Path, log_m: Any, progress: bool) -> Path:
    """The trained model's accuracy-vs-rollouts curve (PaCoRe, majority, pass@K) as a plot + metrics."""
    from step3vl.eval.scaling import plot_scaling, scaling_curve
    from step3vl.eval.suite import EVAL_SAMPLING, load_records
    from step3vl.devices import default_device
    from step3vl.model.loading import load_model
    from step3vl.rl.rollout import TorchEngine

    pc = cfg.pacore
    ds = data_dir / "raw" / pc.scaling_data
    recs = load_records(ds, per_family=pc.scaling_per_family, families=set(pc.scaling_families))
    lm = load_model(model_uri, device=default_device())
    curves = scaling_curve(TorchEngine(lm.model, lm.tokenizer, lm.processor), recs, ds, pc.scaling_ks,
                           replace(EVAL_SAMPLING, seed=cfg.seed), seed=cfg.seed, progress=progress)
    (out / "scaling.json").write_text(json.dumps(curves, indent=1, sort_keys=True))
    log_m({f"scaling/{fam}/{kind}_at_{int(k)}": v for fam, c in curves.items() for kind in ("pacore", "majority", "pass")
           for k, v in zip(c["k"], c[kind])})
    return plot_scaling(curves, out / "scaling.png")


def warmup_config(pc: PaCoReConfig, steps: int, sft: TrainConfig) -> TrainConfig:
    return TrainConfig(
        phases=(PhaseConfig(data=SYNTHESIS_SET, steps=steps, lr_start=pc.lr_start, lr_end=pc.lr_end),),
        loss_on="assistant", seq_len=pc.seq_len, batch_size=pc.batch_size, warmup_steps=min(pc.warmup_steps, steps),
        weight_decay=sft.weight_decay, precision=sft.precision, grad_clip=sft.grad_clip,
        checkpoint_every=max(1, steps // 2), log_every=10,
    )


def data_sets(cfg: PipelineConfig) -> list[str]:
    """The sets of the data directory :func:`run` reads (``raw/<name>``): the PaCoRe prompts, the warm-up's plain
    problems (``solver_data``) and the accuracy-vs-rollouts curve's (``scaling_data``). From an ``s3://`` data
    directory the node copies these."""
    pc = cfg.pacore
    sets = [pc.data, pc.solver_data, pc.scaling_data if pc.scaling_per_family else ""]
    return list(dict.fromkeys(s for s in sets if s))


def run(cfg: PipelineConfig, data_dir: str | Path, init_uri: str, out_uri: str, *, ckpt_uri: str | None = None,
        messages_uri: str | None = None, message_cache: str | None = None, progress: bool = True,
        stop_after: tuple[int, str] | None = None) -> PaCoReOutputs:
    """PaCoRe training from ``init_uri``; the message sets go to ``messages_uri`` (default ``<out_uri>/messages``).

    ``message_cache`` (a folder or ``s3://`` prefix; the pipeline passes ``<storage.root>/pacore-message-cache``):
    each step's message sets and warm-up set are stored there under :func:`messages_key`, and a step whose key is
    there copies them instead of generating them, e.g. a rerun that changed only how they are trained on. None: every
    run generates its own (a rerun of the same run still reuses its own, from ``ckpt_uri``).
    ``stop_after=(step, "messages"|"sft"|"rl")`` ends early (tests)."""
    from step3vl.stages.data import local_copy
    from step3vl.stages.rl import require_single_process
    from step3vl.storage import is_s3_uri, join_uri

    require_single_process("pacore")
    sets = _set_hashes(data_dir) if message_cache else None
    data = local_copy(data_dir, data_sets(cfg))
    root = ckpt_uri or out_uri
    msgs = messages_uri or join_uri(out_uri, "messages")
    if is_s3_uri(root):
        with tempfile.TemporaryDirectory(prefix="step3vl-pacore-") as tmp:
            return _run(cfg, data, message_cache, sets, init_uri, out_uri, msgs, root, Path(tmp), progress, stop_after)
    return _run(cfg, data, message_cache, sets, init_uri, out_uri, msgs, root, Path(root.removeprefix("file://")),
                progress, stop_after)


# PaCoRe settings that do not change a step's message sets or its warm-up set (only what is trained on them, how)
_TRAINING_ONLY = ("curriculum", "seq_len", "batch_size", "lr_start", "lr_end", "warmup_steps", "rl", "rounds",
                  "scaling_ks", "scaling_per_family", "scaling_families", "scaling_data")


def _set_hashes(data_dir: str | Path) -> dict[str, str] | None:
    """Each set's content hash from the data's manifest; None for a data directory without one (no cache then)."""
    from step3vl.stages.data import read_data_manifest

    try:
        manifest = read_data_manifest(data_dir)
    except (OSError, ValueError, Step3VLError) as e:
        log.warning("pacore: %s has no readable data manifest (%s): message sets are not cached across runs",
                    data_dir, e)
        return None
    return {name: str(info.get("content_hash", "")) for name, info in manifest.get("sets", {}).items()}


def messages_key(cfg: PipelineConfig, k: int, policy_uri: str, sets: dict[str, str]) -> str:
    """What curriculum step ``k``'s message sets and warm-up set are a function of, as one digest: the policy's
    checkpoint, the content of the sets they draw on, every PaCoRe setting but the training-only ones, the step's
    prompts and width, the seed, the shard size, the controller template and the stage's code. Runs that agree on
    all of it make the same sets, so one is reused where another made it (:func:`run`)."""
    from step3vl.config import conf_dir, to_dict
    from step3vl.pacore.inference import TEMPLATE
    from step3vl.pipeline.lineage import checkpoint_digest, code_digest, sha256_json

    pc = cfg.pacore
    st = pc.curriculum[k - 1]
    if policy_uri.startswith("models:/"):
        from step3vl.registry import resolve_model_uri

        policy_uri = resolve_model_uri(policy_uri)
    return sha256_json({
        "policy": checkpoint_digest(policy_uri),
        "sets": {n: sets.get(n, "") for n in sorted({pc.data, pc.solver_data} - {""})},
        "pacore": {f: v for f, v in to_dict(pc).items() if f not in _TRAINING_ONLY},
        "step": k, "prompts": st.prompts, "width": st.width, "seed": cfg.seed, "shard_size": cfg.data.shard_size,
        "template": (conf_dir() / TEMPLATE).read_text(),
        "code": code_digest({__name__}),
    })


def _run(cfg: PipelineConfig, data_dir: Path, message_cache: str | None, sets: dict[str, str] | None, init_uri: str,
         out_uri: str, msgs_uri: str, root: str, work: Path, progress: bool,
         stop_after: tuple[int, str] | None) -> PaCoReOutputs:
    from step3vl.checkpoint import save_checkpoint
    from step3vl.data.pack import PackedDataset, pack_dataset
    from step3vl.devices import default_device
    from step3vl.eval.suite import load_records
    from step3vl.model.loading import checkpoint_config, load_model
    from step3vl.rl.rollout import TorchEngine
    from step3vl.stages.data import set_seed
    from step3vl.stages.rl import run_rl
    from step3vl.storage import StorageError, is_s3_uri, join_uri, verify_dir
    from step3vl.train.loop import seed_everything, train

    pc = cfg.pacore
    if not pc.curriculum:
        raise ValueError("pacore.curriculum is empty: nothing to train")
    t_start = time.perf_counter()
    src_dir = data_dir / "raw" / pc.data
    problems = load_records(src_dir)
    if not problems:
        raise ValueError(f"PaCoRe prompt set {src_dir} has no verifiable records")
    metrics: dict[str, float] = {}
    current = init_uri
    msg_dirs: list[Path] = []

    def log_m(values: dict[str, float], step: int | None = None) -> None:
        metrics.update(values)
        tracking.log_metrics({f"pacore/{k}": v for k, v in values.items()}, step=step)

    for k, st in enumerate(pc.curriculum, 1):
        step_root = join_uri(root, f"step-{k}")
        step_model = join_uri(step_root, "model")
        msg_dir = work / f"step-{k}" / "messages"
        msg_dirs.append(msg_dir)
        if _published(step_model) and msg_dir.is_dir():
            log.warning("pacore step %d already done (%s); reusing it", k, step_model)
            current = step_model
            continue
        t0 = time.perf_counter()
        seed_everything(cfg.seed)
        lm = load_model(current, device=default_device())
        tok_dir = str(lm.tokenizer_dir)
        ckpt_config = checkpoint_config(lm.cfg, lm.tokenizer, stage="pacore")
        # 1. message sets from the current policy (+ the warm-up set: synthesis and plain problems)
        warm_dir = work / f"step-{k}" / "warmup"
        stats, reused, cache = None, 0.0, None
        try:  # this run's own, from before a restart
            verify_dir(msg_dir)
            verify_dir(warm_dir)
            with open(msg_dir / "stats.json") as f:
                stats = json.load(f)
        except (StorageError, FileNotFoundError):
            for d in (msg_dir, warm_dir):
                if d.exists():
                    shutil.rmtree(d)
            if message_cache and sets is not None:  # another run's, made from the same policy and settings
                cache = join_uri(message_cache, messages_key(cfg, k, current, sets)[:32])
                stats = _from_cache(cache, msg_dir, warm_dir)
                reused = float(stats is not None)
        if stats is None:
            engine = TorchEngine(lm.model, lm.tokenizer, lm.processor)
            chosen = _take(problems, st.prompts, cfg.seed, k)
            recs, stats = synthesis_records(engine, chosen, src_dir, st.width, pc, cfg.seed, k, progress)
            train_recs = _filtered(recs, pc.synthesis_filter)
            stats["synthesis_records"] = float(len(train_recs))
            _publish_dataset(msg_dir, recs, cfg.data.shard_size, stats)
            if pc.solver_data:
                solver_dir = data_dir / "raw" / pc.solver_data
                solvers = _solver_records(chosen, solver_dir, pc.solver_mix, cfg.seed, k,
                                          pool=load_records(solver_dir))
            else:
                solvers = _solver_records(chosen, src_dir, pc.solver_mix, cfg.seed, k)
            _publish_dataset(warm_dir, train_recs + solvers, cfg.data.shard_size)
            if cache:
                _to_cache(cache, msg_dir, warm_dir)
        log_m({f"step{k}/{n}": v for n, v in stats.items()}
              | {f"step{k}/seconds_messages": time.perf_counter() - t0, f"step{k}/messages_reused": reused})
        if stop_after == (k, "messages"):
            return PaCoReOutputs(join_uri(out_uri, "model"), msgs_uri, metrics)
        # 2. supervised warm-up on the correct synthesis answers
        if st.sft_steps:
            t1 = time.perf_counter()
            sft_model = join_uri(step_root, "sft", "model")
            if not _published(sft_model):
                packed = work / f"step-{k}" / "packed"
                try:
                    verify_dir(packed)
                except (StorageError, FileNotFoundError):
                    if packed.exists():
                        shutil.rmtree(packed)
                    pack_dataset(warm_dir, str(packed), tokenizer=lm.tokenizer, processor=lm.processor,
                                 seq_len=pc.seq_len, loss_on="assistant", seed=set_seed(cfg.data, SYNTHESIS_SET) + k,
                                 open_rows=cfg.data.pack_open_rows, progress=progress,
                                 extra_meta={"source": SYNTHESIS_SET, "step": k})
                seed_everything(cfg.seed)
                lm.model.train()
                res = train(lm.model, warmup_config(pc, st.sft_steps, cfg.sft), [PackedDataset(packed, lm.processor)],
                            ckpt_root=join_uri(step_root, "sft", "checkpoints"), seed=cfg.seed + k,
                            save_extra=lambda: {"config": ckpt_config, "tokenizer_dir": tok_dir},
                            progress=progress,
                            stop_after_step=None)
                log_m({f"step{k}/sft_loss_first": res.history[0]["loss"] if res.history else float("nan"),
                       f"step{k}/sft_loss_last": res.final_loss, "synthesis_loss": res.final_loss})
                save_checkpoint(sft_model, model_state=lm.model.state_dict(), config=ckpt_config,
                                tokenizer_dir=tok_dir, extra_meta={"stage": "pacore", "step": k, "phase": "sft"},
                                overwrite=True)
            current = sft_model
            log_m({f"step{k}/seconds_sft": time.perf_counter() - t1})
        if stop_after == (k, "sft"):
            return PaCoReOutputs(join_uri(out_uri, "model"), msgs_uri, metrics)
        # 3. outcome-based RL on the synthesis prompts
        if st.rl_iterations:
            t2 = time.perf_counter()
            rl_cfg = replace(pc.rl, data=pc.data, iterations=st.rl_iterations,
                             max_response_tokens=pc.max_response_tokens)
            rl = run_rl("pacore", cfg, data_dir, current, join_uri(step_root, "rl"), rl_cfg=rl_cfg,
                        records=load_records(msg_dir), records_dir=msg_dir, progress=progress,
                        ckpt_uri=join_uri(step_root, "rl", "checkpoints"))
            if rl.result.iteration < st.rl_iterations:
                return PaCoReOutputs(join_uri(out_uri, "model"), msgs_uri, metrics)
            if rl.result.history:
                log_m({f"step{k}/rl_reward_first": rl.result.history[0]["reward_mean"],
                       f"step{k}/rl_reward_last": rl.result.history[-1]["reward_mean"]})
            current = rl.model_uri
            log_m({f"step{k}/seconds_rl": time.perf_counter() - t2})
        # the step's result, published once whole
        final = load_model(current)
        save_checkpoint(step_model, model_state=final.model.state_dict(), config=ckpt_config, tokenizer_dir=tok_dir,
                        extra_meta={"stage": "pacore", "step": k}, overwrite=True)
        current = step_model
    out = PaCoReOutputs(join_uri(out_uri, "model"), msgs_uri, metrics)
    final = load_model(current)
    tok_dir = str(final.tokenizer_dir)
    save_checkpoint(out.model_uri, model_state=final.model.state_dict(),
                    config=checkpoint_config(final.cfg, final.tokenizer, stage="pacore"), tokenizer_dir=tok_dir,
                    extra_meta={"stage": "pacore", "steps": len(pc.curriculum)}, overwrite=True)
    if not is_s3_uri(msgs_uri):
        dest = Path(msgs_uri.removeprefix("file://"))
        for k, d in enumerate(msg_dirs, 1):
            step_dest, tmp = dest / f"step-{k}", dest / f".step-{k}.tmp"
            if d.resolve() != step_dest.resolve():  # copied whole under another name, then renamed into place
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(d, tmp)
                shutil.rmtree(step_dest, ignore_errors=True)
                tmp.rename(step_dest)
    else:
        from step3vl.storage import publish_dir

        for k, d in enumerate(msg_dirs, 1):
            publish_dir(d, join_uri(msgs_uri, f"step-{k}"), overwrite=True)
    log_m({"seconds": time.perf_counter() - t_start})
    # beside the model when it is local; else a folder of its own that outlives this call (MLflow sends the plot
    # later), uploaded next to the model below
    local_out = not is_s3_uri(out_uri)
    report = Path(out_uri.removeprefix("file://")) if local_out else Path(tempfile.mkdtemp(prefix="step3vl-pacore-"))
    report.mkdir(parents=True, exist_ok=True)
    if pc.scaling_per_family:
        t3 = time.perf_counter()
        out.plot = _scaling(cfg, data_dir, out.model_uri, report, log_m, progress)
        log_m({"seconds_scaling": time.perf_counter() - t3})
    (report / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    if not local_out:  # the plot, its numbers and the metrics beside the model (one object each)
        from step3vl.storage import open_store

        store = open_store(out_uri)
        for name in REPORT_FILES:
            if (report / name).exists():
                store.upload_file(report / name, name)
    if out.plot:
        tracking.log_artifact(str(out.plot))
    return out
