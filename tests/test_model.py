"""The model family: 10B accounting on the meta device, tiny forward/backward on CPU."""

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from step3vl import config
from step3vl.config import ModelConfig
from step3vl.model.info import model_info
from step3vl.model.vlm import IGNORE_INDEX, build_model

CONF = Path(__file__).resolve().parent.parent / "conf"
IMAGE_TOKEN = 5


@dataclass
class Images:
    global_pixels: torch.Tensor
    crop_pixels: torch.Tensor
    view_order: list


def tiny_cfg() -> ModelConfig:
    return config.load(ModelConfig, CONF / "model/tiny.yaml")


# runs the CLI, then reports the peak resident memory of its own address space (VmHWM, kB). getrusage's ru_maxrss
# will not do: Linux carries it across exec, so a child started from the test process starts at the test's size
_PEAK = ("import runpy, sys\n"
         "sys.argv = ['step3vl'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('step3vl.cli', run_name='__main__')\n"
         "finally:\n"
         "    print(next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')),"
         " file=sys.stderr)\n")


def test_10b_info_cli_matches_recipe():
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, "model", "info", "--config", str(CONF / "model/step3vl-10b.yaml"),
         "--json", "--gpus", "16"],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.perf_counter() - t0
    info = json.loads(proc.stdout)
    peak_gib = int(proc.stderr.strip().splitlines()[-1]) / 1024**2
    assert 9.6e9 <= info["total_params"] <= 10.6e9
    assert 1.6e9 <= info["vision_params"] <= 2.0e9
    assert info["vision_params"] + info["projector_params"] + info["decoder_params"] == info["total_params"]
    d = info["decoder"]
    assert (d["layers"], d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"],
            d["intermediate_size"]) == (36, 4096, 32, 8, 12288)
    assert d["vocab_size"] >= 151_000
    # Qwen3-8B has 8.19B parameters with untied embeddings
    assert info["decoder_params"] == pytest.approx(8.19e9, rel=0.01)
    # 6N-style: at least 6 x (decoder params without the input embedding)
    assert info["flops_per_token"] >= 6 * (info["decoder_params"] - info["decoder_embedding_params"])
    assert info["gpus"] == 16 and info["memory"]["model_states_gib_per_gpu"] == pytest.approx(
        16 * info["total_params"] / 16 / 1024**3)
    assert elapsed < 20, f"model info took {elapsed:.1f}s"
    assert peak_gib < 2.0, f"model info peaked at {peak_gib:.2f} GiB"


def test_memory_scales_with_gpus():
    cfg = config.load(ModelConfig, CONF / "model/step3vl-10b.yaml")
    m8, m64 = model_info(cfg, gpus=8).memory, model_info(cfg, gpus=64).memory
    assert m8["model_states_gib_per_gpu"] == pytest.approx(8 * m64["model_states_gib_per_gpu"])
    assert m8["total_gib_per_gpu"] > m64["total_gib_per_gpu"]


def test_tiny_is_small():
    assert model_info(tiny_cfg()).total_params <= 5_000_000


def test_weight_names_match_vllm_step_vl_layout():
    names = set(build_model(tiny_cfg(), IMAGE_TOKEN, device="meta").state_dict())
    for expected in (
        "vision_model.conv1.weight", "vision_model.positional_embedding", "vision_model.ln_pre.weight",
        "vision_model.transformer.resblocks.0.attn.in_proj_weight",
        "vision_model.transformer.resblocks.0.attn.in_proj_bias",
        "vision_model.transformer.resblocks.0.attn.out_proj.weight",
        "vision_model.transformer.resblocks.0.ls_1.gamma", "vision_model.transformer.resblocks.0.mlp.c_fc.weight",
        "vision_model.transformer.resblocks.0.mlp.c_proj.weight", "vision_model.transformer.resblocks.0.ls_2.gamma",
        "vision_model.ln_post.weight", "vision_model.vit_downsampler1.weight", "vision_model.vit_downsampler2.bias",
        "vit_large_projector.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight", "lm_head.weight",
    ):
        assert expected in names, expected
    assert "vision_model.conv1.bias" not in names


def _batch(cfg: ModelConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side, crop = cfg.vision.image_size, cfg.vision.crop_size
    per_global = (side // cfg.vision.patch_size // 4) ** 2
    per_crop = (crop // cfg.vision.patch_size // 4) ** 2
    # sample 0: one image with a global view + 2 crops; sample 1: one global view only
    images = Images(
        global_pixels=torch.randn(2, 3, side, side, generator=g),
        crop_pixels=torch.randn(2, 3, crop, crop, generator=g),
        view_order=[("crop", 0), ("crop", 1), ("global", 0), ("global", 1)],
    )
    n0, n1 = 2 * per_crop + per_global, per_global
    L = 24
    ids = torch.randint(10, cfg.tokenizer.vocab_size, (2, L), generator=g)
    ids[0, 1 : 1 + n0] = IMAGE_TOKEN
    ids[1, 2 : 2 + n1] = IMAGE_TOKEN
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = IGNORE_INDEX
    return ids, images, labels


def test_tiny_forward_backward_every_parameter_gets_gradient():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg, IMAGE_TOKEN)
    ids, images, labels = _batch(cfg)
    out = model(ids, images=images, labels=labels)
    assert out.logits.shape == (2, ids.shape[1], cfg.text.vocab_size)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert any(n.startswith("vision_model.") for n, _ in model.named_parameters())


def test_image_slots_must_match_views():
    cfg = tiny_cfg()
    model = build_model(cfg, IMAGE_TOKEN)
    ids, images, labels = _batch(cfg)
    ids[1, 2] = 11  # one image slot fewer
    with pytest.raises(ValueError, match="patch embeddings but the text has"):
        model(ids, images=images)
    with pytest.raises(ValueError, match="no images were given"):
        model(ids)


def test_images_change_the_output():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg, IMAGE_TOKEN).eval()
    ids, images, _ = _batch(cfg)
    with torch.no_grad():
        a = model(ids, images=images).logits
        images.global_pixels = images.global_pixels.flip(-1)
        b = model(ids, images=images).logits
    assert not torch.allclose(a, b)
