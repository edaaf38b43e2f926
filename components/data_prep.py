"""Data prep as KFP components: the plan, each part of it (in a ``ParallelFor``), the merge.

The DAG adds the three as the one stage ``data_prep`` (``Dag.planned_stage``): ``data_plan`` generates or copies
the sets, trains the tokenizer and splits every set into parts; ``data_part`` gates and packs one part; ``data_prep``
judges every set over its parts, joins the packed parts, seals (and with ``storage.root`` on S3 publishes) the data
directory. Its outputs are the stage's.
"""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Output

from step3vl.pipeline.images import TRAINER_IMAGE


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def data_plan(config_yaml: str, plan: Output[Dataset]) -> List[int]:
    """step3vl.stages.data.plan: raw sets, tokenizer, the sets' parts; returns the parts' indices."""
    from step3vl.pipeline import runtime
    from step3vl.stages import data as data_stage

    cfg = runtime.step_config("data_prep", "plan", config_yaml)
    return list(range(len(data_stage.plan(cfg, plan.path, progress=False)["parts"])))


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def data_part(config_yaml: str, plan: Input[Dataset], index: int, part: Output[Dataset]):
    """step3vl.stages.data.prepare_part: the gate's row-level checks, ids' digests and content hashes, and the
    packed shards of one part of the plan (with storage.root on S3, published there: the artifact is a pointer)."""
    from step3vl.pipeline import runtime
    from step3vl.stages import data as data_stage

    cfg = runtime.step_config("data_prep", f"part {index}", config_yaml)
    runtime.publish_part(cfg, part, data_stage.prepare_part(cfg, plan.path, index, out=part.path, progress=False))


@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def data_prep(config_yaml: str, mlflow_parent_run_id: str, pipeline_run_name: str, plan: Input[Dataset],
              parts: Input[List[Dataset]], data: Output[Dataset], metrics: Output[Metrics], report: Output[Markdown]):
    """step3vl.stages.data.merge: the gate over every part, the packed sets joined; fails the run if the gate does."""
    from step3vl.pipeline import runtime
    from step3vl.stages import data as data_stage

    with runtime.stage("data_prep", config_yaml, mlflow_parent_run_id, pipeline_run_name) as st:
        out = data_stage.merge(st.cfg, data.path, plan_dir=plan.path, parts=runtime.data_dirs(parts),
                               progress=False, log_mlflow=True)
        st.publish_data(out, data, metrics, report)
