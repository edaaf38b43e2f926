"""Deploy-serving stage: put the registered model behind the OpenAI-compatible API and prove it answers.

Two targets, chosen by ``$STEP3VL_SERVING`` (the cluster build sets ``kubernetes``; default ``local``):

- ``local``: start ``step3vl serve`` on the registered version (``models:/NAME/V``) on a free port,
  send one real chat completion, stop the server. Nothing keeps running after the stage.
- ``kubernetes``: export the model in the Hugging Face layout vLLM loads to
  ``<storage.root>/models/<name>/v<version>/export``, point the ``serving`` ConfigMap at it and
  roll the ``serving`` Deployment (``manifests/base/serving``, installed with the platform) by
  patching its pod template, then wait until every replica of the new generation is ready.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step3vl.config import PipelineConfig
from step3vl.errors import Step3VLError

log = logging.getLogger(__name__)

TARGET_ENV = "STEP3VL_SERVING"
PROMPT = "What is 2 + 3? Answer with the number."
_LISTENING = re.compile(r"Uvicorn running on http://([\d.]+):(\d+)")


class DeployError(Step3VLError):
    """The model could not be served, or the serving deployment did not become ready."""


@dataclass
class DeployOutputs:
    target: str
    model_uri: str
    endpoint: str
    metrics: dict[str, float] = field(default_factory=dict)
    report: str = ""


def run(cfg: PipelineConfig, model_uri: str, *, target: str | None = None, **kw: Any) -> DeployOutputs:
    """Deploy ``model_uri`` (``models:/NAME/V`` or a checkpoint) on ``target`` (default ``$STEP3VL_SERVING``)."""
    target = target or os.environ.get(TARGET_ENV, "local")
    if target == "local":
        return serve_locally(cfg, model_uri, **kw)
    if target == "kubernetes":
        return deploy_kubernetes(cfg, model_uri, **kw)
    raise DeployError(f"${TARGET_ENV}={target!r}: local or kubernetes")


# --------------------------------------------------------------------------- local


def _step3vl_command() -> list[str]:
    exe = Path(sys.executable).with_name("step3vl")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "step3vl.cli"]


def chat_once(base_url: str, model: str, *, timeout: float = 120.0, api_key: str | None = None) -> dict[str, Any]:
    """One ``/v1/chat/completions`` request (with the server's API key when it has one); the parsed response."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16,
                       "temperature": 0.0}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (our own server)
        return json.loads(r.read())


def serve_locally(cfg: PipelineConfig, model_uri: str, *, startup_timeout_s: float = 300.0) -> DeployOutputs:
    """``step3vl serve`` on a free port, one chat completion, then stop it."""
    from step3vl.tracking import tracking_uri

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(cfg.tracking), "PYTHONUNBUFFERED": "1"}
    cmd = [*_step3vl_command(), "serve", "--model", model_uri, "--host", "127.0.0.1", "--port", "0",
           "--model-name", cfg.tracking.registered_model]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        base_url = ""
        deadline = time.monotonic() + startup_timeout_s
        assert proc.stdout is not None
        while not base_url:
            line = proc.stdout.readline()
            if not line:
                raise DeployError(f"step3vl serve exited ({proc.wait()}) before listening:\n" + "".join(lines[-20:]))
            lines.append(line)
            if m := _LISTENING.search(line):
                base_url = f"http://{m[1]}:{m[2]}"
            if time.monotonic() > deadline:
                raise DeployError(f"step3vl serve did not listen within {startup_timeout_s:.0f}s")
        t1 = time.perf_counter()
        resp = chat_once(base_url, cfg.tracking.registered_model, api_key=env.get("STEP3VL_API_KEY") or None)
        t2 = time.perf_counter()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    choice = resp["choices"][0]
    usage = resp.get("usage", {})
    text = choice["message"]["content"]
    log.info("served %s at %s: %r", model_uri, base_url, text)
    metrics = {"startup_seconds": t1 - t0, "completion_seconds": t2 - t1,
               "completion_tokens": float(usage.get("completion_tokens", 0)),
               "prompt_tokens": float(usage.get("prompt_tokens", 0))}
    report = "\n".join([
        f"# Serving {model_uri} (local)", "",
        f"`step3vl serve` listened on {base_url} after {metrics['startup_seconds']:.1f}s and answered one chat "
        f"completion in {metrics['completion_seconds']:.2f}s, then was stopped.", "",
        f"- request: {PROMPT!r}", f"- response ({choice.get('finish_reason')}): {text!r}",
        f"- usage: {usage}", ""])
    return DeployOutputs("local", model_uri, base_url, metrics, report)


# --------------------------------------------------------------------------- kubernetes


@dataclass(frozen=True)
class ServingObjects:
    """The serving objects of ``manifests/base/serving``."""

    namespace: str = "step3vl"
    deployment: str = "serving"
    configmap: str = "serving"
    service_port: int = 8000


def export_for_vllm(cfg: PipelineConfig, model_uri: str, dest_uri: str) -> str:
    """``step3vl export`` of ``model_uri`` published at ``dest_uri`` (reused when already there)."""
    import tempfile

    from step3vl.serve.export import export_hf
    from step3vl.storage import StorageError, publish_dir, verify_published

    try:
        verify_published(dest_uri)
        return dest_uri
    except StorageError:
        pass
    with tempfile.TemporaryDirectory(prefix="step3vl-export-") as d:
        export_hf(model_uri, Path(d) / "export", dtype="bfloat16")
        publish_dir(Path(d) / "export", dest_uri, {"source": model_uri})
    return dest_uri


def deploy_kubernetes(cfg: PipelineConfig, model_uri: str, *, api: Any = None, objects: ServingObjects = ServingObjects(),
                      export_uri: str | None = None, timeout_s: float = 1800.0, poll_s: float = 10.0,
                      export: Any = export_for_vllm) -> DeployOutputs:
    """Point the vLLM Deployment at an export of ``model_uri`` and wait for its rollout to be ready.

    ``api``: ``(CoreV1Api, AppsV1Api)``; default from the in-cluster (or kube) config.
    """
    from step3vl.storage import join_uri

    core, apps = api or _kube_apis()
    name = cfg.tracking.registered_model
    version = model_uri.rstrip("/").rsplit("/", 1)[-1] if model_uri.startswith("models:/") else "checkpoint"
    export_uri = export_uri or join_uri(cfg.storage.root, "models", name, f"v{version}", "export")
    t0 = time.perf_counter()
    export(cfg, model_uri, export_uri)
    stamp = f"{name}-v{version}-{int(time.time())}"
    try:
        core.patch_namespaced_config_map(objects.configmap, objects.namespace,
                                         {"data": {"MODEL_URI": export_uri, "MODEL_NAME": name}})
        apps.patch_namespaced_deployment(objects.deployment, objects.namespace, {"spec": {"template": {"metadata": {
            "annotations": {"step3vl.ai/model-uri": model_uri, "step3vl.ai/rollout": stamp}}}}})
    except Exception as e:  # kubernetes.client.ApiException
        if getattr(e, "status", None) == 404:
            raise DeployError(f"no {objects.deployment} Deployment/ConfigMap in namespace {objects.namespace}: "
                              "install manifests/overlays/<env> (kubectl apply -k) first") from None
        raise
    wait_rollout(apps, objects, timeout_s=timeout_s, poll_s=poll_s)
    endpoint = f"http://{objects.deployment}.{objects.namespace}.svc.cluster.local:{objects.service_port}/v1"
    metrics = {"rollout_seconds": time.perf_counter() - t0}
    report = (f"# Serving {model_uri} (kubernetes)\n\nvLLM Deployment `{objects.namespace}/{objects.deployment}` "
              f"serves `{export_uri}` at {endpoint} (rollout {stamp}, ready after "
              f"{metrics['rollout_seconds']:.0f}s).\n")
    return DeployOutputs("kubernetes", model_uri, endpoint, metrics, report)


def wait_rollout(apps: Any, objects: ServingObjects, *, timeout_s: float, poll_s: float,
                 clock: Any = time.monotonic, sleep: Any = time.sleep) -> None:
    """Until the Deployment's newest generation has every replica updated, ready and available."""
    deadline = clock() + timeout_s
    last = ""
    while True:
        d = apps.read_namespaced_deployment_status(objects.deployment, objects.namespace)
        want = d.spec.replicas if d.spec.replicas is not None else 1
        st = d.status
        for c in st.conditions or []:
            if c.type == "Progressing" and c.status == "False":
                raise DeployError(f"deployment {objects.namespace}/{objects.deployment} failed to roll out: "
                                  f"{c.reason}: {c.message}")
        done = ((st.observed_generation or 0) >= (d.metadata.generation or 0)
                and (st.updated_replicas or 0) == want and (st.ready_replicas or 0) == want
                and (st.available_replicas or 0) == want and not (st.unavailable_replicas or 0))
        if done:
            return
        last = (f"{st.updated_replicas or 0} updated / {st.ready_replicas or 0} ready of {want} "
                f"(generation {st.observed_generation}/{d.metadata.generation})")
        if clock() > deadline:
            raise DeployError(f"deployment {objects.namespace}/{objects.deployment} not ready after "
                              f"{timeout_s:.0f}s: {last}")
        sleep(poll_s)


def _kube_apis() -> tuple[Any, Any]:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api(), client.AppsV1Api()
