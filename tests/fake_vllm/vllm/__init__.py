"""A stand-in for the few parts of vLLM's offline API that ``step3vl.rl.vllm_engine`` uses, backed by a step3vl
model in plain torch. It is not vLLM: it mimics what the adapter relies on, as vLLM documents it:

- ``LLM(model=<dir>, ..., worker_extension_cls="pkg.Class")``; the class's methods are the worker's, reached by
  ``collective_rpc(method, args=...)``, and the worker's ``model_runner.model.load_weights(weights=iterable)``;
- ``generate(inputs, SamplingParams, use_tqdm=False)`` with ``{"prompt_token_ids": [...]}`` inputs, returning
  ``RequestOutput(prompt_token_ids, outputs=[CompletionOutput(text, token_ids, logprobs, finish_reason)])``, the
  end-of-turn token kept at the end of ``token_ids`` when a sample stops there, one ``{token: Logprob}`` per token;
- ``n`` samples per prompt, the i-th seeded ``seed + i``; ``allowed_token_ids``; ``sleep(level)``/``wake_up()``.

``MODEL_FACTORY(model_dir) -> (torch model, tokenizer)`` is set by the test; ``INSTANCES`` holds every LLM made.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

MODEL_FACTORY: Any = None
INSTANCES: list[LLM] = []


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    stop: list[str] | None = None
    seed: int | None = None
    logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool = True


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class _Served:
    """vLLM's model object: ``load_weights`` takes (name, tensor) pairs by the checkpoint's names."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def load_weights(self, weights: Any) -> set[str]:
        params = dict(self.net.named_parameters())
        done = set()
        for name, t in weights:
            params[name].data.copy_(t.to(params[name].dtype))
            done.add(name)
        return done


class LLM:
    def __init__(self, model: str, *, worker_extension_cls: str, enable_sleep_mode: bool = False, **kwargs: Any):
        self.kwargs = {"model": model, "worker_extension_cls": worker_extension_cls,
                       "enable_sleep_mode": enable_sleep_mode, **kwargs}
        self.net, self.tokenizer = MODEL_FACTORY(model)
        module, _, name = worker_extension_cls.rpartition(".")
        worker_cls = type("Worker", (getattr(importlib.import_module(module), name),), {})
        self.worker = worker_cls()
        self.worker.model_runner = SimpleNamespace(model=_Served(self.net))
        self.asleep = False
        self.events: list[str] = []
        self.synced: list[dict[str, torch.Tensor]] = []
        self.eos = {self.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                    self.tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        INSTANCES.append(self)

    def collective_rpc(self, method: str, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        if self.asleep:
            raise RuntimeError("collective_rpc on a sleeping engine")
        self.events.append(method)
        out = getattr(self.worker, method)(*args, **(kwargs or {}))
        self.synced.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})
        return [out]

    def sleep(self, level: int = 1) -> None:
        self.events.append(f"sleep{level}")
        self.asleep = True

    def wake_up(self) -> None:
        self.events.append("wake_up")
        self.asleep = False

    @torch.no_grad()
    def generate(self, inputs: list[dict[str, Any]], sp: SamplingParams, use_tqdm: bool = True) -> list[RequestOutput]:
        if self.asleep:
            raise RuntimeError("generate on a sleeping engine")
        self.events.append("generate")
        outs = []
        for inp in inputs:
            prompt = list(inp["prompt_token_ids"])
            samples = []
            for j in range(sp.n):
                gen = torch.Generator().manual_seed((sp.seed or 0) + j)
                ids, lps, finish = [], [], "length"
                for _ in range(sp.max_tokens):
                    logits = self.net(torch.tensor([prompt + ids])).logits[0, -1].float()
                    raw = torch.log_softmax(logits, -1)
                    if sp.allowed_token_ids is not None:
                        keep = torch.full_like(logits, float("-inf"))
                        keep[sp.allowed_token_ids] = 0.0
                        logits = logits + keep
                    if sp.temperature == 0:
                        tok = int(logits.argmax())
                    else:
                        tok = int(torch.multinomial((logits / sp.temperature).softmax(-1), 1, generator=gen))
                    ids.append(tok)
                    lps.append({tok: Logprob(float(raw[tok]))})
                    if tok in self.eos:
                        finish = "stop"
                        break
                text = self.tokenizer.decode([t for t in ids if t not in self.eos], skip_special_tokens=True)
                samples.append(CompletionOutput(j, text, ids, lps, finish))
            outs.append(RequestOutput(prompt, samples))
        return outs
