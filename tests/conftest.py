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
