"""Build a model from config or load one from a checkpoint, with its tokenizer and image processor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from step3vl import config
from step3vl.config import ModelConfig


@dataclass
class LoadedModel:
    model: Any  # Step3VL
    tokenizer: Any
    processor: Any
    cfg: ModelConfig
    uri: str = ""
    tokenizer_dir: Path | None = None  # a local copy (an s3:// checkpoint is fetched): what a derived checkpoint ships


def image_token_id(tokenizer: Any) -> int:
    from step3vl.model.tokenizer import IMAGE_PATCH

    return int(tokenizer.convert_tokens_to_ids(IMAGE_PATCH))


def checkpoint_config(cfg: ModelConfig, tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """What a checkpoint's config.json carries: the model config and the image token id."""
    return {"model": config.to_dict(cfg), "image_token_id": image_token_id(tokenizer), **extra}


def new_model(cfg: ModelConfig, tokenizer: Any, seed: int) -> Any:
    from step3vl.model.vlm import build_model

    torch.manual_seed(seed)
    return build_model(cfg, image_token_id(tokenizer))


def load_model(uri: str, *, local_dir: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint (path, ``s3://`` or ``models:/NAME@alias``) verified, onto ``device``, in eval mode.

    The stages pass :func:`step3vl.devices.default_device` (the process's GPU where there is one)."""
    from step3vl.checkpoint import CheckpointError, load_checkpoint
    from step3vl.model.processor import ImageProcessor
    from step3vl.model.tokenizer import load_tokenizer
    from step3vl.model.vlm import build_model

    if uri.startswith("models:/"):
        from step3vl.registry import resolve_model_uri

        uri = resolve_model_uri(uri)
    ck = load_checkpoint(uri, local_dir=local_dir)
    if ck.tokenizer_dir is None:
        raise CheckpointError(f"checkpoint {uri} has no tokenizer/")
    cfg = config.from_dict(ModelConfig, ck.config["model"], source=f"{uri}/config.json")
    tok = load_tokenizer(ck.tokenizer_dir)
    model = build_model(cfg, int(ck.config["image_token_id"]))
    missing, unexpected = model.load_state_dict(ck.model_state, strict=False)
    # a tied LM head is stored separately and restored by the tie; anything else is an error
    missing = [k for k in missing if not (cfg.text.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {uri} does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.to(device).eval()
    return LoadedModel(model, tok, ImageProcessor(cfg.vision), cfg, uri, Path(ck.tokenizer_dir))
