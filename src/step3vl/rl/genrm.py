"""GenRM, the generative pairwise reward model of RLHF, and the RLHF reward built on it.

Where it sits: data prep writes preference pairs (``step3vl.data.families.preference``);
:func:`genrm_records` turns each pair into two judge conversations, the chosen response shown
once as A and once as B, so that the position never predicts the verdict; the RLHF stage
(``step3vl.stages.rlhf``) fine-tunes the SFT model on them with the one training loop.
:class:`GenRM` then judges pairs of responses, and :class:`RLHFReward` turns its judgment of each
policy sample against a reference answer, plus behaviour regularisers, into the RL reward.

The judge format is short, because the tiny model's context is only 2x the SFT seq_len::

    user:      {the prompt's text, <image> markers and images kept}
               Response A: {a}
               Response B: {b}
               Which response is better? Answer A or B.
    assistant: <think>{a label per response, e.g. "A good, B repeats"}</think>{A or B}

P(A better) of one presentation is the softmax over the letter logits ``A``/``B`` right after
the judge's own greedy ``</think>``; :meth:`GenRM.compare` averages both presentation orders.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from step3vl.devices import module_device, to_device
from step3vl.rl.rollout import Completion, Prompt, SamplingParams, encode_prompt, merge_images

JUDGE_QUESTION = "Which response is better? Answer A or B."
LETTERS = ("A", "B")
# the judge's label for a rejected response, by the preference family's rejection kind
FLAWS = {"wrong": "wrong", "repetitive": "repeats", "format": "unclear", "unanswerable": "guesses"}
# Markup a response must not carry into the judge's user turn: an <image> would ask for an image
# the pair does not have, a chat token would end the turn. The think markers stay: they are content.
_MARKUP = re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<image>|<im_start>|<im_end>|<im_patch>|"
                     r"<patch_start>|<patch_end>|<patch_newline>")
# "I cannot tell." / "I cannot tell from the image." and the usual paraphrases
_ABSTAIN = re.compile(r"\b(cannot|can't|can not|unable to|impossible to|not possible to)\s+"
                      r"(tell|say|know|answer|determine|see)\b|\bI (do not|don't) know\b", re.IGNORECASE)


@dataclass(frozen=True)
class GenRMSettings:
    """How the GenRM is trained and used (proposed as ``RLConfig``/``GenRMConfig`` fields)."""

    steps: int = 100  # optimizer steps of GenRM SFT
    batch_size: int = 16  # packed rows per step
    lr_start: float = 3.0e-3
    lr_end: float = 3.0e-4
    warmup_steps: int = 5
    max_response_tokens: int = 48  # each response is cut to this many tokens inside the judge prompt
    max_judgment_tokens: int = 24  # "<think>reason</think>A" and the end token fit easily
    heldout_pairs: int = 200  # preference pairs (split="eval") for held-out pairwise accuracy
    length_factor: float = 2.0  # length discipline: responses over k x the reference length pay
    winrate_per_family: int = 25  # held-out eval prompts per family for the win-rate


# --------------------------------------------------------------------------- judge prompts


def prompt_text(messages: Sequence[dict[str, str]]) -> str:
    """The text of a prompt's turns (assistant turns dropped), ``<image>`` markers kept in order."""
    return "\n".join(m["content"] for m in messages if m["role"] != "assistant")


def clean_response(text: str, tokenizer: Any = None, max_tokens: int | None = None) -> str:
    """A response as the judge sees it: markup removed, cut to ``max_tokens`` tokens."""
    text = _MARKUP.sub("", text).strip()
    if tokenizer is not None and max_tokens is not None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > max_tokens:
            text = tokenizer.decode(ids[:max_tokens]).strip()
    return text


def judge_messages(prompt: str, a: str, b: str) -> list[dict[str, str]]:
    """The judge's user turn for (prompt, A, B)."""
    return [{"role": "user", "content": f"{prompt}\nResponse A: {a}\nResponse B: {b}\n{JUDGE_QUESTION}"}]


def judgment(reason: str, letter: str) -> str:
    """The judge's target: ``<think>reason</think>letter``."""
    return f"<think>{reason}</think>{letter}"


def reason_for(record: dict[str, Any], chosen: str) -> str:
    """A one-line reason: a label per response, in order (``A good, B repeats``).

    Labelling each response where it stands, rather than naming the winner first, lets a small
    judge decide about one response at a time; the letter then follows from the labels.
    """
    meta = record.get("meta") or {}
    bad = FLAWS.get(str(meta.get("rejected_kind")), "wrong")
    if meta.get("detail") == "absent_count":  # a guessed count of an absent colour is simply wrong
        bad = "wrong"
    labels = {chosen: "good", LETTERS[1 - LETTERS.index(chosen)]: bad}
    return f"A {labels['A']}, B {labels['B']}"


def genrm_records(pairs: Iterable[dict[str, Any]], dataset_dir: str | Path | None, tokenizer: Any = None,
                  max_response_tokens: int | None = None) -> Iterator[dict[str, Any]]:
    """Two judge records per preference pair: chosen as A, then chosen as B.

    Images are loaded (PIL) so that ``write_dataset`` stores them with the new dataset; records
    already holding PIL images (freshly generated) pass them through.
    """
    from PIL import Image

    from step3vl.data.io import resolve_image

    for rec in pairs:
        images = [im if isinstance(im, Image.Image) else resolve_image(dataset_dir or ".", im, record_id=rec["id"])
                  for im in rec.get("images", [])]
        prompt = prompt_text(rec["messages"])
        good = clean_response(rec["chosen"], tokenizer, max_response_tokens)
        bad = clean_response(rec["rejected"], tokenizer, max_response_tokens)
        for letter in LETTERS:
            a, b = (good, bad) if letter == "A" else (bad, good)
            yield {
                "id": f"genrm-{rec['id']}-{letter}",
                "task": "genrm",
                "split": rec.get("split", "train"),
                "images": list(images),
                "messages": [*judge_messages(prompt, a, b),
                             {"role": "assistant", "content": judgment(reason_for(rec, letter), letter)}],
                "answer": letter,
                "meta": {"pair": rec["id"], "chosen_as": letter, **{k: v for k, v in (rec.get("meta") or {}).items()
                                                                      if k in ("rejected_kind", "detail", "source")}},
            }


# --------------------------------------------------------------------------- the judge


class Verdict(NamedTuple):
    """One presentation's judgment: P(A better), the judge's text, whether it reached a letter."""

    p_a: float
    text: str
    valid: bool


class GenRM:
    """A trained judge model: ``compare(prompts, a, b)`` gives P(A better) per pair."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any, *, max_response_tokens: int = 48,
                 max_judgment_tokens: int = 24, batch_size: int = 128) -> None:
        from step3vl.rl.rollout import TorchEngine

        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.engine = TorchEngine(model, tokenizer, processor, max_batch=batch_size)
        self.max_response_tokens, self.max_judgment_tokens = max_response_tokens, max_judgment_tokens
        self.batch_size = batch_size
        self.think_end = int(tokenizer.convert_tokens_to_ids("</think>"))
        self.letter_ids = [tokenizer.encode(x, add_special_tokens=False) for x in LETTERS]
        if any(len(ids) != 1 for ids in self.letter_ids):
            raise ValueError(f"the judge letters must be single tokens, got {self.letter_ids}")
        self.letter_ids = [ids[0] for ids in self.letter_ids]
        self.pad_id = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))

    @classmethod
    def load(cls, uri: str, **kwargs: Any) -> GenRM:
        from step3vl.devices import default_device
        from step3vl.model.loading import load_model

        lm = load_model(uri, device=default_device())
        for p in lm.model.parameters():
            p.requires_grad_(False)
        return cls(lm.model, lm.tokenizer, lm.processor, **kwargs)

    def prompts(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Prompt]:
        """The judge prompts of (prompt, A, B) triples; the original images ride along."""
        out = []
        for p, x, y in zip(prompts, a, b, strict=True):
            xa = clean_response(x, self.tokenizer, self.max_response_tokens)
            yb = clean_response(y, self.tokenizer, self.max_response_tokens)
            out.append(Prompt(judge_messages(prompt_text(p.messages), xa, yb), list(p.images)))
        return out

    @torch.no_grad()
    def judge(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[Verdict]:
        """One presentation order: the judge's greedy judgment and P(A) from its letter logits.

        A judgment that never closes ``</think>`` within ``max_judgment_tokens`` reached no
        verdict: P(A) = 0.5 and ``valid`` is False (counted by the callers, never hidden).
        """
        jp = self.prompts(prompts, a, b)
        out: list[Verdict] = []
        params = SamplingParams(temperature=0.0, max_tokens=self.max_judgment_tokens)
        for i in range(0, len(jp), self.batch_size):
            chunk = jp[i : i + self.batch_size]
            comps = [g[0] for g in self.engine.generate(chunk, 1, params)]
            out.extend(self._letter_probs(chunk, comps))
        return out

    def compare(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """P(A better than B) per pair, the mean of both presentation orders (so position bias cancels)."""
        return [p for p, _, _ in self.compare_detailed(prompts, a, b)]

    def compare_detailed(self, prompts: Sequence[Prompt], a: Sequence[str], b: Sequence[str]
                         ) -> list[tuple[float, Verdict, Verdict]]:
        """(P(A better), verdict with A first, verdict with B first) per pair; one batch for both orders."""
        n = len(prompts)
        v = self.judge([*prompts, *prompts], [*a, *b], [*b, *a])
        return [(0.5 * (v[i].p_a + 1.0 - v[n + i].p_a), v[i], v[n + i]) for i in range(n)]

    def _letter_probs(self, prompts: Sequence[Prompt], comps: Sequence[Completion]) -> list[Verdict]:
        model = self.model
        enc = [encode_prompt(p, self.tokenizer, self.processor) for p in prompts]
        seqs, rows = [], []
        for i, ((ids, _), c) in enumerate(zip(enc, comps)):
            toks = list(c.token_ids)
            if self.think_end in toks:
                k = len(toks) - toks[::-1].index(self.think_end)  # through the last </think>
                seqs.append(ids + toks[:k])
                rows.append(i)
        probs: dict[int, float] = {}
        if seqs:
            L = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(seqs), L), dtype=torch.long)
            for r, s in enumerate(seqs):
                input_ids[r, : len(s)] = torch.tensor(s)
                attn[r, : len(s)] = 1
            dev = module_device(model)
            images = to_device(merge_images([enc[i][1] for i in rows], self.processor.vision), dev)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            ends = attn.sum(-1) - 1
            was = model.training
            model.eval()
            o = model(input_ids.to(dev), images=images, attention_mask=attn.to(dev), position_ids=pos.to(dev),
                      return_logits=False)
            model.train(was)
            last = o.hidden_states[torch.arange(len(seqs), device=dev), ends.to(dev)]
            logits = model.lm_head(last).float()[:, self.letter_ids]
            for r, p in zip(rows, logits.softmax(-1)[:, 0].tolist()):
                probs[r] = p
        return [Verdict(probs.get(i, 0.5), c.text, i in probs) for i, c in enumerate(comps)]


# --------------------------------------------------------------------------- held-out accuracy


def pairwise_accuracy(genrm: GenRM, pairs: Sequence[dict[str, Any]], dataset_dir: str | Path | None = None
                      ) -> dict[str, float]:
    """Held-out pairwise accuracy of the judge on preference records, both presentation orders.

    A pair counts as correct only if both orders pick the chosen response; ``order_consistency``
    is the share of pairs where both orders pick the same response (right or wrong).
    ``soft_accuracy`` is the share where the order-averaged P(chosen better) exceeds 0.5.
    """
    from step3vl.eval.suite import to_prompt

    prompts = [Prompt([m for m in r["messages"] if m["role"] != "assistant"], list(r["images"]))
               if dataset_dir is None else to_prompt(r, dataset_dir) for r in pairs]
    chosen, rejected = [r["chosen"] for r in pairs], [r["rejected"] for r in pairs]
    res = genrm.compare_detailed(prompts, chosen, rejected)
    both, same, soft, valid, first = [], [], [], [], []
    per_kind: dict[str, list[float]] = {}
    for r, (p, v1, v2) in zip(pairs, res):
        pick1, pick2 = v1.p_a > 0.5, v2.p_a <= 0.5  # True = the chosen response was picked
        both.append(float(pick1 and pick2))
        same.append(float(pick1 == pick2))
        soft.append(float(p > 0.5))
        valid.extend([float(v1.valid), float(v2.valid)])
        first.append(float(v1.p_a > 0.5) + float(v2.p_a > 0.5))
        kind = str((r.get("meta") or {}).get("rejected_kind", "?"))
        per_kind.setdefault(kind, []).append(both[-1])
    out = {"accuracy": float(np.mean(both)), "order_consistency": float(np.mean(same)),
           "soft_accuracy": float(np.mean(soft)), "valid_judgments": float(np.mean(valid)),
           "picks_first": float(np.sum(first) / (2 * len(pairs))), "pairs": float(len(pairs))}
    out.update({f"accuracy/{k}": float(np.mean(v)) for k, v in sorted(per_kind.items())})
    return out


# --------------------------------------------------------------------------- RLHF reward


def abstains(text: str) -> bool:
    """Whether the final answer of ``text`` says it cannot tell."""
    from step3vl.rl.rewards import extract_final

    return bool(_ABSTAIN.search(extract_final(text)))


def is_unanswerable(record: dict[str, Any]) -> bool:
    """A prompt the input cannot answer: flagged ``meta.unanswerable``, or its reference answer abstains.

    The preference family marks these by ``meta.rejected_kind == "unanswerable"`` with the answer
    "I cannot tell…"; its ``absent_count`` pairs (answer "0") are answerable, and stay so here.
    """
    meta = record.get("meta") or {}
    if "unanswerable" in meta:
        return bool(meta["unanswerable"])
    return isinstance(record.get("answer"), str) and abstains(record["answer"])


def abstention(record: dict[str, Any], text: str) -> float:
    """Epistemic calibration: +1 abstaining / -1 answering on an unanswerable prompt; -1 abstaining on
    an answerable one (else the policy could hide in "cannot tell"); 0 otherwise."""
    says = abstains(text)
    if is_unanswerable(record):
        return 1.0 if says else -1.0
    return -1.0 if says else 0.0


def length_discipline(n_tokens: int, finish_reason: str, ref_tokens: int, factor: float = 2.0) -> float:
    """0 for a response that ended by itself within ``factor`` x the reference length; -1 for one that
    hit max tokens; in between, the excess over the allowance as a share of it (clipped to -1)."""
    if finish_reason == "length":
        return -1.0
    allowance = factor * max(ref_tokens, 1)
    return -min(1.0, max(0.0, n_tokens - allowance) / allowance)


class ReferenceAnswers:
    """The reference policy's greedy answer per prompt record, generated once and cached by id."""

    def __init__(self, engine: Any, to_prompt: Callable[[dict[str, Any]], Prompt], max_tokens: int) -> None:
        self.engine, self.to_prompt, self.max_tokens = engine, to_prompt, max_tokens
        self.cache: dict[str, Completion] = {}

    def __call__(self, records: Sequence[dict[str, Any]]) -> list[Completion]:
        todo: dict[str, dict[str, Any]] = {}
        for r in records:
            if r["id"] not in self.cache:
                todo.setdefault(r["id"], r)
        if todo:
            params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens)
            outs = self.engine.generate([self.to_prompt(r) for r in todo.values()], 1, params)
            for rid, g in zip(todo, outs):
                self.cache[rid] = g[0]
        return [self.cache[r["id"]] for r in records]


@dataclass
class RLHFReward:
    """The RLHF ``RewardFn``: GenRM preference over the reference answer plus behaviour regularisers.

    ``reward = genrm_weight * pref + verifier_weight * verifier + language_weight * language
    - repetition_weight * repetition + length_weight * length + abstention_weight * abstention``

    ``pref`` is the GenRM's P(sample better than the reference answer), both orders averaged; a
    sample identical to the reference is a tie (0.5) without asking the judge. Records without a
    verifier score 0 on ``verifier``. Every term is returned per sample in the extras.
    """

    genrm: Any  # GenRM or anything with compare(prompts, a, b) -> list[float]
    reference: Callable[[Sequence[dict[str, Any]]], list[Completion]]
    to_prompt: Callable[[dict[str, Any]], Prompt]
    genrm_weight: float = 1.0
    verifier_weight: float = 0.0
    language_weight: float = 0.1
    repetition_weight: float = 0.2
    length_weight: float = 0.1
    abstention_weight: float = 0.5
    length_factor: float = 2.0
    judge_calls: int = field(default=0, init=False)

    @classmethod
    def from_config(cls, rl: Any, genrm: Any, reference: Callable[[Sequence[dict[str, Any]]], list[Completion]],
                    to_prompt: Callable[[dict[str, Any]], Prompt], length_factor: float = 2.0) -> RLHFReward:
        return cls(genrm, reference, to_prompt, rl.genrm_weight, rl.verifier_weight, rl.language_weight,
                   rl.repetition_weight, rl.length_weight, rl.abstention_weight, length_factor)

    def __call__(self, records: Sequence[dict[str, Any]], completions: Sequence[Completion]
                 ) -> tuple[list[float], dict[str, list[float]]]:
        from step3vl.rl.rewards import language_consistency, repetition_penalty, score

        refs = self.reference(records)
        prompts: dict[str, Prompt] = {}
        pref = [0.5] * len(records)
        ask = [i for i, (c, ref) in enumerate(zip(completions, refs)) if c.text.strip() != ref.text.strip()]
        if ask and self.genrm_weight:
            for i in ask:
                if records[i]["id"] not in prompts:
                    prompts[records[i]["id"]] = self.to_prompt(records[i])
            got = self.genrm.compare([prompts[records[i]["id"]] for i in ask], [completions[i].text for i in ask],
                                     [refs[i].text for i in ask])
            self.judge_calls += len(ask)
            for i, p in zip(ask, got):
                pref[i] = float(p)
        terms: dict[str, list[float]] = {"pref": pref, "verifier": [], "language": [], "repetition": [],
                                         "length": [], "abstention": []}
        for r, c, ref in zip(records, completions, refs):
            terms["verifier"].append(score(c.text, r) if "reward" in r else 0.0)
            terms["language"].append(language_consistency(prompt_text(r["messages"]), c.text))
            terms["repetition"].append(repetition_penalty(c.text))
            terms["length"].append(length_discipline(len(c.token_ids), c.finish_reason, len(ref.token_ids),
                                                     self.length_factor))
            terms["abstention"].append(abstention(r, c.text))
        rewards = [self.genrm_weight * p + self.verifier_weight * v + self.language_weight * lang
                   - self.repetition_weight * rep + self.length_weight * ln + self.abstention_weight * ab
                   for p, v, lang, rep, ln, ab in zip(*(terms[k] for k in ("pref", "verifier", "language",
                                                                           "repetition", "length", "abstention")))]
        return rewards, terms


__all__ = [
    "GenRM",
    "GenRMSettings",
    "JUDGE_QUESTION",
    "RLHFReward",
    "ReferenceAnswers",
    "Verdict",
    "abstains",
    "abstention",
    "clean_response",
    "genrm_records",
    "is_unanswerable",
    "judge_messages",
    "judgment",
    "length_discipline",
    "pairwise_accuracy",
    "prompt_text",
    "reason_for",
]
