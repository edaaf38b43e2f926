"""Container images, in one place: the components, the compiled pipeline and the manifests use these."""

from step3vl import __version__

REGISTRY = "ghcr.io/step3vl"
# torch + step3vl (+ kfp, mlflow, deepspeed): every pipeline component runs in it
TRAINER_IMAGE = f"{REGISTRY}/trainer:{__version__}"
# vLLM in its own image (it cannot share the trainer's torch/transformers pins): deploy-serving
SERVING_IMAGE = f"{REGISTRY}/serving:{__version__}"
