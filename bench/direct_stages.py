"""The nine stage functions called without the pipeline, for ``entries/pipeline_overhead``.

:func:`run_stage` calls one ``step3vl.stages`` function with the outputs of the stages before it
(kept in ``state``: paths and the registered version). The overhead benchmark calls all nine in its
own process (**direct**), and each in a fresh Python process (**cold**), through this module's
``__main__``, which imports nothing but what the stage itself imports: what one process per task
costs before any orchestration is added.

    python -m bench.direct_stages --config conf/pipeline/tiny.yaml --work DIR --stage pretrain
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

STAGES = ("data_prep", "pretrain", "sft", "rlvr", "rlhf", "pacore", "evaluate", "register", "deploy_serving")
STATE_FILE = "direct-state.json"


def with_root(cfg: Any, work: Path) -> Any:
    """The config with its artifact root (checkpoints) under ``work``."""
    return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, root=str(work / "artifacts")))


def run_stage(name: str, cfg: Any, work: Path, state: dict[str, Any]) -> None:
    """Run stage ``name`` on what earlier stages left in ``state``; record its outputs there."""
    if name == "data_prep":
        from step3vl.stages import data

        state["data"] = str(data.run(cfg, work / "data", progress=False).out_dir)
        return
    d = Path(state["data"])
    if name in ("pretrain", "sft"):
        from step3vl.stages.train import run_training

        init = {"init_uri": state["pretrain"]} if name == "sft" else {}
        state[name] = run_training(name, cfg, d, str(work / name), progress=False, **init).model_uri
    elif name == "rlvr":
        from step3vl.stages.rl import run_rl

        state[name] = run_rl("rlvr", cfg, d, state["sft"], str(work / name), progress=False).model_uri
    elif name in ("rlhf", "pacore"):
        from step3vl.stages import pacore, rlhf

        fn, init = (rlhf.run, state["rlvr"]) if name == "rlhf" else (pacore.run, state["rlhf"])
        state[name] = fn(cfg, d, init, str(work / name), progress=False).model_uri
    elif name == "evaluate":
        from step3vl.stages import evaluate

        models = {"base": state["pretrain"], **{s: state[s] for s in ("sft", "rlvr", "rlhf", "pacore")}}
        evaluate.evaluate_models(cfg, d, models, work / "eval", progress=False)
    elif name == "register":
        from step3vl.stages import release

        rel = release.run(cfg, d, state["pacore"], work / "eval", stage="pacore")
        state["registered"] = f"models:/{rel.name}/{rel.version}"
    elif name == "deploy_serving":
        from step3vl.stages import deploy

        deploy.run(cfg, state["registered"])
    else:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--stage", required=True, choices=STAGES)
    a = ap.parse_args(argv)
    from step3vl import config
    from step3vl.config import PipelineConfig

    cfg = with_root(config.load(PipelineConfig, a.config), a.work)
    path = a.work / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    run_stage(a.stage, cfg, a.work, state)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
