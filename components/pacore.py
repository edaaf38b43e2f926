"""PaCoRe training (parallel coordinated reasoning) as a KFP component."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from step3vl.pipeline.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def pacore(config_yaml: str, mlflow_parent_run_id: str, pipeline_run_name: str, data: Input[Dataset],
           init_model: Input[Model], model: Output[Model], messages: Output[Dataset], metrics: Output[Metrics],
           rl_curves: Output[HTML]):
    """step3vl.stages.pacore.run from the RLHF model; resumes from its checkpoints. ``messages``: the message sets
    each curriculum step generated from the policy and trained on (one dataset per step)."""
    from step3vl.pipeline import runtime
    from step3vl.stages import pacore as pacore_stage

    with runtime.stage("pacore", config_yaml, mlflow_parent_run_id, pipeline_run_name) as st:
        ckpt = st.checkpoint_uri(data, init_model)
        msgs = st.dataset_location(messages, "pacore-messages")
        out = st.execute(pacore_stage.run, data_dir=runtime.data_dir(data), init_uri=runtime.model_dir(init_model),
                         out_uri=st.model_location(model), ckpt_uri=ckpt, messages_uri=msgs,
                         message_cache=st.storage_uri(pacore_stage.MESSAGE_CACHE), progress=False, work_uri=ckpt)
        st.publish_messages(msgs, messages)
        st.publish_rl(out, model, metrics, rl_curves)
