"""Evaluation of every stage's model as a KFP component."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from step3vl.pipeline.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate(config_yaml: str, mlflow_parent_run_id: str, pipeline_run_name: str, data: Input[Dataset],
             base: Input[Model], sft: Input[Model], rlvr: Input[Model], rlhf: Input[Model], pacore: Input[Model],
             results: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown],
             report_html: Output[HTML]):
    """step3vl.stages.evaluate.evaluate_models: stage x family x mode accuracy, contamination check, plot."""
    from step3vl.pipeline import runtime
    from step3vl.stages import evaluate as evaluate_stage

    with runtime.stage("evaluate", config_yaml, mlflow_parent_run_id, pipeline_run_name) as st:
        models = runtime.model_dirs(base=base, sft=sft, rlvr=rlvr, rlhf=rlhf, pacore=pacore)
        out = evaluate_stage.evaluate_models(st.cfg, runtime.data_dir(data), models, results.path, progress=False)
        st.publish_eval(out, results, metrics, report, report_html)
