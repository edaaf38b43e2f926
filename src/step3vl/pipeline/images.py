"""Container images and cluster object names, in one place: the components, the compiled pipeline
and the manifests use these (``make manifests-check`` fails when ``manifests/`` disagrees)."""

from step3vl import __version__

REGISTRY = "ghcr.io/step3vl"
# torch + step3vl (+ kfp, mlflow, deepspeed): every pipeline component runs in it (images/trainer)
TRAINER_IMAGE = f"{REGISTRY}/trainer:{__version__}"
# vLLM in its own image (it cannot share the trainer's torch/transformers pins): deploy-serving (images/serving)
SERVING_IMAGE = f"{REGISTRY}/serving:{__version__}"
# the MLflow tracking server with its PostgreSQL and S3 drivers (images/mlflow)
MLFLOW_IMAGE = f"{REGISTRY}/mlflow:{__version__}"
# the Kubeflow Trainer ClusterTrainingRuntime a TrainJob of ours refers to (manifests/base/trainer)
TRAINER_RUNTIME = "step3vl-deepspeed"
# the service account pipeline runs use, with its least-privilege Role (manifests/base/pipeline)
PIPELINE_SERVICE_ACCOUNT = "step3vl-pipeline"
