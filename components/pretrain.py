"""Unified pre-training as a KFP component."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from step3vl.pipeline.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def pretrain(config_yaml: str, mlflow_parent_run_id: str, pipeline_run_name: str, data: Input[Dataset],
             model: Output[Model], metrics: Output[Metrics], loss_curve: Output[HTML]):
    """step3vl.stages.train.run_training("pretrain"): two LR phases, all unfrozen; resumes from checkpoints."""
    from step3vl.pipeline import runtime
    from step3vl.stages.train import run_training

    with runtime.stage("pretrain", config_yaml, mlflow_parent_run_id, pipeline_run_name) as st:
        ckpt = st.checkpoint_uri(data)
        out = st.execute(run_training, "pretrain", data_dir=runtime.data_dir(data), out_uri=st.model_location(model),
                         ckpt_uri=ckpt, progress=False, work_uri=ckpt)
        st.publish_training(out, model, metrics, loss_curve)
