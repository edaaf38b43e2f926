"""The STEP3-VL recipe as a Kubeflow Pipelines v2 DAG.

Stages, in order (each a component in ``components/`` over a ``step3vl.stages`` function):

1. ``data_prep``: generate/fetch every dataset, train the tokenizer, split every set into parts (``data_plan``);
   gate and pack each part (``data_part``, a ``ParallelFor``); judge every set over its parts and join them
2. ``pretrain``: unified pre-training on the packed pre-training sets (two LR phases)
3. ``sft``: two-stage SFT from the pre-trained model (assistant-token loss)
4. ``rlvr``: RL on verifiable rewards from the SFT model
5. ``rlhf``: GenRM judge, then RL on its preferences plus behaviour regularisation, from the RLVR model
6. ``pacore``: PaCoRe training (parallel coordinated reasoning) from the RLHF model
7. ``evaluate``: every stage's model (pretrain as the base, sft, rlvr, rlhf, pacore) on the held-out
   set: stage x family x mode accuracy, contamination check, stage-progression plot
8. ``register``: the PaCoRe model as a new registered version (lineage + eval metrics, alias
   ``candidate``), then the promotion gate against ``champion``
9. ``deploy_serving``: serve that version (locally: ``step3vl serve`` answers one chat completion;
   on the cluster: the vLLM Deployment rolls out to it)

Run locally with ``step3vl run --config conf/pipeline/tiny.yaml``; compile for a cluster with
``step3vl compile --config conf/pipeline/step3vl-10b.yaml --out pipelines/step3vl-10b.yaml``
(a test checks that the compiled file is up to date). Do not run this file directly.
"""

from kfp import dsl

from components.data_prep import data_part, data_plan, data_prep
from components.deploy_serving import deploy_serving
from components.evaluate import evaluate
from components.pacore import pacore
from components.pretrain import pretrain
from components.register import register
from components.rlhf import rlhf
from components.rlvr import rlvr
from components.sft import sft
from step3vl.pipeline.dag import LocalTarget, Target, outputs_type

# every stage of the DAG, in order; their outputs are the pipeline's outputs
STAGES = {"data_prep": data_prep, "pretrain": pretrain, "sft": sft, "rlvr": rlvr, "rlhf": rlhf, "pacore": pacore,
          "evaluate": evaluate, "register": register, "deploy_serving": deploy_serving}
# the number the run summary shows for each stage
KEY_METRICS = {"data_prep": "records", "pretrain": "eval_loss_end", "sft": "eval_loss_end",
               "rlvr": "reward_last", "rlhf": "rl/reward_last", "pacore": "synthesis_loss",
               "evaluate": "pacore/greedy/mean_accuracy", "register": "version",
               "deploy_serving": "completion_tokens"}


def build_pipeline(target: Target | None = None):
    """The pipeline for ``target`` (local runner or cluster); the DAG is the same for both."""
    target = target or LocalTarget("")

    @dsl.pipeline(name="step3vl", description=__doc__.splitlines()[0])
    def step3vl(config_yaml: str = target.config_yaml, mlflow_parent_run_id: str = "",
                pipeline_run_name: str = "") -> outputs_type(STAGES):
        dag = target.dag(config_yaml=config_yaml, mlflow_parent_run_id=mlflow_parent_run_id,
                         pipeline_run_name=pipeline_run_name)
        data = dag.planned_stage("data_prep", data_plan, data_part, data_prep)["data"]
        base = dag.stage("pretrain", pretrain, data=data)["model"]
        chat = dag.stage("sft", sft, data=data, init_model=base)["model"]
        verified = dag.stage("rlvr", rlvr, data=data, init_model=chat)["model"]
        aligned = dag.stage("rlhf", rlhf, data=data, init_model=verified)["model"]
        final = dag.stage("pacore", pacore, data=data, init_model=aligned)["model"]
        results = dag.stage("evaluate", evaluate, data=data, base=base, sft=chat, rlvr=verified, rlhf=aligned,
                            pacore=final)["results"]
        release = dag.stage("register", register, data=data, model=final, eval_results=results,
                            params={"kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER})["decision"]
        dag.stage("deploy_serving", deploy_serving, release=release)
        return dag.outputs(STAGES)

    return step3vl
