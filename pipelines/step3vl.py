"""The STEP3-VL recipe as a Kubeflow Pipelines v2 DAG.

Stages, in order (each a component in ``components/`` over a ``step3vl.stages`` function):

1. ``data_prep``: generate/fetch every dataset, train the tokenizer, gate every set, pack shards
2. ``pretrain``: unified pre-training on the packed pre-training sets (two LR phases)
3. ``sft``: two-stage SFT from the pre-trained model (assistant-token loss)
4. ``evaluate``: per-family accuracy of the SFT model on the held-out set

Run locally with ``step3vl run --config conf/pipeline/tiny.yaml``; compile for a cluster with
``step3vl compile --config conf/pipeline/step3vl-10b.yaml --out pipelines/step3vl-10b.yaml``
(a test checks that the compiled file is up to date). Do not run this file directly.
"""

from kfp import dsl

from components.data_prep import data_prep
from components.evaluate import evaluate
from components.pretrain import pretrain
from components.sft import sft
from step3vl.pipeline.dag import LocalTarget, Target, outputs_type

# every stage of the DAG, in order; their outputs are the pipeline's outputs
STAGES = {"data_prep": data_prep, "pretrain": pretrain, "sft": sft, "evaluate": evaluate}
# the number the run summary shows for each stage
KEY_METRICS = {"data_prep": "records", "pretrain": "eval_loss_end", "sft": "eval_loss_end",
               "evaluate": "greedy/mean_accuracy"}


def build_pipeline(target: Target | None = None):
    """The pipeline for ``target`` (local runner or cluster); the DAG is the same for both."""
    target = target or LocalTarget("")

    @dsl.pipeline(name="step3vl", description=__doc__.splitlines()[0])
    def step3vl(config_yaml: str = target.config_yaml, mlflow_parent_run_id: str = "",
                pipeline_run_name: str = "") -> outputs_type(STAGES):
        dag = target.dag(config_yaml=config_yaml, mlflow_parent_run_id=mlflow_parent_run_id,
                         pipeline_run_name=pipeline_run_name)
        data = dag.stage("data_prep", data_prep)["data"]
        base = dag.stage("pretrain", pretrain, data=data)["model"]
        chat = dag.stage("sft", sft, data=data, init_model=base)["model"]
        dag.stage("evaluate", evaluate, data=data, model=chat)
        return dag.outputs(STAGES)

    return step3vl
