"""Evaluation as a KFP component."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from step3vl.pipeline.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(config_yaml: str, mlflow_parent_run_id: str, pipeline_run_name: str, data: Input[Dataset],
             model: Input[Model], results: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown]):
    """step3vl.stages.evaluate.run: per-family accuracy on the held-out set, greedy and at T=1."""
    from step3vl.pipeline import runtime
    from step3vl.stages import evaluate as evaluate_stage

    with runtime.stage("evaluate", config_yaml, mlflow_parent_run_id, pipeline_run_name) as st:
        out = evaluate_stage.run(st.cfg, data.path, runtime.model_dir(model), results.path, progress=False)
        st.publish_eval(out, results, metrics, report)
