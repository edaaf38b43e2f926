"""The KFP layer: everything between the library's stage functions and Kubeflow Pipelines.

- ``runtime``: what runs inside a component (config from YAML text, the MLflow child run,
  artifacts ↔ paths, metrics on artifacts); the component bodies in ``components/`` are a few
  lines over it.
- ``dag``: how the one DAG in ``pipelines/step3vl.py`` is built for a target: the local runner
  (input-addressed cache keys, upstream stages reused through importers) or the cluster
  (resources, GPUs, secrets, retries from ``cluster``).
- ``lineage``: cache keys, artifact digests and the stable checkpoint location of a stage.
- ``local``: ``step3vl run`` on ``kfp.local``; ``warm``: its tasks forked from a process that imported the
  stack once; ``submit``: ``step3vl compile`` / ``step3vl submit``.

Nothing here is ML logic: stages live in :mod:`step3vl.stages`.
"""
