"""What the warm fork server (:mod:`step3vl.pipeline.warm`) imports once, so that its task processes start
with it already imported: the KFP executor, MLflow, torch, transformers' Qwen3, every stage module and Great
Expectations (each data prep part runs the gate's suite)."""

import kfp.dsl.executor_main  # noqa: F401
import mlflow  # noqa: F401
import torch  # noqa: F401

import step3vl.data.gate
import step3vl.model.vlm  # noqa: F401
import step3vl.pipeline.runtime  # noqa: F401
import step3vl.stages.data  # noqa: F401
import step3vl.stages.deploy  # noqa: F401
import step3vl.stages.evaluate  # noqa: F401
import step3vl.stages.pacore  # noqa: F401
import step3vl.stages.release  # noqa: F401
import step3vl.stages.rl  # noqa: F401
import step3vl.stages.rlhf  # noqa: F401
import step3vl.stages.train  # noqa: F401

step3vl.data.gate.import_ge()
