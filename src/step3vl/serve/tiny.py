"""Random (untrained) checkpoints for serving tests, benchmarks and the vLLM GPU check.

Serving needs a loadable checkpoint, not a good model: a freshly initialised model of any size,
with a tokenizer trained on the built-in corpus, saved through the ordinary checkpoint writer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from step3vl.config import ModelConfig


def random_checkpoint(out_dir: str | Path, model_cfg: ModelConfig, *, seed: int = 0) -> str:
    """Write a randomly initialised ``model_cfg`` checkpoint to ``out_dir``; returns its URI."""
    from step3vl.checkpoint import save_checkpoint
    from step3vl.model.loading import checkpoint_config, new_model
    from step3vl.model.tokenizer import build_tokenizer, save_tokenizer

    tok = build_tokenizer(model_cfg.tokenizer)
    model = new_model(model_cfg, tok, seed)
    with tempfile.TemporaryDirectory(prefix="step3vl-tok-") as tok_dir:
        save_tokenizer(tok, tok_dir)
        save_checkpoint(out_dir, model_state=model.state_dict(), config=checkpoint_config(model_cfg, tok),
                        tokenizer_dir=tok_dir, overwrite=True)
    return str(out_dir)
