"""Data prep as a KFP component: generate/fetch every set, train the tokenizer, gate, pack."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Metrics, Output

from step3vl.pipeline.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def data_prep(config_yaml: str, mlflow_parent_run_id: str, pipeline_run_name: str,
              data: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown]):
    """step3vl.stages.data.run: raw sets, tokenizer, packed shards; fails the run if the data gate fails."""
    from step3vl.pipeline import runtime
    from step3vl.stages import data as data_stage

    with runtime.stage("data_prep", config_yaml, mlflow_parent_run_id, pipeline_run_name) as st:
        out = data_stage.run(st.cfg, data.path, progress=False, log_mlflow=True)
        st.publish_data(out, data, metrics, report)
