"""Evaluation suites: every verifiable record of a held-out dataset, scored by its own verifier.

Accuracy is the share of records whose reward reaches the verifier's bar (1.0 for exact verifiers,
IoU ≥ 0.5 for grounding); mean reward, mean response length and tokens used are reported beside it.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step3vl.rl.rollout import Prompt, SamplingParams

# the score at which a record counts as solved; exact verifiers need 1.0
CORRECT_AT = {"grounding_iou": 0.5, "grounding_point": 1.0}

EVAL_SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=48)  # the recipe's settings
GREEDY = SamplingParams(temperature=0.0, max_tokens=48)


def is_correct(record: dict[str, Any], reward: float) -> bool:
    return reward >= CORRECT_AT.get(record.get("reward", ""), 1.0) - 1e-9


@dataclass
class FamilyResult:
    n: int = 0
    correct: int = 0
    reward_sum: float = 0.0
    length_sum: int = 0
    tokens: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "accuracy": self.accuracy, "mean_reward": self.reward_sum / max(self.n, 1),
                "mean_length": self.length_sum / max(self.n, 1), "tokens": self.tokens}


@dataclass
class EvalResult:
    families: dict[str, FamilyResult] = field(default_factory=dict)
    skipped: int = 0
    seconds: float = 0.0

    def accuracy(self, family: str) -> float:
        return self.families[family].accuracy

    def metrics(self, prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        for fam, r in self.families.items():
            for k, v in r.as_dict().items():
                out[f"{prefix}{fam}/{k}"] = float(v)
        if self.families:
            out[f"{prefix}mean_accuracy"] = sum(r.accuracy for r in self.families.values()) / len(self.families)
        return out


def load_records(dataset_dir: str | Path, *, per_family: int | None = None,
                 families: set[str] | None = None) -> list[dict[str, Any]]:
    """Verifiable records (with ``reward`` and ``answer``) of a dataset, the first ``per_family`` of each task."""
    from step3vl.data.io import iter_records

    seen: collections.Counter[str] = collections.Counter()
    out = []
    for raw in iter_records(dataset_dir):
        r = raw.record
        if r is None or "reward" not in r or "answer" not in r:
            continue
        if families and r["task"] not in families:
            continue
        if per_family is not None and seen[r["task"]] >= per_family:
            continue
        seen[r["task"]] += 1
        out.append(r)
    return out


def to_prompt(record: dict[str, Any], dataset_dir: str | Path) -> Prompt:
    """The record's conversation up to (not including) its reference answer, with its images."""
    from step3vl.data.io import resolve_image

    msgs = [m for m in record["messages"] if m["role"] != "assistant"]
    imgs = [resolve_image(dataset_dir, ref, record_id=record["id"]) for ref in record.get("images", [])]
    return Prompt(msgs, imgs)


def evaluate(engine: Any, records: list[dict[str, Any]], dataset_dir: str | Path, *,
             params: SamplingParams = EVAL_SAMPLING, batch_size: int = 128, progress: bool = False) -> EvalResult:
    """Score one sample per record (SeRe) with the record's verifier, per task family."""
    t0 = time.perf_counter()
    res = EvalResult()
    it = range(0, len(records), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="eval", unit="batch", leave=False)
    for i in it:
        chunk = records[i : i + batch_size]
        outs = engine.generate([to_prompt(r, dataset_dir) for r in chunk], 1, params)
        for r, group in zip(chunk, outs):
            _score_into(res, r, group[0], len(group[0].token_ids) + group[0].prompt_tokens)
    res.families = dict(sorted(res.families.items()))
    res.seconds = time.perf_counter() - t0
    return res


def _score_into(res: EvalResult, record: dict[str, Any], c: Any, tokens: int) -> None:
    from step3vl.rl.rewards import score

    reward = score(c.text, record)
    fr = res.families.setdefault(record["task"], FamilyResult())
    fr.n += 1
    fr.correct += is_correct(record, reward)
    fr.reward_sum += reward
    fr.length_sum += len(c.token_ids)
    fr.tokens += tokens


def evaluate_majority(engine: Any, records: list[dict[str, Any]], dataset_dir: str | Path, *, k: int,
                      params: SamplingParams = EVAL_SAMPLING, batch_size: int = 128,
                      progress: bool = False) -> EvalResult:
    """majority@K: K samples per record; the response with the most common conclusion is scored."""
    from step3vl.pacore.inference import majority_vote

    t0 = time.perf_counter()
    res = EvalResult()
    per = max(1, batch_size // max(1, k) or 1)
    it = range(0, len(records), per)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"eval majority@{k}", unit="batch", leave=False)
    for i in it:
        chunk = records[i : i + per]
        outs = engine.generate([to_prompt(r, dataset_dir) for r in chunk], k, params)
        for r, group in zip(chunk, outs):
            c = group[majority_vote([x.text for x in group])]
            _score_into(res, r, c, sum(len(x.token_ids) + x.prompt_tokens for x in group))
    res.families = dict(sorted(res.families.items()))
    res.seconds = time.perf_counter() - t0
    return res


def evaluate_pacore(engine: Any, records: list[dict[str, Any]], dataset_dir: str | Path, *,
                    rounds: tuple[int, ...] | list[int] = (16,), params: SamplingParams = EVAL_SAMPLING,
                    seed: int = 0, batch_size: int = 128, progress: bool = False) -> EvalResult:
    """PaCoRe(rounds): the final round's single answer is scored; tokens count every round."""
    from step3vl.pacore.inference import pacore_generate

    t0 = time.perf_counter()
    res = EvalResult()
    per = max(1, batch_size // max(rounds))
    it = range(0, len(records), per)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"eval pacore{list(rounds)}", unit="batch", leave=False)
    for i in it:
        chunk = records[i : i + per]
        outs = pacore_generate(engine, [to_prompt(r, dataset_dir) for r in chunk], list(rounds), params, seed=seed)
        for r, o in zip(chunk, outs):
            _score_into(res, r, o.completion, o.total_tokens + sum(o.prompt_tokens))
    res.families = dict(sorted(res.families.items()))
    res.seconds = time.perf_counter() - t0
    return res
