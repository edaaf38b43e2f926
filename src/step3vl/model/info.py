"""Size, FLOPs and memory accounting for any model config, built on the meta device (no memory).

Formulas (stated so a reader can check them):
- decoder training FLOPs/token = 6·N_dec + 12·L·d_attn·seq  (Kaplan et al.: 2N forward + 4N backward
  for the weight matmuls, plus QKᵀ and AV, no causal discount). N_dec counts every decoder weight used
  in a matmul — the input embedding is a lookup and is excluded, the LM head is included.
- vision training FLOPs/view = 6·N_vis·T + 12·L_v·w·T² + 6·Σ_conv(params·outputs), T = (side/patch)²
- ZeRO-3 bf16 model states per GPU = 16·P / G bytes (bf16 weights 2 + bf16 grads 2 + fp32 master 4
  + Adam m 4 + v 4, all partitioned over G GPUs).
- activations per GPU with full activation checkpointing = L·b·s·h·2 (checkpointed layer inputs)
  + b·s·h·34 (one layer recomputed, flash attention: no s² term; Korthikanti et al. 2022)
  + b·s·V·4 (fp32 logits for the loss) + 2 layers of gathered bf16 parameters (ZeRO-3 prefetch).
- a stage's model file = 4·P bytes (fp32 weights; a tied embedding is stored under both its names, +4·V·h);
  a training checkpoint = the model file + 8·P (AdamW's two fp32 moments; the recipe trains every parameter).
- a TrainJob node's temp space at its peak = the model file (the stage's starting model) + 2 checkpoints: the one
  it resumed from (one copy per node, in the node's cache) and the one rank 0 builds before uploading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from step3vl.config import ModelConfig

GIB = 1024**3


@dataclass(frozen=True)
class ModelInfo:
    name: str
    total_params: int
    vision_params: int
    projector_params: int
    decoder_params: int
    decoder_embedding_params: int
    flops_per_token: float
    vision_flops_per_image: float
    image_tokens_per_image: int
    seq_len: int
    gpus: int
    micro_batch: int
    memory: dict[str, float]
    formulas: dict[str, str]
    decoder: dict[str, Any]
    storage: dict[str, float] = field(default_factory=dict)  # GiB on disk: model file, checkpoint, a node's temp

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _count(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _view_tokens(side: int, patch: int) -> int:
    return (side // patch) ** 2


def model_info(cfg: ModelConfig, *, gpus: int = 8, seq_len: int = 4096, micro_batch: int = 1) -> ModelInfo:
    """Build ``cfg`` on the meta device and account for its parameters, FLOPs and memory."""
    from step3vl.model.vlm import build_model

    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    model = build_model(cfg, image_token_id=0, device="meta")
    vm = model.vision_model
    down = _count(vm.vit_downsampler1) + _count(vm.vit_downsampler2)
    vision = _count(vm) - down
    projector = down + _count(model.vit_large_projector)
    decoder = _count(model.model) + (0 if cfg.text.tie_word_embeddings else _count(model.lm_head))
    total = _count(model)
    assert total == vision + projector + decoder, (total, vision, projector, decoder)

    t = cfg.text
    embed = t.vocab_size * t.hidden_size
    norms = sum(p.numel() for n, p in model.model.named_parameters() if "norm" in n)
    # the LM head is a matmul even when tied to the embedding
    n_dec_matmul = decoder - embed - norms + (embed if t.tie_word_embeddings else 0)
    d_attn = t.num_attention_heads * t.head_dim
    flops_token = 6 * n_dec_matmul + 12 * t.num_hidden_layers * d_attn * seq_len

    v = cfg.vision
    vis_norms = sum(p.numel() for n, p in vm.named_parameters() if "ln" in n or "gamma" in n or "embedding" in n)
    n_vis_matmul = vision - vis_norms

    def view_flops(side: int) -> float:
        tokens = _view_tokens(side, v.patch_size)
        grid = side // v.patch_size
        conv1_out, conv2_out = math.ceil(grid / 2) ** 2, math.ceil(grid / 4) ** 2
        conv = 6 * (_count(vm.vit_downsampler1) * conv1_out + _count(vm.vit_downsampler2) * conv2_out)
        proj = 6 * _count(model.vit_large_projector) * conv2_out
        return 6 * n_vis_matmul * tokens + 12 * v.layers * v.width * tokens**2 + conv + proj

    img_flops = view_flops(v.image_size) + v.max_crops * view_flops(v.crop_size)
    img_tokens = (v.image_size // v.patch_size // 4) ** 2 + v.max_crops * (v.crop_size // v.patch_size // 4) ** 2

    b, s, h = micro_batch, seq_len, t.hidden_size
    states = 16 * total / gpus
    act_ckpt = t.num_hidden_layers * b * s * h * 2
    act_layer = b * s * h * 34
    logits = b * s * t.vocab_size * 4
    layer_params = (decoder - embed * (1 if t.tie_word_embeddings else 2)) / t.num_hidden_layers
    gathered = 2 * layer_params * 2
    per_gpu = states + act_ckpt + act_layer + logits + gathered
    memory = {
        "model_states_gib_per_gpu": states / GIB,
        "activations_gib_per_gpu": (act_ckpt + act_layer + logits) / GIB,
        "gathered_params_gib_per_gpu": gathered / GIB,
        "total_gib_per_gpu": per_gpu / GIB,
    }
    model_file = 4 * (total + (embed if t.tie_word_embeddings else 0))
    checkpoint = model_file + 8 * total
    storage = {
        "model_file_gib": model_file / GIB,
        "checkpoint_gib": checkpoint / GIB,
        "trainjob_node_tmp_gib": (model_file + 2 * checkpoint) / GIB,
    }
    formulas = {
        "flops_per_token": "6*N_dec_matmul + 12*L*d_attn*seq",
        "vision_flops_per_image": "sum over views of 6*N_vis*T + 12*L_v*w*T^2 + conv/projector matmuls",
        "model_states": "16 bytes * total_params / gpus  (ZeRO-3, bf16 + fp32 master + Adam m,v)",
        "activations": "L*b*s*h*2 + 34*b*s*h + 4*b*s*V  (full activation checkpointing, flash attention)",
        "gathered_params": "2 layers * 2 bytes * params/layer  (ZeRO-3 prefetch)",
        "model_file": "4 bytes * total_params (+ 4 * V*h for a tied embedding, stored under both names)",
        "checkpoint": "model_file + 8 bytes * total_params  (AdamW m, v in fp32)",
        "trainjob_node_tmp": "model_file + 2 * checkpoint  (starting model + checkpoint resumed from + one being saved)",
    }
    return ModelInfo(
        name=cfg.name,
        total_params=total,
        vision_params=vision,
        projector_params=projector,
        decoder_params=decoder,
        decoder_embedding_params=embed,
        flops_per_token=float(flops_token),
        vision_flops_per_image=float(img_flops),
        image_tokens_per_image=img_tokens,
        seq_len=seq_len,
        gpus=gpus,
        micro_batch=micro_batch,
        memory=memory,
        formulas=formulas,
        storage=storage,
        decoder={
            "layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "intermediate_size": t.intermediate_size,
            "vocab_size": t.vocab_size,
        },
    )
