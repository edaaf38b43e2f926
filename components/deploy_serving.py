"""Serving the registered model as a KFP component: local smoke test, or the vLLM rollout on the cluster."""

from kfp import dsl
from kfp.dsl import Input, Markdown, Metrics, Output

from step3vl.pipeline.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def deploy_serving(config_yaml: str, mlflow_parent_run_id: str, pipeline_run_name: str,
                   release: Input[Markdown], metrics: Output[Metrics], report: Output[Markdown]):
    """step3vl.stages.deploy.run on the version the register stage created ($STEP3VL_SERVING picks the target)."""
    from step3vl.pipeline import runtime
    from step3vl.stages import deploy

    with runtime.stage("deploy_serving", config_yaml, mlflow_parent_run_id, pipeline_run_name) as st:
        out = deploy.run(st.cfg, runtime.registered_model_uri(release))
        st.publish_serving(out, metrics, report)
