"""RLHF (GenRM judge, then RL on its preferences) as a KFP component."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from step3vl.pipeline.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def rlhf(config_yaml: str, mlflow_parent_run_id: str, pipeline_run_name: str, data: Input[Dataset],
         init_model: Input[Model], model: Output[Model], metrics: Output[Metrics], rl_curves: Output[HTML]):
    """step3vl.stages.rlhf.run from the RLVR model; GenRM and policy resume from their checkpoints."""
    from step3vl.pipeline import runtime
    from step3vl.stages import rlhf as rlhf_stage

    with runtime.stage("rlhf", config_yaml, mlflow_parent_run_id, pipeline_run_name) as st:
        ckpt = st.checkpoint_uri(data, init_model)
        out = st.execute(rlhf_stage.run, data_dir=runtime.data_dir(data), init_uri=runtime.model_dir(init_model),
                         out_uri=st.model_location(model), ckpt_uri=ckpt, progress=False, work_uri=ckpt)
        st.publish_rl(out, model, metrics, rl_curves)
