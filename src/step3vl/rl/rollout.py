"""Rollout engines: ``generate(prompts, n, params) -> completions`` with token ids and logprobs.

Backends: ``torch`` (the embedded default: batched sampling with a KV cache, each prompt prefilled
once and its cache shared by its ``n`` samples) and ``vllm`` (GPU machines; an optional extra).
Asking for ``vllm`` where it is not installed is an error, never a silent switch to torch.

Logprobs are of the sampled tokens under the model's temperature-1 distribution over the tokens it
may generate (image placeholders and turn openers are never sampled): the behaviour policy RL
needs, whatever temperature/top-p/top-k shaped the sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from step3vl.devices import generator, module_device, sample_on, to_device
from step3vl.errors import Step3VLError


class RolloutError(Step3VLError):
    """A rollout backend cannot be used as configured."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 32
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Prompt:
    """A chat ending with a user turn; ``images`` fill its ``<image>`` markers in order."""

    messages: list[dict[str, str]]
    images: list[Any] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Prompt], n: int = 1, params: SamplingParams = SamplingParams()
                 ) -> list[list[Completion]]: ...

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...


@dataclass
class _Images:
    global_pixels: torch.Tensor
    crop_pixels: torch.Tensor
    view_order: list[tuple[str, int]]

    def to(self, device: torch.device | str) -> _Images:
        """The same images with their pixels on ``device``."""
        return _Images(self.global_pixels.to(device), self.crop_pixels.to(device), self.view_order)


def merge_images(parts: Sequence[Any], vision: Any) -> _Images | None:
    """Concatenate several ``ProcessedImages`` (one per prompt) into one batch, re-indexing views."""
    g, c, order = [], [], []
    ng = nc = 0
    for p in parts:
        if p is None:
            continue
        g.append(p.global_pixels)
        c.append(p.crop_pixels)
        order.extend((k, i + (ng if k == "global" else nc)) for k, i in p.view_order)
        ng += p.global_pixels.shape[0]
        nc += p.crop_pixels.shape[0]
    if not order:
        return None
    return _Images(
        torch.cat(g) if g else torch.zeros(0, 3, vision.image_size, vision.image_size),
        torch.cat(c) if c else torch.zeros(0, 3, vision.crop_size, vision.crop_size),
        order,
    )


def encode_prompt(p: Prompt, tokenizer: Any, processor: Any) -> tuple[list[int], Any]:
    """Token ids of the prompt (chat template + generation prompt) and its processed images."""
    from step3vl.model.tokenizer import IMAGE_TOKEN, encode_chat

    it = iter(p.images)
    msgs = []
    used = []
    for m in p.messages:
        content = m["content"]
        k = content.count(IMAGE_TOKEN)
        if k:
            mine = [next(it) for _ in range(k)]
            used.extend(mine)
            content = processor.expand_text(content, mine)
        msgs.append({"role": m["role"], "content": content})
    if next(it, None) is not None:
        raise ValueError("more images than <image> markers in the prompt")
    ids, _ = encode_chat(tokenizer, msgs, add_generation_prompt=True)
    return ids, (processor(used) if used else None)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``. A temperature so small that the division overflows, or that is 0 in
    float32 (1e-300 is a valid request), is taken at its limit: each row's largest logits share all the
    mass (greedy, ties shared), instead of a softmax over inf/nan."""
    out = logits / temperature
    if not torch.isfinite(out.amax(-1)).all():
        out = torch.where(logits == logits.amax(-1, keepdim=True), 0.0, float("-inf"))
    return out


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        remove = cum - probs > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


class TorchEngine:
    """Batched KV-cache sampling on the training model itself, on the model's device (the CPU or one GPU).

    Token bookkeeping (stops, texts) stays on the host: each decoding step brings its sampled tokens and their
    log-probs back in one transfer."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any, *, max_batch: int = 512) -> None:
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.max_batch = max_batch
        self.pad_id = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        self.eos_ids = {int(tokenizer.convert_tokens_to_ids("<|im_end|>")), self.pad_id}
        # image placeholders and turn openers are never generated: an <im_patch> fed back would
        # ask for an image embedding that does not exist
        from step3vl.model.tokenizer import (
            CHAT_START, IMAGE_END, IMAGE_PATCH, IMAGE_START, IMAGE_TOKEN, PATCH_END, PATCH_NEWLINE, PATCH_START,
        )

        self.banned = torch.tensor(tokenizer.convert_tokens_to_ids(
            [CHAT_START, IMAGE_TOKEN, IMAGE_START, IMAGE_END, IMAGE_PATCH, PATCH_START, PATCH_END, PATCH_NEWLINE]))
        self._banned = self.banned  # its copy on the model's device
        self.stats: dict[str, float] = {"prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0}

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The torch engine samples from the live training model: nothing to copy."""

    def _prefill_inputs(self, enc: list[tuple[list[int], Any]]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Left-padded prompt ids, attention mask, positions and merged images, on the model's device."""
        dev = module_device(self.model)
        lens = [len(ids) for ids, _ in enc]
        L = max(lens)
        ids = torch.full((len(enc), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for r, (toks, _) in enumerate(enc):
            ids[r, L - len(toks):] = torch.tensor(toks)
            mask[r, L - len(toks):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        images = merge_images([im for _, im in enc], self.processor.vision)
        return ids.to(dev), mask.to(dev), pos.to(dev), to_device(images, dev)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, images: Any,
                cache: Any) -> torch.Tensor:
        """Run the prompts through the model into ``cache``; the float32 logits of their next token."""
        o = self.model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                       inputs_embeds=self.model.embed(ids, images), return_logits=False)
        return self.model.lm_head(o.hidden_states[:, -1]).float()

    def _sample(self, last: torch.Tensor, params: SamplingParams, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next tokens (greedy or sampled) and their temperature-1 log-probs over the tokens that may be
        generated; ``last`` (the logits) loses its banned tokens in place."""
        if self._banned.device != last.device:
            self._banned = self.banned.to(last.device)  # once: an index on the host would copy at every step
        last[:, self._banned] = float("-inf")
        logp = torch.log_softmax(last, dim=-1)
        if params.temperature <= 0:
            nxt = last.argmax(-1)
        else:
            probs = _filter_logits(_tempered(last, params.temperature), params.top_k, params.top_p).softmax(-1)
            nxt = sample_on(probs, gen)
        return nxt, logp.gather(-1, nxt[:, None]).squeeze(-1)

    def _decode(self, feed: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: feed one token per row at ``pos``; the next logits and the grown attention mask."""
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)], dim=1)
        o = self.model(feed[:, None], attention_mask=mask, position_ids=pos[:, None], cache=cache, use_cache=True,
                       return_logits=False)
        return self.model.lm_head(o.hidden_states[:, -1]).float(), mask

    def generate(self, prompts: Sequence[Prompt], n: int = 1, params: SamplingParams = SamplingParams()
                 ) -> list[list[Completion]]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        out: list[list[Completion]] = []
        per_chunk = max(1, self.max_batch // n)
        gen = generator(module_device(self.model),
                        params.seed % 2**64 if params.seed is not None else torch.seed() % 2**63)
        for i in range(0, len(prompts), per_chunk):
            out.extend(self._generate_chunk(list(prompts[i : i + per_chunk]), n, params, gen))
        return out

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[Prompt], n: int, params: SamplingParams,
                        gen: torch.Generator) -> list[list[Completion]]:
        t0 = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        enc = [encode_prompt(p, self.tokenizer, self.processor) for p in prompts]
        lens = [len(ids) for ids, _ in enc]
        ids, mask, pos, images = self._prefill_inputs(enc)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.model.config)
        last = self._prefill(ids, mask, pos, images, cache)
        # share each prompt's prefill across its n samples
        if n > 1:
            cache.batch_repeat_interleave(n)
            last = last.repeat_interleave(n, 0)
            mask = mask.repeat_interleave(n, 0)
            pos = pos.repeat_interleave(n, 0)
        B = last.shape[0]
        next_pos = pos[:, -1] + 1
        done = torch.zeros(B, dtype=torch.bool)  # on the host, like the token lists
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        finish = ["length"] * B
        texts = [""] * B
        for t in range(params.max_tokens):
            nxt, chosen_lp = self._sample(last, params, gen)
            nxt_host, lp_host = nxt.tolist(), chosen_lp.tolist()  # one device-to-host transfer per step
            for b in range(B):
                if done[b]:
                    continue
                tok = nxt_host[b]
                if tok in self.eos_ids:
                    done[b] = True
                    finish[b] = "stop"
                    continue
                tokens[b].append(tok)
                logps[b].append(lp_host[b])
                if params.stop:
                    text = self.tokenizer.decode(tokens[b], skip_special_tokens=True)
                    hit = [text.index(s) for s in params.stop if s in text]
                    if hit:
                        texts[b] = text[: min(hit)]
                        done[b] = True
                        finish[b] = "stop"
            if bool(done.all()) or t == params.max_tokens - 1:
                break
            last, mask = self._decode(nxt.masked_fill(done.to(nxt.device), self.pad_id), mask, next_pos, cache)
            next_pos = next_pos + 1
        model.train(was_training)
        results: list[list[Completion]] = []
        for pi in range(len(prompts)):
            group = []
            for j in range(n):
                b = pi * n + j
                text = texts[b] if texts[b] else self.tokenizer.decode(tokens[b], skip_special_tokens=True)
                group.append(Completion(text, tokens[b], logps[b], finish[b], lens[pi]))
            results.append(group)
        self.stats["prompt_tokens"] += sum(lens)
        self.stats["generated_tokens"] += sum(len(t) for t in tokens)
        self.stats["seconds"] += time.perf_counter() - t0
        return results


def make_engine(backend: str, model: Any, tokenizer: Any, processor: Any, **kwargs: Any) -> RolloutEngine:
    """The configured backend; ``vllm`` must be installed (its own extra/image), else a clear error."""
    if backend == "torch":
        return TorchEngine(model, tokenizer, processor, **kwargs)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RolloutError(
                "rollout backend 'vllm' was asked for but vLLM is not installed in this environment; "
                "install the step3vl[vllm] extra in its own environment (or use images/serve), or set "
                "rollout.backend=torch"
            ) from None
        raise RolloutError(
            "rollout backend 'vllm' is not available in this step3vl build yet (the trainer-to-vLLM weight "
            "sync is unwritten); use rollout.backend=torch for RL, and `step3vl export` + `vllm serve` for serving"
        )
    raise RolloutError(f"unknown rollout backend '{backend}' (torch, vllm)")
