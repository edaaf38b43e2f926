"""The STEP3-VL model: PE vision encoder → conv downsampler → linear projector → Qwen3 decoder.

Top-level parameter names are ``vision_model.*``, ``vit_large_projector.*``, ``model.*`` and
``lm_head.*`` — exactly the Hugging Face layout vLLM's ``StepVLForConditionalGeneration`` loads,
so exporting a checkpoint for vLLM is an identity mapping of weight names.

Images enter the token stream as ``<im_patch>`` placeholder tokens; ``embed`` replaces those
positions, left to right, with projected patch embeddings of the views in ``view_order``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from step3vl.config import ModelConfig, TextConfig

IGNORE_INDEX = -100


class ImageBatch(Protocol):
    """What the model needs from the image processor's output (see ``model.processor``)."""

    global_pixels: torch.Tensor  # (N, 3, S, S)
    crop_pixels: torch.Tensor  # (M, 3, C, C), M may be 0
    view_order: Sequence[tuple[str, int]]  # ("global"|"crop", index) in placeholder order


def qwen3_config(text: TextConfig) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        max_position_embeddings=text.max_position_embeddings,
        rope_theta=text.rope_theta,
        rms_norm_eps=text.rms_norm_eps,
        tie_word_embeddings=text.tie_word_embeddings,
        attention_dropout=text.attention_dropout,
        use_cache=True,
        attn_implementation="sdpa",
    )


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    n_loss_tokens: int = 0
    cache: Any = None


class Step3VL(nn.Module):
    """One architecture, any size (sizes come from ``ModelConfig``)."""

    def __init__(self, cfg: ModelConfig, image_token_id: int) -> None:
        super().__init__()
        from step3vl.model.vision import PerceptionEncoder

        self.cfg = cfg
        self.image_token_id = image_token_id
        self.vision_model = PerceptionEncoder(cfg.vision)
        self.vit_large_projector = nn.Linear(4 * cfg.vision.width, cfg.text.hidden_size, bias=cfg.projector_bias)
        lm = Qwen3ForCausalLM(qwen3_config(cfg.text))
        self.model = lm.model
        self.lm_head = lm.lm_head
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ images

    def encode_images(self, images: ImageBatch) -> torch.Tensor:
        """All views → (total image tokens, hidden), concatenated in ``view_order``."""
        per_kind: dict[str, torch.Tensor] = {}
        for kind, pixels in (("global", images.global_pixels), ("crop", images.crop_pixels)):
            if pixels is not None and pixels.numel():
                feats = self.vision_model(pixels.to(self.vit_large_projector.weight.device))
                per_kind[kind] = self.vit_large_projector(feats)  # (B, T, hidden)
        parts = []
        for kind, idx in images.view_order:
            if kind not in per_kind or idx >= per_kind[kind].shape[0]:
                raise ValueError(f"view_order refers to missing {kind} view #{idx}")
            parts.append(per_kind[kind][idx])
        if not parts:
            return torch.zeros(0, self.cfg.text.hidden_size, device=self.lm_head.weight.device)
        return torch.cat(parts, dim=0)

    def embed(self, input_ids: torch.Tensor, images: ImageBatch | None = None) -> torch.Tensor:
        is_img = input_ids == self.image_token_id
        n_slots = int(is_img.sum())
        ids = input_ids.masked_fill(is_img, 0)
        embeds = self.model.embed_tokens(ids)
        if images is None:
            if n_slots:
                raise ValueError(f"input has {n_slots} <im_patch> tokens but no images were given")
            return embeds
        feats = self.encode_images(images).to(embeds.dtype)
        if feats.shape[0] != n_slots:
            raise ValueError(f"images give {feats.shape[0]} patch embeddings but the text has {n_slots} <im_patch> slots")
        # out-of-place scatter keeps the graph clean for autograd
        return embeds.masked_scatter(is_img.unsqueeze(-1), feats)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        images: ImageBatch | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        cache: Any = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> VLMOutput:
        """Causal LM forward. ``labels`` align with ``input_ids`` (IGNORE_INDEX where there is no loss);
        they are shifted here so that position t predicts token t+1."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, images)
        use_cache = use_cache or cache is not None
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        h = out.last_hidden_state
        loss = None
        n = 0
        if labels is not None:
            tgt = labels[:, 1:]
            sel = tgt != IGNORE_INDEX
            n = int(sel.sum())
            hs = h[:, :-1][sel]
            # logits only where there is a target: the vocab projection dominates small models
            logits_sel = self.lm_head(hs).float()
            loss = F.cross_entropy(logits_sel, tgt[sel], reduction="mean") if n else h.sum() * 0.0
        logits = self.lm_head(h) if return_logits else None
        return VLMOutput(loss=loss, logits=logits, hidden_states=h, n_loss_tokens=n,
                         cache=out.cache)


def build_model(cfg: ModelConfig, image_token_id: int, device: str | torch.device | None = None) -> Step3VL:
    """Build a randomly initialised model (``device="meta"`` for size accounting without memory)."""
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            return Step3VL(cfg, image_token_id)
    model = Step3VL(cfg, image_token_id)
    return model.to(device) if device is not None else model
