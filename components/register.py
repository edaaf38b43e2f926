"""Registration of the final model and the promotion gate as a KFP component (the registry's one writer)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from step3vl.pipeline.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def register(config_yaml: str, mlflow_parent_run_id: str, pipeline_run_name: str, kfp_run_id: str,
             data: Input[Dataset], model: Input[Model], eval_results: Input[Artifact], metrics: Output[Metrics],
             decision: Output[Markdown]):
    """step3vl.stages.release.run: a new version (lineage + eval metrics, alias candidate), then the gate."""
    from step3vl.pipeline import runtime
    from step3vl.stages import release

    with runtime.stage("register", config_yaml, mlflow_parent_run_id, pipeline_run_name) as st:
        out = release.run(st.cfg, runtime.data_dir(data), runtime.model_dir(model), eval_results.path, stage="pacore",
                          kfp_run_id=kfp_run_id, parent_run_id=mlflow_parent_run_id, run_id=st.mlflow_run_id)
        st.publish_release(out, metrics, decision)
