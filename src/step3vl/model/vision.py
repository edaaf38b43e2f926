"""PE-style ViT vision encoder with the STEP3-VL conv downsampler.

Module and parameter names follow vLLM's ``step_vl.py`` (``conv1``, ``transformer.resblocks.{i}``
with fused ``attn.in_proj_weight``, ``ls_1.gamma``, ``mlp.c_fc``/``c_proj``, ``vit_downsampler1/2``)
so a checkpoint exports to the layout vLLM serves natively with an identity mapping.

Fully trainable: nothing here is frozen, as in the recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from step3vl.config import VisionConfig


def _rotate_half_interleaved(x: torch.Tensor) -> torch.Tensor:
    # pairs (x0, x1) → (-x1, x0), as in PE / vLLM's rotate_half with "(d r)" interleaving
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope2d_freqs(head_dim: int, grid_h: int, grid_w: int, theta: float, use_cls_token: bool) -> torch.Tensor:
    """Angles (tokens, head_dim): half of each head rotates with the column, half with the row."""
    half = head_dim // 2  # each axis gets half of the head
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
    rows = torch.arange(grid_h, dtype=torch.float32) + (1 if use_cls_token else 0)
    cols = torch.arange(grid_w, dtype=torch.float32) + (1 if use_cls_token else 0)
    fh = torch.repeat_interleave(torch.outer(rows, inv_freq), 2, dim=-1)[:, None].expand(grid_h, grid_w, -1)
    fw = torch.repeat_interleave(torch.outer(cols, inv_freq), 2, dim=-1)[None, :].expand(grid_h, grid_w, -1)
    freqs = torch.cat([fw, fh], dim=-1).reshape(grid_h * grid_w, -1)
    if use_cls_token:
        freqs = torch.cat([torch.zeros(1, freqs.shape[-1]), freqs], dim=0)
    return freqs


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Bidirectional multi-head attention with fused QKV (``in_proj_*``) and 2D RoPE."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        if freqs is not None:
            cos, sin = freqs.cos().to(q.dtype), freqs.sin().to(q.dtype)
            q = q * cos + _rotate_half_interleaved(q) * sin
            k = k * cos + _rotate_half_interleaved(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        if act not in ("gelu", "quick_gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"vision hidden_act '{act}' is not supported (gelu, quick_gelu, gelu_pytorch_tanh)")
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.act == "quick_gelu":
            h = h * torch.sigmoid(1.702 * h)
        else:
            h = F.gelu(h, approximate="tanh" if self.act == "gelu_pytorch_tanh" else "none")
        return self.c_proj(h)


class ResBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ls_1 = LayerScale(cfg.width, cfg.ls_init_value) if cfg.ls_init_value else nn.Identity()
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.hidden_act)
        self.ls_2 = LayerScale(cfg.width, cfg.ls_init_value) if cfg.ls_init_value else nn.Identity()

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), freqs))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(cfg) for _ in range(cfg.layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, freqs, use_reentrant=False)
            else:
                x = block(x, freqs)
        return x


class PerceptionEncoder(nn.Module):
    """Image views (B, 3, S, S) → downsampled features (B, (S/patch/4)², 4·width)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if not cfg.use_rope2d:
            raise ValueError("vision.use_rope2d must be true (vLLM's step_vl requires it)")
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = w**-0.5
        self.grid = cfg.image_size // cfg.patch_size
        if cfg.use_cls_token:
            self.class_embedding = nn.Parameter(scale * torch.randn(w))
        if cfg.use_abs_posemb:
            self.positional_embedding = nn.Parameter(scale * torch.randn(int(cfg.use_cls_token) + self.grid**2, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps) if cfg.use_ln_pre else nn.Identity()
        self.transformer = Transformer(cfg)
        self.ln_post = nn.LayerNorm(w, eps=cfg.layer_norm_eps) if cfg.use_ln_post else nn.Identity()
        # the recipe's projector convs (k3 s2, channels x2 then x4); vLLM keeps them in the vision tower
        self.vit_downsampler1 = nn.Conv2d(w, 2 * w, kernel_size=3, stride=2, padding=1)
        self.vit_downsampler2 = nn.Conv2d(2 * w, 4 * w, kernel_size=3, stride=2, padding=1)

    def _abs_posemb(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.positional_embedding
        if gh == self.grid and gw == self.grid:
            return pos[None]
        cls = None
        if self.cfg.use_cls_token:
            cls, pos = pos[:1], pos[1:]
        pos = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(gh, gw), mode="bilinear", align_corners=False)
        pos = pos.permute(0, 2, 3, 1).reshape(gh * gw, -1)
        if cls is not None:
            pos = torch.cat([cls, pos], dim=0)
        return pos[None]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        gh, gw = h // self.cfg.patch_size, w // self.cfg.patch_size
        if gh != gw:
            raise ValueError(f"vision views must be square, got {h}x{w}")
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, gh*gw, width)
        if self.cfg.use_cls_token:
            x = torch.cat([self.class_embedding.view(1, 1, -1).expand(b, -1, -1), x], dim=1)
        if self.cfg.use_abs_posemb:
            x = x + self._abs_posemb(gh, gw)
        freqs = rope2d_freqs(x.shape[-1] // self.cfg.heads, gh, gw, self.cfg.rope_theta, self.cfg.use_cls_token)
        x = self.transformer(self.ln_pre(x), freqs.to(x.device))
        x = self.ln_post(x)
        if self.cfg.use_cls_token:
            x = x[:, 1:]
        x = x.transpose(1, 2).reshape(b, -1, gh, gw)
        # no nonlinearity between the two downsamplers, as in the reference implementation
        x = self.vit_downsampler2(self.vit_downsampler1(x))
        return x.flatten(2).transpose(1, 2)  # (B, (gh/4)*(gw/4), 4*width), row-major
