"""Shared fixtures: the micro pipeline config and its data prep output (built once per session)."""

from pathlib import Path

import pytest

pytest_plugins = ["servers_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
MICRO = ROOT / "tests" / "conf" / "micro.yaml"


@pytest.fixture(scope="session")
def micro_cfg():
    from step3vl import config

    return config.load(config.PipelineConfig, MICRO)


@pytest.fixture(scope="session")
def micro_data(micro_cfg, tmp_path_factory):
    """Data prep of the micro pipeline: raw sets, tokenizer, packed shards."""
    from step3vl.stages import data

    return data.run(micro_cfg, tmp_path_factory.mktemp("micro-data"), progress=False)


@pytest.fixture(scope="session")
def init_model(micro_cfg, micro_data, tmp_path_factory) -> Path:
    """A random micro policy saved like an SFT stage output: where the RL stages' tests start (read only)."""
    from step3vl.checkpoint import save_checkpoint
    from step3vl.model.loading import checkpoint_config, new_model
    from step3vl.model.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_data.tokenizer_dir)
    uri = tmp_path_factory.mktemp("init") / "model"
    save_checkpoint(str(uri), model_state=new_model(micro_cfg.model, tok, 0).state_dict(),
                    config=checkpoint_config(micro_cfg.model, tok, stage="sft"), tokenizer_dir=micro_data.tokenizer_dir)
    return uri
