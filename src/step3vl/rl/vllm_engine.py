"""The ``vllm`` rollout backend: RL rollouts on vLLM, colocated with the trainer on the stage's GPU.

Written against vLLM's offline API (``vllm.LLM``, ``SamplingParams``, ``LLM.collective_rpc`` with a
``worker_extension_cls``, sleep mode) as the ``vllm`` extra pins it; **never run with vLLM** here: vLLM cannot be
installed beside this project's torch, and no GPU session has had it. The tests drive it against a stand-in.

- **Start:** the stage's starting checkpoint is exported to vLLM's layout (``step3vl.serve.export``; the weight
  names are vLLM's own, so the export is an identity mapping) and loaded by an in-process engine
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: weights are handed over by reference, not pickled to another process).
- **Generate:** text prompts go in as the token ids the torch engine would feed (the same chat template); prompts
  with images as the rendered text with its ``<image>`` markers plus the images, which vLLM's Step3-VL processor
  expands (it supports the 10B geometry only: other geometries are refused with a clear error). Image
  placeholders and turn openers are never sampled (``allowed_token_ids``). Log-probs are vLLM's (of the raw
  logits); the RL loop recomputes the old log-probs with the trainer anyway.
- **Sync:** after each update the loop hands the policy's weights to :meth:`VLLMEngine.sync_weights`, which loads
  them into vLLM's model through :class:`WeightSync` (``model.load_weights``). Between rollouts the engine sleeps
  (level 1: KV cache freed, weights offloaded), so the update has the GPU's memory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from step3vl.rl.rollout import Completion, Prompt, RolloutError, SamplingParams

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine core in this process: weights by reference


def require_vllm() -> Any:
    """The ``vllm`` module, or a clear error where it is not installed (never a silent switch to torch)."""
    try:
        import vllm
    except ImportError:
        raise RolloutError(
            "rollout backend 'vllm' was asked for but vLLM is not installed in this environment; install the "
            "step3vl[vllm] extra in its own environment (images/), or set rollout backend torch") from None
    return vllm


class WeightSync:
    """Methods vLLM adds to its GPU worker (``worker_extension_cls``), called through ``LLM.collective_rpc``."""

    model_runner: Any  # the worker's, set by vLLM

    def step3vl_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Load ``(name, tensor)`` pairs (the checkpoint's names, which are vLLM's) into the served model."""
        self.model_runner.model.load_weights(weights=iter(weights))
        return len(weights)


class VLLMEngine:
    """A :class:`~step3vl.rl.rollout.RolloutEngine` on vLLM (see the module)."""

    def __init__(self, model_dir: str | Path, tokenizer: Any, processor: Any, *, images_supported: bool,
                 tied_embeddings: bool, gpu_memory_utilization: float = 0.3, sleep: bool = True,
                 max_model_len: int | None = None) -> None:
        vllm = require_vllm()
        from step3vl.model.tokenizer import (
            CHAT_START, IMAGE_END, IMAGE_PATCH, IMAGE_START, IMAGE_TOKEN, PATCH_END, PATCH_NEWLINE, PATCH_START,
        )

        os.environ.update(ENGINE_ENV)
        self._vllm = vllm
        self.tokenizer, self.processor = tokenizer, processor
        self.images_supported, self.tied_embeddings = images_supported, tied_embeddings
        self.eos_ids = {int(tokenizer.convert_tokens_to_ids("<|im_end|>")),
                        int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))}
        banned = set(tokenizer.convert_tokens_to_ids(
            [CHAT_START, IMAGE_TOKEN, IMAGE_START, IMAGE_END, IMAGE_PATCH, PATCH_START, PATCH_END, PATCH_NEWLINE]))
        self.allowed = [i for i in range(len(tokenizer)) if i not in banned]
        self.sleep_between = sleep
        self.asleep = False
        self.stats: dict[str, float] = {"prompt_tokens": 0, "generated_tokens": 0, "seconds": 0.0}
        self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), trust_remote_code=True,
                            dtype="bfloat16", gpu_memory_utilization=gpu_memory_utilization,
                            enable_sleep_mode=sleep, max_model_len=max_model_len,
                            worker_extension_cls=f"{WeightSync.__module__}.{WeightSync.__qualname__}")

    @classmethod
    def from_checkpoint(cls, checkpoint_uri: str, tokenizer: Any, processor: Any, cfg: Any, *,
                        workdir: str | Path | None = None, **kwargs: Any) -> VLLMEngine:
        """Export ``checkpoint_uri`` (the stage's starting model) to vLLM's layout under ``workdir`` (a temporary
        folder by default) and start the engine on it."""
        from step3vl.serve.export import export_hf, vllm_images_supported

        require_vllm()  # before the export
        out = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="step3vl-vllm-"))
        export_hf(checkpoint_uri, out / "model", dtype="bfloat16", overwrite=True)
        return cls(out / "model", tokenizer, processor, images_supported=vllm_images_supported(cfg),
                   tied_embeddings=bool(cfg.text.tie_word_embeddings), **kwargs)

    # ------------------------------------------------------------------ RolloutEngine
    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the policy's current weights into vLLM's model (in place, in bf16)."""
        self._wake()
        weights = [(k, v.detach().to(torch.bfloat16)) for k, v in state_dict.items()
                   if not (self.tied_embeddings and k == "lm_head.weight")]  # tied: vLLM ties it to the embedding
        self.llm.collective_rpc("step3vl_load_weights", args=(weights,))

    def generate(self, prompts: Sequence[Prompt], n: int = 1, params: SamplingParams = SamplingParams()
                 ) -> list[list[Completion]]:
        import time

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        t0 = time.perf_counter()
        self._wake()
        sp = self._vllm.SamplingParams(
            n=n, temperature=max(params.temperature, 0.0), top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_tokens,
            stop=list(params.stop) or None, seed=params.seed, logprobs=0, allowed_token_ids=self.allowed,
            skip_special_tokens=True)
        outs = self.llm.generate([self._input(p) for p in prompts], sp, use_tqdm=False)
        if self.sleep_between:
            self.llm.sleep(level=1)  # frees the KV cache and offloads the weights: the update gets the GPU
            self.asleep = True
        results = [[self._completion(c, len(o.prompt_token_ids)) for c in o.outputs] for o in outs]
        self.stats["prompt_tokens"] += sum(len(o.prompt_token_ids) for o in outs)
        self.stats["generated_tokens"] += sum(len(c.token_ids) for g in results for c in g)
        self.stats["seconds"] += time.perf_counter() - t0
        return results

    # ------------------------------------------------------------------ helpers
    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _input(self, p: Prompt) -> dict[str, Any]:
        """vLLM's input for one prompt: the torch engine's token ids, or text and images for vLLM to expand."""
        from step3vl.model.tokenizer import encode_chat

        if not p.images:
            ids, _ = encode_chat(self.tokenizer, p.messages, add_generation_prompt=True)
            return {"prompt_token_ids": ids}
        if not self.images_supported:
            raise RolloutError(
                "rollout backend 'vllm' got a prompt with images, but vLLM's Step3-VL processor supports only the "
                "10B image geometry (728 px views, patch 14) and this model's differs; use rollout backend torch")
        text = self.tokenizer.apply_chat_template([dict(m) for m in p.messages], add_generation_prompt=True,
                                                  tokenize=False)
        return {"prompt": text, "multi_modal_data": {"image": list(p.images)}}

    def _completion(self, c: Any, prompt_tokens: int) -> Completion:
        """A vLLM ``CompletionOutput`` as the torch engine reports it: no end-of-turn token among the ids."""
        ids = list(c.token_ids)
        if len(c.logprobs or []) != len(ids):
            raise RolloutError(f"vLLM returned {len(c.logprobs or [])} log-probs for {len(ids)} tokens")
        lps = [d[t].logprob for t, d in zip(ids, c.logprobs)]
        while ids and ids[-1] in self.eos_ids:
            ids.pop()
        finish = "stop" if c.finish_reason == "stop" else "length"
        return Completion(c.text, ids, lps[: len(ids)], finish, prompt_tokens)
