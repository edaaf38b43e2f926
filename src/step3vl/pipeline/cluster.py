"""Cluster settings of the compiled pipeline: resources per stage, GPU pools, secrets, retries.

Hard-coded defaults for now (sized for STEP3-VL-10B on 8-GPU nodes); they are meant to move into
the pipeline config (see ``ClusterSettings`` fields). A task gets them through :func:`apply`.
Locally none of this has any effect (the KFP local runner ignores resources), so the local build
does not set it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from step3vl.pipeline.images import TRAINER_IMAGE, TRAINER_RUNTIME

TRAINING_STAGES = ("pretrain", "sft", "rlvr", "rlhf", "pacore")


@dataclass(frozen=True)
class Resources:
    """What one stage's pod asks for."""

    cpu: str = "4"
    memory: str = "16Gi"  # request = limit: the OOM killer, not the node, decides early
    gpus: int = 0
    timeout_s: int = 0  # 0 = no deadline
    retries: int = 0  # task-level retries; training stages resume from their checkpoints
    nodes: int = 1  # nodes of the stage's TrainJob (executor "trainjob"); gpus is then per node
    # processes per TrainJob node: 0 = one per GPU (data-parallel ranks); 1 = one process seeing every GPU
    processes_per_node: int = 0
    # an emptyDir of this size at /tmp ("" = none): the node's cache of what the stage reads from object storage
    # (its starting model, the checkpoint it resumes from, streamed shards) and rank 0's staging of each checkpoint
    # it saves; the container's own filesystem has no size the scheduler knows of
    tmp: str = ""


@dataclass(frozen=True)
class Toleration:
    key: str
    operator: str = "Exists"
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True)
class ClusterSettings:
    """Everything the cluster build adds to a task; secrets are mounted by name, never read here."""

    image: str = TRAINER_IMAGE
    # S3 (MinIO) credentials as env; endpoint and region are not secret
    s3_secret: str = "step3vl-minio"
    s3_secret_keys: dict[str, str] = field(default_factory=lambda: {
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    s3_endpoint: str = "http://minio.step3vl.svc.cluster.local:9000"
    s3_region: str = "us-east-1"
    # MLflow basic auth (the tracking URI itself comes from the pipeline config)
    mlflow_secret: str = "step3vl-mlflow"
    mlflow_secret_keys: dict[str, str] = field(default_factory=lambda: {
        "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
    accelerator_type: str = "nvidia.com/gpu"
    gpu_node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: tuple[Toleration, ...] = (Toleration("nvidia.com/gpu"),)
    shm_size: str = "64Gi"  # /dev/shm for NCCL and data loaders on GPU pods
    retry_backoff: str = "300s"
    # "pod": a training stage trains in its own task pod (which gets the GPUs); "trainjob": the task
    # pod only launches and follows a Kubeflow Trainer TrainJob of `nodes` x `gpus` (step3vl.pipeline.trainjob)
    executor: str = "pod"
    trainjob_runtime: str = TRAINER_RUNTIME
    retry_backoff_max: str = "3600s"
    parallel_parts: int = 64  # data prep's parts (its ParallelFor) running at once, each a data_prep-sized pod
    stages: dict[str, Resources] = field(default_factory=lambda: {
        "data_prep": Resources(cpu="16", memory="64Gi", timeout_s=12 * 3600),
        # one 8-GPU node per training stage in-pod; executor "trainjob" spreads it over `nodes`. /tmp as the
        # TrainJob runtime's (manifests/base/trainer): `step3vl model info` plans 265 GiB at 10B
        "pretrain": Resources(cpu="64", memory="900Gi", gpus=8, timeout_s=14 * 24 * 3600, retries=3, nodes=4,
                              tmp="320Gi"),
        "sft": Resources(cpu="64", memory="900Gi", gpus=8, timeout_s=7 * 24 * 3600, retries=3, nodes=2, tmp="320Gi"),
        # the RL loop is one process (rollouts, rewards, updates; not data-parallel yet): one node, one rank
        "rlvr": Resources(cpu="64", memory="900Gi", gpus=8, timeout_s=7 * 24 * 3600, retries=3, processes_per_node=1,
                          tmp="320Gi"),
        "rlhf": Resources(cpu="64", memory="900Gi", gpus=8, timeout_s=7 * 24 * 3600, retries=3, processes_per_node=1,
                          tmp="320Gi"),
        "pacore": Resources(cpu="64", memory="900Gi", gpus=8, timeout_s=7 * 24 * 3600, retries=3,
                            processes_per_node=1, tmp="320Gi"),
        # five models x the eval modes; one GPU is plenty for the suite. /tmp: one model at a time (38 GiB at 10B,
        # dropped once evaluated) and the eval set
        "evaluate": Resources(cpu="16", memory="128Gi", gpus=1, timeout_s=24 * 3600, tmp="64Gi"),
        "register": Resources(cpu="1", memory="2Gi", timeout_s=3600, retries=2),
        # exports the model (bf16 safetensors) and waits for the vLLM rollout
        "deploy_serving": Resources(cpu="8", memory="96Gi", timeout_s=3 * 3600),
    })
    default: Resources = field(default_factory=Resources)

    def resources(self, stage: str) -> Resources:
        return self.stages.get(stage, self.default)


DEFAULT = ClusterSettings()


def apply(task: Any, stage: str, settings: ClusterSettings = DEFAULT) -> Any:
    """Give a pipeline task its cluster settings: resources, GPU pool, secrets, retries, deadline."""
    from kfp import kubernetes

    r = settings.resources(stage)
    remote = settings.executor == "trainjob" and stage in TRAINING_STAGES
    if settings.executor not in ("pod", "trainjob"):
        raise ValueError(f"ClusterSettings.executor: pod or trainjob, not {settings.executor!r}")
    if remote:
        # the task pod only follows the TrainJob, which gets the resources and GPUs
        from step3vl.pipeline import trainjob

        task.set_env_variable(trainjob.EXECUTOR_ENV, "trainjob")
        task.set_env_variable(trainjob.NODES_ENV, str(r.nodes))
        task.set_env_variable(trainjob.GPUS_ENV, str(r.gpus))
        r = dataclasses.replace(r, cpu="1", memory="4Gi", gpus=0, tmp="")  # the runtime has the job's /tmp
    if stage == "deploy_serving":
        task.set_env_variable("STEP3VL_SERVING", "kubernetes")
    task.set_cpu_request(r.cpu)
    task.set_memory_request(r.memory).set_memory_limit(r.memory)
    if r.gpus:
        task.set_accelerator_type(settings.accelerator_type).set_accelerator_limit(r.gpus)
        for key, value in settings.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in settings.gpu_tolerations:
            kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value or None, effect=t.effect)
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=settings.shm_size)
    if r.tmp:
        kubernetes.empty_dir_mount(task, volume_name="tmp", mount_path="/tmp", size_limit=r.tmp)
    if r.retries:
        task.set_retry(num_retries=r.retries, backoff_duration=settings.retry_backoff, backoff_factor=2.0,
                       backoff_max_duration=settings.retry_backoff_max)
    if r.timeout_s:
        kubernetes.set_timeout(task, r.timeout_s)
    kubernetes.use_secret_as_env(task, secret_name=settings.s3_secret, secret_key_to_env=settings.s3_secret_keys)
    # optional: an MLflow server without auth needs no secret
    kubernetes.use_secret_as_env(task, secret_name=settings.mlflow_secret,
                                 secret_key_to_env=settings.mlflow_secret_keys, optional=True)
    task.set_env_variable("AWS_ENDPOINT_URL", settings.s3_endpoint)
    task.set_env_variable("MLFLOW_S3_ENDPOINT_URL", settings.s3_endpoint)
    task.set_env_variable("AWS_REGION", settings.s3_region)
    return task
