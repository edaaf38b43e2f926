"""``make manifests-check`` (scripts/manifests_check.py): the repository passes, and each planted
violation fails with a message naming the object and the field."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("manifests_check", ROOT / "scripts" / "manifests_check.py")
mc = importlib.util.module_from_spec(_spec)
sys.modules["manifests_check"] = mc
_spec.loader.exec_module(mc)


@pytest.fixture
def tree(tmp_path):
    """A copy of manifests/ and images/ to plant violations in."""
    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    shutil.copytree(ROOT / "images", tmp_path / "images")
    return tmp_path


def edit(path: Path, fn) -> None:
    """Load the single object in ``path``, let ``fn`` change it, write it back."""
    obj = yaml.safe_load(path.read_text())
    fn(obj)
    path.write_text(yaml.safe_dump(obj, sort_keys=False))


def problems_for(tree: Path) -> list[str]:
    return mc.check_manifests(tree / "manifests", overlays=["dev"])


def one_matching(problems: list[str], *parts: str) -> str:
    hits = [p for p in problems if all(part in p for part in parts)]
    assert hits, f"no problem names {parts}; got:\n" + "\n".join(problems)
    return hits[0]


# --------------------------------------------------------------------------- the repository


def test_repository_passes_the_whole_check():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "manifests_check.py")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "manifests-check: ok" in res.stdout


def test_every_overlay_renders_every_service():
    for overlay in ("dev", "gpu-cluster"):
        objs = mc.kustomize_build(ROOT / "manifests" / "overlays" / overlay)
        kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
        assert {("Deployment", "mlflow"), ("StatefulSet", "postgres"), ("StatefulSet", "minio"),
                ("PersistentVolumeClaim", "minio-data"), ("Job", "minio-bucket-init"), ("Service", "minio"),
                ("Deployment", "serving"), ("ClusterTrainingRuntime", "step3vl-deepspeed"),
                ("ServiceAccount", "step3vl-pipeline"), ("Role", "step3vl-pipeline"),
                ("NetworkPolicy", "default-deny")} <= kinds, overlay


def test_overlay_image_tags_are_step3vl_pipeline_images():
    from step3vl.pipeline import images

    ours = {images.TRAINER_IMAGE, images.SERVING_IMAGE, images.MLFLOW_IMAGE}
    component = yaml.safe_load((ROOT / "manifests/components/images/kustomization.yaml").read_text())
    assert {f"{e['name']}:{e['newTag']}" for e in component["images"]} == ours
    for overlay in ("dev", "gpu-cluster"):
        used = {c["image"] for o in mc.kustomize_build(ROOT / "manifests" / "overlays" / overlay)
                for _, spec in mc.pod_specs(o) for c in [*spec.get("initContainers", []), *spec["containers"]]
                if c["image"].startswith(images.REGISTRY + "/")}
        assert used == ours, overlay


def test_secret_templates_carry_the_pipelines_secret_names_and_keys():
    from step3vl.pipeline.cluster import DEFAULT

    templates, problems = mc.secret_templates(ROOT / "manifests")
    assert not problems
    assert set(DEFAULT.s3_secret_keys) <= templates[DEFAULT.s3_secret]
    assert set(DEFAULT.mlflow_secret_keys) <= templates[DEFAULT.mlflow_secret]


def test_runtime_is_the_one_the_pipeline_names():
    from step3vl.pipeline.images import TRAINER_IMAGE, TRAINER_RUNTIME

    objs = mc.kustomize_build(ROOT / "manifests" / "overlays" / "gpu-cluster")
    (rt,) = [o for o in objs if o["kind"] == "ClusterTrainingRuntime"]
    assert rt["metadata"]["name"] == TRAINER_RUNTIME
    (node,) = rt["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["template"]["spec"]["template"]["spec"]["containers"][0]["image"] == TRAINER_IMAGE


def _gib(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", quantity)
    assert m, f"unparsed quantity {quantity!r}"
    return float(m.group(1)) * units.get(m.group(2) or "", 1) / 2**30


def test_trainjob_node_temp_space_holds_a_10b_resume():
    """A TrainJob node's /tmp holds the node's cache (the stage's starting model, the checkpoint it resumed from)
    and rank 0's staging of the checkpoint it saves; at 64Gi a 10B stage was evicted at its first checkpoint."""
    from step3vl import config
    from step3vl.config import ModelConfig
    from step3vl.model.info import model_info

    need = model_info(config.load(ModelConfig, ROOT / "conf/model/step3vl-10b.yaml")).storage["trainjob_node_tmp_gib"]
    objs = mc.kustomize_build(ROOT / "manifests" / "overlays" / "gpu-cluster")
    (rt,) = [o for o in objs if o["kind"] == "ClusterTrainingRuntime"]
    pod = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    have = _gib(vol["emptyDir"]["sizeLimit"])
    assert have >= 1.1 * need, f"/tmp holds {have:.0f} GiB; a 10B node needs {need:.0f} GiB + streamed shards"


# --------------------------------------------------------------------------- the four planted violations


def test_container_without_limits_fails(tree):
    def drop_limits(d):
        del d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]

    edit(tree / "manifests/base/mlflow/mlflow-deployment.yaml", drop_limits)
    msg = one_matching(problems_for(tree), "Deployment/step3vl/mlflow", "container mlflow",
                       "spec.template.spec.containers[0].resources.limits.cpu", "not set")
    assert msg.startswith("overlays/dev: ")
    one_matching(problems_for(tree), "Deployment/step3vl/mlflow", "resources.limits.memory")


def test_root_user_fails(tree):
    def as_root(d):
        d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0

    edit(tree / "manifests/base/minio/minio-statefulset.yaml", as_root)
    one_matching(problems_for(tree), "StatefulSet/step3vl/minio", "container minio",
                 "spec.template.spec.containers[0].securityContext.runAsUser", "root")


def test_root_user_in_a_dockerfile_fails(tree):
    path = tree / "images/mlflow/Dockerfile"
    path.write_text(path.read_text().replace("USER 10001", "USER root"))
    problems = mc.dockerfile_problems(tree / "images")
    one_matching(problems, "images/mlflow/Dockerfile", "USER", "non-root")
    one_matching(problems, "hadolint images/mlflow/Dockerfile", "DL3002")


def test_typod_field_fails(tree):
    path = tree / "manifests/base/postgres/postgres-service.yaml"
    path.write_text(path.read_text().replace("targetPort:", "targetPrt:"))
    one_matching(problems_for(tree), "Service/step3vl/postgres", "spec.ports[0]", "'targetPrt' was unexpected")


def test_unknown_crd_field_fails(tree):
    def typo(d):
        d["spec"]["mlPolicy"]["torch"]["numProcPerNodee"] = 8

    edit(tree / "manifests/base/trainer/step3vl-deepspeed-clustertrainingruntime.yaml", typo)
    one_matching(problems_for(tree), "ClusterTrainingRuntime/step3vl-deepspeed", "spec.mlPolicy.torch",
                 "'numProcPerNodee' was unexpected")


# --------------------------------------------------------------------------- the other rules


def test_unknown_field_deep_in_a_runtime_pod_template_fails(tree):
    def typo(d):
        container = d["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
        container["imagePullPolicyy"] = "Always"

    edit(tree / "manifests/base/trainer/step3vl-deepspeed-clustertrainingruntime.yaml", typo)
    one_matching(problems_for(tree), "ClusterTrainingRuntime/step3vl-deepspeed",
                 "spec.template.spec.replicatedJobs[0].template.spec.template.spec.containers[0]",
                 "'imagePullPolicyy' was unexpected")


def test_unknown_kind_fails(tree):
    path = tree / "manifests/base/trainer/step3vl-deepspeed-clustertrainingruntime.yaml"
    path.write_text(path.read_text().replace("kind: ClusterTrainingRuntime", "kind: ClusterTrainingRuntim"))
    one_matching(problems_for(tree), "ClusterTrainingRuntim/step3vl-deepspeed", "Couldn't find schema")


@pytest.mark.parametrize("field, value, expect", [
    ("readOnlyRootFilesystem", False, "securityContext.readOnlyRootFilesystem: must be true"),
    ("allowPrivilegeEscalation", True, "securityContext.allowPrivilegeEscalation: must be false"),
    ("capabilities", {"drop": ["NET_RAW"]}, "securityContext.capabilities.drop: must include ALL"),
    ("seccompProfile", {"type": "Unconfined"}, "seccompProfile.type: must be RuntimeDefault"),
])
def test_each_security_point_is_enforced(tree, field, value, expect):
    def weaken(d):
        d["spec"]["template"]["spec"]["containers"][0]["securityContext"][field] = value

    edit(tree / "manifests/base/serving/serving-deployment.yaml", weaken)
    one_matching(problems_for(tree), "Deployment/step3vl/serving", "container vllm", expect)


def test_plaintext_secret_and_secret_objects_fail(tree):
    def plaintext(d):
        d["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY2", "value": "x"})

    edit(tree / "manifests/base/mlflow/mlflow-deployment.yaml", plaintext)
    (tree / "manifests/base/mlflow/leak-secret.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: leak\nstringData:\n  k: v\n")
    kfile = tree / "manifests/base/mlflow/kustomization.yaml"
    kfile.write_text(kfile.read_text() + "  - leak-secret.yaml\n")
    problems = problems_for(tree)
    one_matching(problems, "Deployment/step3vl/mlflow", "AWS_SECRET_ACCESS_KEY2 is a plaintext secret")
    one_matching(problems, "Secret/step3vl/leak", "no Secret objects")


def test_secret_reference_without_template_fails(tree):
    (tree / "manifests/secrets/step3vl-mlflow-secret.yaml").unlink()
    problems = problems_for(tree)
    one_matching(problems, "ClusterTrainingRuntime/step3vl-deepspeed", "secret step3vl-mlflow/MLFLOW_TRACKING_USERNAME")
    one_matching(problems, "Secret/step3vl-mlflow", "step3vl.pipeline.cluster")


def test_image_tag_drift_from_step3vl_pipeline_images_fails(tree):
    path = tree / "manifests/components/images/kustomization.yaml"
    path.write_text(path.read_text().replace('newTag: "0.1.0"', 'newTag: "0.0.9"', 1))
    problems = problems_for(tree)
    one_matching(problems, "components/images/kustomization.yaml", "ghcr.io/step3vl/trainer", "TRAINER_IMAGE")
    one_matching(problems, "ClusterTrainingRuntime/step3vl-deepspeed", "ghcr.io/step3vl/trainer:0.0.9")


def test_missing_default_deny_and_ingress_policy_fail(tree):
    for name in ("default-deny-networkpolicy.yaml",):
        (tree / "manifests/base/namespace" / name).unlink()
    (tree / "manifests/base/mlflow/mlflow-networkpolicy.yaml").unlink()
    for k in ("namespace", "mlflow"):
        kfile = tree / f"manifests/base/{k}/kustomization.yaml"
        kfile.write_text(re.sub(r"  - (default-deny|mlflow)-networkpolicy.yaml\n", "", kfile.read_text()))
    problems = problems_for(tree)
    one_matching(problems, "Namespace/step3vl", "default-deny")
    one_matching(problems, "Deployment/step3vl/mlflow", "no NetworkPolicy with ingress rules")


def test_layout_and_vendored_crd_edits_fail(tree):
    base = tree / "manifests/base/mlflow"
    (base / "mlflow-service.yaml").rename(base / "mlflow-svc.yaml")
    crd = tree / "manifests/crds/kubeflow-trainer-v2.3.0/trainer.kubeflow.org_trainjobs.yaml"
    crd.write_text(crd.read_text() + "\n")
    problems = mc.layout_problems(tree / "manifests") + mc.load_crds(tree / "manifests")[1]
    one_matching(problems, "mlflow-svc.yaml", "not listed in kustomization.yaml")
    one_matching(problems, "trainer.kubeflow.org_trainjobs.yaml", "sha256")


def test_dockerfile_pins_follow_pyproject(tree):
    path = tree / "images/trainer/Dockerfile"
    path.write_text(path.read_text().replace("deepspeed==0.19.8", "deepspeed==0.19.7"))
    one_matching(mc.dockerfile_problems(tree / "images"), "images/trainer/Dockerfile", "deepspeed==0.19.7",
                 "pyproject.toml's deepspeed==0.19.8")
