"""Export a checkpoint in the Hugging Face layout vLLM's built-in STEP3-VL support loads.

``export_hf(checkpoint_uri, out_dir)`` writes::

    config.json                    architectures [StepVLForConditionalGeneration], model_type
                                   step_robotics, vision_config / text_config (Qwen3) / projector /
                                   image token, auto_map -> configuration_step_vl.StepRoboticsConfig
    configuration_step_vl.py       the config class (``step3vl.serve.hf_configuration``, verbatim)
    generation_config.json         stop tokens (<|im_end|>, <|endoftext|>)
    model.safetensors              weights under vLLM's step_vl names (or shards + index.json)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    step3vl_export.json            where it came from, and whether vLLM can take images for it

The model's parameter names already are the names vLLM loads (see ``step3vl.model.vlm``), so the
weights map one to one; a tied LM head is left out, as Hugging Face checkpoints do. Serve it with
``vllm serve OUT_DIR --trust-remote-code`` (the config class ships with the checkpoint, as with
the official ``stepfun-ai/Step3-VL-10B``). ``docs/serving.md`` has the mapping table;
:mod:`step3vl.serve.vllm_layout` the vendored spec it is checked against.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from step3vl.errors import Step3VLError
from step3vl.serve import vllm_layout

log = logging.getLogger(__name__)

EXPORT_INFO = "step3vl_export.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(Step3VLError):
    """The checkpoint cannot be expressed in the layout vLLM loads."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    weight_files: tuple[str, ...]
    n_tensors: int
    vllm_images: bool  # vLLM's processor geometry matches this model: image inputs work in vLLM


def hf_config(cfg: Any, image_token_id: int, dtype: str) -> dict[str, Any]:
    """``config.json`` for a :class:`~step3vl.config.ModelConfig` (refuses what vLLM cannot represent)."""
    from step3vl.model.vlm import qwen3_config

    v = cfg.vision
    actual = {"vision.layer_norm_eps": v.layer_norm_eps, "vision.rope_theta": v.rope_theta,
              "vision.use_rope2d": v.use_rope2d}
    for key, fixed in vllm_layout.VLLM_FIXED.items():
        if actual[key] != fixed:
            raise ExportError(f"model {key}={actual[key]} but vLLM's step_vl encoder fixes it to {fixed}")
    if v.width % v.heads:
        raise ExportError(f"vision width {v.width} is not divisible by heads {v.heads}")
    text = qwen3_config(cfg.text).to_dict()
    for k in ("_name_or_path", "transformers_version", "id2label", "label2id"):
        text.pop(k, None)
    text.update(architectures=[vllm_layout.TEXT_ARCHITECTURE], model_type="qwen3", dtype=dtype,
                rope_theta=cfg.text.rope_theta)  # rope_theta too, for readers older than rope_parameters
    return {
        "architectures": [vllm_layout.ARCHITECTURE],
        "model_type": vllm_layout.MODEL_TYPE,
        "auto_map": dict(vllm_layout.AUTO_MAP),
        "vision_config": {
            "width": v.width, "layers": v.layers, "heads": v.heads, "num_channels": 3,
            "image_size": v.image_size, "patch_size": v.patch_size, "mlp_ratio": v.mlp_ratio,
            "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
            "use_cls_token": v.use_cls_token, "use_ln_pre": v.use_ln_pre, "use_ln_post": v.use_ln_post,
            "use_abs_posemb": v.use_abs_posemb, "use_rope2d": v.use_rope2d,
            # vLLM builds layer scale unless this is None; ours is off at 0
            "ls_init_value": v.ls_init_value if v.ls_init_value else None,
            "output_dim": None, "enable_patch": v.max_crops > 0,
        },
        "text_config": text,
        "projector_bias": cfg.projector_bias,
        "image_token_id": int(image_token_id),
        "understand_projector_stride": 2,
        "hidden_size": cfg.text.hidden_size,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "dtype": dtype,
    }


def vllm_images_supported(cfg: Any) -> bool:
    g = vllm_layout.VLLM_IMAGE_GEOMETRY
    v = cfg.vision
    return (v.image_size, v.crop_size, v.patch_size) == (g["image_size"], g["crop_size"], g["patch_size"])


def _vllm_chat_template() -> str:
    """Our chat template with image parts rendered as ``<im_patch>``: the placeholder vLLM's step3_vl
    processor expands (our own processor expands ``<image>`` instead; the expansion is the same)."""
    from step3vl.model.tokenizer import CHAT_TEMPLATE, IMAGE_PATCH, IMAGE_TOKEN

    old, new = f"'{IMAGE_TOKEN}'", f"'{IMAGE_PATCH}'"
    if CHAT_TEMPLATE.count(old) != 1:
        raise ExportError("cannot find the image part in the chat template")
    return CHAT_TEMPLATE.replace(old, new)


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def export_hf(checkpoint_uri: str, out_dir: str | Path, *, dtype: str = "float32",
              max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> ExportResult:
    """Write ``checkpoint_uri`` (path, ``s3://``, ``models:/NAME@alias``) to ``out_dir`` in the
    Hugging Face layout vLLM's ``StepVLForConditionalGeneration`` loads without plugins."""
    from step3vl.checkpoint import save_safetensors
    from step3vl.model.loading import image_token_id as _image_token_id
    from step3vl.model.loading import load_model
    from step3vl.model.tokenizer import CHAT_END, PAD_TOKEN
    from step3vl.serve import hf_configuration

    if dtype not in _DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    loaded = load_model(checkpoint_uri)
    cfg, tok = loaded.cfg, loaded.tokenizer
    config = hf_config(cfg, _image_token_id(tok), dtype)

    state = loaded.model.state_dict()
    if cfg.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = vllm_layout.expected_weights(config)
    names = set(state)
    if names != set(expected):
        raise ExportError(f"weights do not match vLLM's step_vl layout: missing {sorted(set(expected) - names)[:5]}, "
                          f"unexpected {sorted(names - set(expected))[:5]}")
    tensors = {}
    for name in expected:  # vLLM's order; each tensor its own contiguous storage
        t = state[name].detach().to("cpu", _DTYPES[dtype]).contiguous().clone()
        if tuple(t.shape) != expected[name]:
            raise ExportError(f"{name} has shape {tuple(t.shape)}, vLLM expects {expected[name]}")
        tensors[name] = t

    out.mkdir(parents=True, exist_ok=True)
    shards = _shards(tensors, max_shard_bytes)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(files, shards):
        save_safetensors(shard, out / fname, {"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(hf_configuration.__file__, out / f"{vllm_layout.CONFIG_MODULE}.py")
    end_id, pad_id = (int(tok.convert_tokens_to_ids(t)) for t in (CHAT_END, PAD_TOKEN))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [end_id, pad_id], "pad_token_id": pad_id, "do_sample": True}, indent=2) + "\n")
    tok.save_pretrained(str(out))
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class every transformers release knows
    tc.pop("chat_template", None)
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(_vllm_chat_template())
    images = vllm_images_supported(cfg)
    (out / EXPORT_INFO).write_text(json.dumps({
        "source": loaded.uri, "model": cfg.name, "dtype": dtype, "vllm_images": images,
        "vllm_source": vllm_layout.SOURCE,
        "serve": f"vllm serve {out} --trust-remote-code" + ("" if images else " --limit-mm-per-prompt '{\"image\":0}'"),
    }, indent=2) + "\n")
    if not images:
        log.warning("%s: vLLM's step3_vl processor hard-codes %s; this model (%dpx/%dpx/patch %d) serves text only "
                    "in vLLM", out, vllm_layout.VLLM_IMAGE_GEOMETRY, cfg.vision.image_size, cfg.vision.crop_size,
                    cfg.vision.patch_size)
    n_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    log.info("exported %d tensors (%.1f MB) to %s", len(tensors), n_bytes / 1e6, out)
    return ExportResult(out, tuple(files), len(tensors), images)


def load_export_state(out_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an export (single file or shards), by name."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(out / f)))
    return state
