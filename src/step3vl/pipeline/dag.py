"""Building the one DAG (``pipelines/step3vl.py``) for a target: the local runner or the cluster.

The pipeline function adds each stage with one call, ``dag.stage(name, component, **inputs)``;
the target decides what that stage becomes:

- :class:`LocalTarget` (``step3vl run``): the task gets an input-addressed cache key (see
  :mod:`step3vl.pipeline.lineage`); a stage listed in ``reuse`` becomes ``dsl.importer`` tasks for
  the outputs a previous run recorded (``--from-stage X --resume-from RUN``).
- :class:`ClusterTarget` (``step3vl compile`` / ``submit``): the task gets resources, GPUs, secrets,
  retries and a deadline from :mod:`step3vl.pipeline.cluster`; caching stays KFP's own.

Each stage's outputs are also the pipeline's outputs, named ``<stage>__<output>``, which is how
``kfp.local`` hands every artifact (URI + metadata, metrics included) back to the runner.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from step3vl.config import PACKAGE_DIR
from step3vl.errors import Step3VLError
from step3vl.pipeline import lineage
from step3vl.pipeline.cluster import DEFAULT, ClusterSettings, apply

FIELD_SEP = "__"
STEP_KEY_ENV = "STEP3VL_STEP_KEY"  # a looped task's input-addressed key (LocalTarget.configure_step)
PIPELINE_PARAMS = ("config_yaml", "mlflow_parent_run_id", "pipeline_run_name")


# --------------------------------------------------------------------------- the pipeline module


def project_root() -> Path:
    """The checkout holding ``pipelines/`` and ``components/`` (``$STEP3VL_PROJECT`` overrides)."""
    root = Path(os.environ.get("STEP3VL_PROJECT") or PACKAGE_DIR.parent.parent)
    if not (root / "pipelines" / "step3vl.py").is_file():
        raise Step3VLError(f"no pipelines/step3vl.py under {root}: run from a step3vl checkout or set STEP3VL_PROJECT")
    return root


def pipeline_module() -> Any:
    """``pipelines.step3vl`` (the DAG), importable together with ``components``."""
    root = str(project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("pipelines.step3vl")


# --------------------------------------------------------------------------- outputs


def output_classes(component: Any) -> dict[str, type]:
    """Output artifact name → artifact class of a component, in declaration order."""
    from kfp.dsl.types import type_utils

    out = {}
    for name, spec in (component.component_spec.outputs or {}).items():
        title = spec.type.split("@")[0]  # system.Model@0.0.1
        out[name] = type_utils.ARTIFACT_CLASSES_MAPPING.get(title.removeprefix("system.").lower(), _artifact())
    return out


def _artifact() -> type:
    from kfp.dsl import Artifact

    return Artifact


def field_name(stage: str, output: str) -> str:
    return f"{stage}{FIELD_SEP}{output}"


def split_field(name: str) -> tuple[str, str]:
    stage, _, output = name.partition(FIELD_SEP)
    return stage, output


_OUTPUT_TYPES: dict[tuple, type] = {}


def outputs_type(stages: Mapping[str, Any]) -> type:
    """The pipeline's return type: a NamedTuple with a field per output of every stage."""
    fields = tuple((field_name(s, o), cls) for s, comp in stages.items() for o, cls in output_classes(comp).items())
    if fields not in _OUTPUT_TYPES:
        _OUTPUT_TYPES[fields] = NamedTuple("Outputs", list(fields))  # type: ignore[misc]
    return _OUTPUT_TYPES[fields]


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class ReusedOutput:
    """One artifact a previous run produced: what ``dsl.importer`` needs to bring it back."""

    uri: str
    schema_title: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReusedStage:
    cache_key: str
    outputs: dict[str, ReusedOutput]


class Target:
    """What a stage becomes in the DAG; subclasses configure the task."""

    def __init__(self, config_yaml: str, *, reuse: Mapping[str, ReusedStage] | None = None) -> None:
        self.config_yaml = config_yaml  # also the pipeline's default config_yaml
        self.reuse = dict(reuse or {})
        self.keys: dict[str, str] = {}  # stage → cache key, filled while the DAG is built
        self.step_tasks: dict[str, str] = {}  # task name → stage, of the tasks before a planned stage's last one

    def dag(self, **params: Any) -> Dag:
        missing = set(PIPELINE_PARAMS) - set(params)
        if missing:
            raise TypeError(f"pipeline parameters missing: {', '.join(sorted(missing))}")
        return Dag(self, params)

    def configure(self, stage: str, component: Any, task: Any, inputs: dict[str, tuple[str, str]],
                  steps: Mapping[str, str] | None = None) -> None:
        raise NotImplementedError

    def configure_step(self, stage: str, step: str, component: Any, task: Any, upstream: Mapping[str, str], *,
                       looped: bool = False) -> str:
        """A task of stage ``stage`` before its last one (``Dag.planned_stage``); its key ("" where none)."""
        raise NotImplementedError

    def parallelism(self, stage: str) -> int:
        """How many of a planned stage's parts run at once (0: as many as the runner likes)."""
        return 0


class LocalTarget(Target):
    """``kfp.local``: input-addressed cache keys; no resources (the local runner ignores them)."""

    def __init__(self, config_yaml: str, *, reuse: Mapping[str, ReusedStage] | None = None, caching: bool = True,
                 code: str | None = None) -> None:
        super().__init__(config_yaml, reuse=reuse)
        self.caching = caching
        self.code = code  # tests pin it; otherwise each component's own import closure
        self.code_digests: dict[str, str] = {}
        self.step_keys: dict[str, str] = {}  # "<stage>.<step>" → key of a planned stage's earlier task

    def configure(self, stage: str, component: Any, task: Any, inputs: dict[str, tuple[str, str]],
                  steps: Mapping[str, str] | None = None) -> None:
        upstream = {name: f"{self.keys[src]}:{out}" for name, (src, out) in inputs.items()}
        upstream.update({f"step:{name}": key for name, key in (steps or {}).items()})
        key, self.code_digests[stage] = self._key(stage, component, upstream)
        self.keys[stage] = key
        task.set_caching_options(self.caching, cache_key=key if self.caching else None)

    def configure_step(self, stage: str, step: str, component: Any, task: Any, upstream: Mapping[str, str], *,
                       looped: bool = False) -> str:
        key, _ = self._key(f"{stage}.{step}", component, dict(upstream))
        self.step_keys[f"{stage}.{step}"] = key
        if looped:
            # one task runs once per item of the loop: a cache key of its own would be every iteration's. KFP's own
            # key covers the item and the upstream artifacts; this variable adds the code and config digests to it
            task.set_env_variable(STEP_KEY_ENV, key)
            task.set_caching_options(self.caching)
        else:
            task.set_caching_options(self.caching, cache_key=key if self.caching else None)
        return key

    def _key(self, name: str, component: Any, upstream: dict[str, str]) -> tuple[str, str]:
        """The input-addressed cache key of task ``name`` (and the code digest in it)."""
        code = self.code or lineage.component_code_digest(component)
        return lineage.task_cache_key(name, lineage.component_digest(component), self.config_yaml, code,
                                      upstream), code

    def parallelism(self, stage: str) -> int:
        return 1  # a part already uses every CPU (the gate's scan, packing's tokenizer workers)


class ClusterTarget(Target):
    """A KFP cluster: per-stage resources, GPU pools, secrets, retries and deadlines."""

    def __init__(self, config_yaml: str, settings: ClusterSettings = DEFAULT, *,
                 reuse: Mapping[str, ReusedStage] | None = None) -> None:
        super().__init__(config_yaml, reuse=reuse)
        self.settings = settings

    def configure(self, stage: str, component: Any, task: Any, inputs: dict[str, tuple[str, str]],
                  steps: Mapping[str, str] | None = None) -> None:
        apply(task, stage, self.settings)

    def configure_step(self, stage: str, step: str, component: Any, task: Any, upstream: Mapping[str, str], *,
                       looped: bool = False) -> str:
        apply(task, stage, self.settings)
        return ""

    def parallelism(self, stage: str) -> int:
        return self.settings.parallel_parts


class Dag:
    """The stages of one pipeline function, in the order they were added."""

    def __init__(self, target: Target, params: dict[str, Any]) -> None:
        self.target = target
        self.params = params
        self.stages: dict[str, dict[str, Any]] = {}
        self._origin: dict[tuple[str, str], tuple[str, str]] = {}  # (task, output) → (stage, output)

    def planned_stage(self, name: str, plan: Any, part: Any, merge: Any, *, params: Mapping[str, Any] | None = None,
                      **inputs: Any) -> dict[str, Any]:
        """Add stage ``name`` as a plan, its parts and a merge (data prep): ``plan`` (given the config) writes its
        output ``plan`` and returns the parts' indices; ``part`` runs once per index in a ``dsl.ParallelFor`` (on
        ``plan``, output ``part``); ``merge`` takes ``plan``, every part (``dsl.Collected``, in index order) and
        ``inputs``, and its outputs are the stage's. A reused stage imports the merge's outputs; nothing runs."""
        from kfp import dsl

        if name in self.target.reuse:
            return self.stage(name, merge, params=params, **inputs)
        if name in self.stages:
            raise ValueError(f"stage {name} added twice")
        planned = plan(config_yaml=self.params["config_yaml"])
        plan_key = self.target.configure_step(name, "plan", plan, planned, {})
        with dsl.ParallelFor(planned.outputs["Output"], parallelism=self.target.parallelism(name)) as index:
            each = part(config_yaml=self.params["config_yaml"], plan=planned.outputs["plan"], index=index)
            part_key = self.target.configure_step(name, "part", part, each, {"plan": plan_key}, looped=True)
        self.target.step_tasks[planned.name] = self.target.step_tasks[each.name] = name
        return self.stage(name, merge, params=params, steps={
            "plan": (planned.outputs["plan"], plan_key), "parts": (dsl.Collected(each.outputs["part"]), part_key)},
            **inputs)

    def stage(self, name: str, component: Any, *, params: Mapping[str, Any] | None = None,
              steps: Mapping[str, tuple[Any, str]] | None = None, **inputs: Any) -> dict[str, Any]:
        """Add stage ``name`` running ``component`` on ``inputs`` (outputs of earlier stages).

        ``params`` are extra parameter values (constants or KFP placeholders such as the run id); they
        are deliberately not part of the local cache key, so a run-specific value never forces a rerun.
        ``steps`` are outputs of the stage's own earlier tasks (:meth:`planned_stage`), each with its key.
        """
        from kfp import dsl

        if name in self.stages:
            raise ValueError(f"stage {name} added twice")
        reused = self.target.reuse.get(name)
        outputs: dict[str, Any] = {}
        if reused is not None:
            for out, cls in output_classes(component).items():
                if out not in reused.outputs:
                    raise Step3VLError(f"cannot reuse stage {name}: the earlier run recorded no output '{out}'")
                rec = reused.outputs[out]
                imp = dsl.importer(artifact_uri=rec.uri, artifact_class=cls, reimport=False, metadata=rec.metadata)
                outputs[out] = imp.output
                self._origin[(imp.name, "artifact")] = (name, out)
            self.target.keys[name] = reused.cache_key
        else:
            sources = {}
            for arg, channel in inputs.items():
                origin = self._origin.get((getattr(channel, "task_name", None), getattr(channel, "name", None)))
                if origin is None:
                    raise ValueError(f"stage {name}: input {arg} is not an output of an earlier stage")
                sources[arg] = origin
            steps = dict(steps or {})
            task = component(**self.params, **dict(params or {}), **inputs, **{k: ch for k, (ch, _) in steps.items()})
            self.target.configure(name, component, task, sources, {k: key for k, (_, key) in steps.items()})
            for out, channel in task.outputs.items():
                outputs[out] = channel
                self._origin[(task.name, out)] = (name, out)
        self.stages[name] = outputs
        return outputs

    def outputs(self, stages: Mapping[str, Any]) -> Any:
        """The pipeline's return value: every output of every stage in ``stages``."""
        missing = [s for s in stages if s not in self.stages]
        if missing:
            raise ValueError(f"stages {missing} are listed but not in the DAG")
        values = {field_name(s, o): self.stages[s][o] for s, comp in stages.items() for o in output_classes(comp)}
        return outputs_type(stages)(**values)
