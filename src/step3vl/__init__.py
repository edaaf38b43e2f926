"""step3vl: the STEP3-VL-10B recipe as a Kubeflow-orchestrated platform."""
__version__ = "0.1.0"
