"""Typed, frozen configuration: YAML files under ``conf/`` plus ``key=value`` overrides.

Every concern has its own frozen dataclass. ``load(cls, path, overrides)`` reads a YAML file,
applies dotted overrides (``train.lr=3e-4``) and builds the dataclass tree, refusing unknown keys
and wrong types with an error that names the key and the file. A field may reference another
YAML file by name (``model: tiny`` in a pipeline file loads ``conf/model/tiny.yaml``).

The resolved config is what gets logged (``to_dict``) and hashed (``config_hash``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from step3vl.errors import Step3VLError

T = TypeVar("T")

PACKAGE_DIR = Path(__file__).resolve().parent
_YAML11_FLOAT_GAP = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(Step3VLError, ValueError):
    """A config file or override is wrong; the message names the key and the file."""


def conf_dir() -> Path:
    """The ``conf/`` directory: ``$STEP3VL_CONF``, else the project checkout's, else the packaged copy."""
    import os

    env = os.environ.get("STEP3VL_CONF")
    if env:
        return Path(env)
    for cand in (PACKAGE_DIR.parent.parent / "conf", PACKAGE_DIR / "conf"):
        if cand.is_dir():
            return cand
    raise ConfigError("cannot find the conf/ directory; set STEP3VL_CONF")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class VisionConfig:
    """PE-style ViT vision encoder and the multi-crop image processor (names follow vLLM's step_vl)."""

    image_size: int = 728  # global view side, pixels
    crop_size: int = 504  # local crop side, pixels
    max_crops: int = 3  # local crops per image (0 = global view only)
    patch_size: int = 14
    width: int = 1536
    layers: int = 47
    heads: int = 16
    mlp_ratio: float = 5.833333333333333
    ls_init_value: float = 0.1  # layer scale; 0 disables it
    hidden_act: str = "gelu"
    use_cls_token: bool = False
    use_abs_posemb: bool = True
    use_rope2d: bool = True
    use_ln_pre: bool = True
    use_ln_post: bool = True
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5

    @property
    def mlp_dim(self) -> int:
        return int(round(self.width * self.mlp_ratio))


@dataclass(frozen=True)
class TextConfig:
    """The Qwen3 decoder (fields map 1:1 onto ``transformers.Qwen3Config``)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 40960
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0


@dataclass(frozen=True)
class TokenizerConfig:
    """The locally trained byte-level BPE tokenizer (no hub downloads)."""

    vocab_size: int = 512  # BPE vocabulary incl. bytes and special tokens (<= text.vocab_size)
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """One architecture, any size: vision encoder + conv projector + Qwen3 decoder."""

    name: str = "step3vl"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    projector_bias: bool = True


# --------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class FamilySpec:
    """How many records of one synthetic family go into a dataset, at which difficulty levels."""

    n: int = 0
    difficulty: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset written by data prep (a mixture of families, or a user dataset directory)."""

    purpose: Literal["pretrain", "sft", "rl", "preference", "eval"] = "sft"
    split: Literal["train", "eval"] = "train"
    families: dict[str, FamilySpec] = field(default_factory=dict)
    path: str = ""  # a user dataset (directory of *.jsonl shards) instead of synthetic families


@dataclass(frozen=True)
class DataConfig:
    """The data prep stage: every dataset the recipe consumes, by name."""

    seed: int = 0
    image_size: int = 64  # side of generated images, pixels
    shard_size: int = 2000  # records per shard: bounds memory
    # packing: rows kept open for best-fit (1 = next-fit: a row closes when the next sample does not fit).
    # 32 cuts tiny's padding from ~17% to ~4.5% of every row, but changes every model trained on it
    pack_open_rows: int = 1
    # texts the tokenizer is trained on: 0 = every text of the training sets; else at most this many, from each
    # training set in proportion to its size on disk (its first records), so that it never reads a whole corpus
    tokenizer_max_texts: int = 0
    # a set's input shards per part: data prep gates and packs each part on its own (0 = the whole set is one part)
    part_shards: int = 0
    sets: dict[str, DatasetSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class PhaseConfig:
    """One LR phase of a training stage: its data and its LR decay range."""

    data: str = ""  # a dataset name from data.sets
    steps: int = 0  # optimizer steps; 0 = derived from tokens / (batch_size * seq_len)
    tokens: float = 0.0
    lr_start: float = 0.0
    lr_end: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """One training stage (pre-training or SFT) on the one training loop."""

    phases: tuple[PhaseConfig, ...] = ()
    loss_on: Literal["all", "assistant"] = "all"  # SFT: assistant tokens only
    seq_len: int = 128  # packed sequence length
    batch_size: int = 64  # sequences per optimizer step (global)
    micro_batch_size: int = 0  # sequences per forward pass per process; 0 = batch_size
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = 100
    log_every: int = 10
    eval_data: str = ""  # held-out dataset for the loss curve
    eval_every: int = 0
    zero_stage: int = 0  # DeepSpeed ZeRO stage when launched distributed (0 = plain DDP-free torch)
    # checkpoints without optimizer state (distributed ones of earlier step3vl versions): resume them anyway
    # (weights, step, data position, RNG) with fresh AdamW moments, instead of refusing; not an exact resume
    resume_fresh_optimizer: bool = False

    def steps_for(self, phase: PhaseConfig) -> int:
        if phase.steps:
            return phase.steps
        return int(round(phase.tokens / (self.batch_size * self.seq_len)))


@dataclass(frozen=True)
class RLConfig:
    """An RL stage (RLVR, RLHF, PaCoRe training): iterations of rollouts → rewards → updates."""

    data: str = ""  # prompt dataset name from data.sets
    iterations: int = 0
    prompts_per_iteration: int = 16
    rollouts: int = 8  # samples per prompt
    max_response_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    backend: Literal["torch", "vllm"] = "torch"
    algorithm: str = "grpo"  # a registered advantage estimator: gae (the recipe's PPO) | grpo | reinforce
    gamma: float = 1.0
    lam: float = 1.0
    epochs: int = 2  # passes over each iteration's rollouts
    minibatch_size: int = 64  # sequences per optimizer step
    lr: float = 3e-4
    value_lr: float = 1e-3
    clip_eps: float = 0.2
    value_coef: float = 0.5
    kl_coef: float = 0.0  # KL to the frozen starting policy
    entropy_coef: float = 0.0
    grad_clip: float = 1.0
    format_weight: float = 0.0  # shaping: weight of the <think>…</think> format reward
    checkpoint_every: int = 5
    # dynamic sampling (DAPO): roll out prompts_per_iteration × oversample prompts and train on
    # prompts_per_iteration of them, those whose rollouts disagree first (equal rewards teach nothing)
    oversample: float = 1.0
    filter_groups: bool = False
    # RLHF only: reward = genrm_weight * GenRM preference + behaviour regularisation terms
    genrm_weight: float = 1.0
    verifier_weight: float = 0.0  # keep verifiable accuracy in RLHF (0 = GenRM + regularisers only)
    language_weight: float = 0.1
    repetition_weight: float = 0.2
    length_weight: float = 0.1
    abstention_weight: float = 0.5
    # RLHF only: the GenRM judge's SFT steps and its held-out pairwise-accuracy check
    genrm_steps: int = 100
    genrm_heldout_pairs: int = 200


@dataclass(frozen=True)
class PaCoReStep:
    """One step of the PaCoRe training curriculum: fresh message sets from the current policy, then training."""

    prompts: int = 64  # problems whose message sets are generated (from the policy as it is now)
    width: int = 16  # parallel responses per problem: the references the synthesis reads
    sft_steps: int = 0  # supervised warm-up steps on correct synthesis answers
    rl_iterations: int = 0  # outcome-based RL iterations on the synthesis prompts


@dataclass(frozen=True)
class PaCoReConfig:
    """PaCoRe training: synthesis over cached parallel responses, as a curriculum of steps.

    Each step regenerates its message sets from the current policy (on-policy caching), stores them
    as a dataset, warms the synthesis up by SFT on the correct answers, then runs the RL loop with
    the records' verifiers. ``rounds`` is the PaCoRe setting evaluation and serving use by default.
    """

    data: str = ""  # prompt dataset (verifiable records) from data.sets
    curriculum: tuple[PaCoReStep, ...] = ()
    max_response_tokens: int = 32  # per parallel response and per synthesis answer
    temperature: float = 1.0  # sampling of the parallel responses (the recipe's T=1)
    top_p: float = 1.0
    seq_len: int = 256  # SFT context: the controller prompt carries every reference's conclusion
    solver_mix: float = 1.0  # plain problems per synthesis record in the warm-up (keeps the solver itself)
    # where those plain problems come from: "" = the PaCoRe set's own problems; another verifiable set
    # (e.g. the RL set, every family) keeps the skills a math-only warm-up would otherwise wear away
    solver_data: str = ""
    # the warm-up's synthesis target: "trace" = the reference's whole reasoning then its answer;
    # "answer" = the answer alone (an empty think): the synthesis weighs the references' conclusions
    # and checks them against the problem instead of re-deriving every step
    synthesis_target: Literal["trace", "answer"] = "trace"
    # which message sets the warm-up trains on: "all"; "solved" = at least one reference is right (a
    # set none of them solves teaches the synthesis to ignore its references); "informative" = solved
    # and not unanimous (the references disagree, so weighing them matters)
    synthesis_filter: Literal["all", "solved", "informative"] = "all"
    # share of message sets shown with a seeded random smaller subset of their references (1 .. width-1):
    # trained only on full-width sets, the synthesis misreads the problem when it sees fewer references
    # (PaCoRe([1]) far under a single answer); inference may use any width
    subset_share: float = 0.0
    batch_size: int = 32
    lr_start: float = 3.0e-4
    lr_end: float = 1.0e-4
    warmup_steps: int = 5
    rl: RLConfig = field(default_factory=RLConfig)  # the RL part (its iterations come from each step)
    rounds: tuple[int, ...] = (16,)
    # accuracy-vs-rollouts curve of the trained model on held-out reasoning records (0 = no curve)
    scaling_ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    scaling_per_family: int = 0
    scaling_families: tuple[str, ...] = ("text_math", "mm_math")
    scaling_data: str = "eval"


@dataclass(frozen=True)
class StorageConfig:
    """Where artifacts go. Credentials/endpoints never live here: they come from the environment."""

    root: str = ".step3vl/artifacts"  # local path or s3://bucket/prefix


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking. Empty ``uri`` = embedded SQLite under the project's ``.step3vl/``."""

    uri: str = ""
    experiment: str = "step3vl"
    registered_model: str = "step3vl-tiny"
    # how long a stage that lost its tracking server waits at the end for it to come back before failing
    # (its metrics stay journaled either way; see tracking.MetricSink)
    flush_timeout_s: float = 300.0


@dataclass(frozen=True)
class PromotionConfig:
    """The eval gate a registered version must pass before an alias (``champion``) moves to it.

    Accuracies are read from the version's ``metric.<mode>/<family>/accuracy`` tags (the evaluate
    stage's metrics.json); all thresholds are accuracies in [0, 1]. With no champion yet, only
    ``min_accuracy`` applies.
    """

    mode: str = "greedy"  # which evaluation's accuracies the gate reads: greedy | sere | majority@K | pacore
    headline: str = "text_math"  # the family that must not get worse (by min_improvement)
    min_accuracy: dict[str, float] = field(default_factory=dict)  # absolute floor per family
    max_regression: float = 0.02  # largest drop vs. the champion allowed in any family
    min_improvement: float = 0.0  # the headline family must beat the champion by at least this


@dataclass(frozen=True)
class EvalConfig:
    """The evaluate stage (and ``step3vl eval``): which modes, on how much of the held-out set."""

    modes: tuple[str, ...] = ("greedy", "sere")  # greedy | sere | majority@K | pacore
    per_family: int = 0  # records per task family of the eval set; 0 = all of them
    batch_size: int = 128  # prompts per engine call
    contamination_check: bool = True  # hash the eval set against every training set


@dataclass(frozen=True)
class PipelineConfig:
    """A whole recipe run: which model, the size of every stage, where things go."""

    name: str = "tiny"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    rlvr: RLConfig = field(default_factory=RLConfig)
    rlhf: RLConfig = field(default_factory=RLConfig)
    pacore: PaCoReConfig = field(default_factory=PaCoReConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Which conf/ subfolder a string reference for a nested dataclass resolves in.
_REFERENCE_DIRS: dict[type, str] = {ModelConfig: "model", PipelineConfig: "pipeline"}


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (converted where lossless)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp in _REFERENCE_DIRS:
            ref = _resolve_reference(value, _REFERENCE_DIRS[tp], source)
            return _build(tp, _read_yaml(ref), str(ref), prefix="")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping for {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, source, prefix=key + ".")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{source}: '{key}' must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{source}: '{key}' has the wrong type: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__} {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        items = [_coerce(inner, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(kt, k, key, source): _coerce(vt, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be a bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{source}: '{key}' must be an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT_GAP.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads "1e-5" / "9.0e11" as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{source}: '{key}': unsupported annotation {tp!r}")  # pragma: no cover


def _build(cls: type[T], data: dict[str, Any], source: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' for {cls.__name__} (allowed: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k, source) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {e}") from e
    _validate(obj, source, prefix)
    return obj


def _validate(obj: Any, source: str, prefix: str) -> None:
    """Cross-field checks that types cannot express."""
    if isinstance(obj, VisionConfig):
        for k in ("image_size", "patch_size", "width", "layers", "heads"):
            if getattr(obj, k) <= 0:
                raise ConfigError(f"{source}: '{prefix}{k}' must be > 0")
        for k in ("image_size", "crop_size"):
            side = getattr(obj, k)
            if side % (obj.patch_size * 4):
                raise ConfigError(
                    f"{source}: '{prefix}{k}'={side} must be a multiple of 4*patch_size={4 * obj.patch_size} "
                    "(the projector downsamples the patch grid 4x)"
                )
        if obj.width % obj.heads:
            raise ConfigError(f"{source}: '{prefix}width' ({obj.width}) must be divisible by heads ({obj.heads})")
        if obj.use_rope2d and (obj.width // obj.heads) % 4:
            raise ConfigError(f"{source}: '{prefix}width/heads' must be divisible by 4 for 2D RoPE")
    if isinstance(obj, TextConfig):
        if obj.num_attention_heads % obj.num_key_value_heads:
            raise ConfigError(
                f"{source}: '{prefix}num_attention_heads' ({obj.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({obj.num_key_value_heads})"
            )
    if isinstance(obj, PipelineConfig):
        names = set(obj.data.sets)
        refs = [(f"{st}.phases[{i}].data", ph.data) for st in ("pretrain", "sft")
                for i, ph in enumerate(getattr(obj, st).phases)]
        refs += [(f"{st}.eval_data", getattr(obj, st).eval_data) for st in ("pretrain", "sft")]
        refs += [(f"{st}.data", getattr(obj, st).data) for st in ("rlvr", "rlhf", "pacore")]
        refs += [("pacore.solver_data", obj.pacore.solver_data)]
        for key, ref in refs:
            if ref and names and ref not in names:
                raise ConfigError(f"{source}: '{prefix}{key}' names dataset '{ref}', not one of data.sets: "
                                  f"{', '.join(sorted(names))}")
    if isinstance(obj, RLConfig) and obj.oversample < 1.0:
        raise ConfigError(f"{source}: '{prefix}oversample' must be >= 1 (prompts rolled out per prompt trained), "
                          f"got {obj.oversample}")
    if isinstance(obj, DataConfig) and obj.pack_open_rows < 1:
        raise ConfigError(f"{source}: '{prefix}pack_open_rows' must be >= 1 (1 = next-fit packing), "
                          f"got {obj.pack_open_rows}")
    if isinstance(obj, DataConfig) and obj.part_shards < 0:
        raise ConfigError(f"{source}: '{prefix}part_shards' must be >= 0 (0 = a set is one part), "
                          f"got {obj.part_shards}")
    if isinstance(obj, DataConfig) and obj.tokenizer_max_texts < 0:
        raise ConfigError(f"{source}: '{prefix}tokenizer_max_texts' must be >= 0 (0 = every training text), "
                          f"got {obj.tokenizer_max_texts}")
    if isinstance(obj, TrackingConfig) and obj.flush_timeout_s < 0:
        raise ConfigError(f"{source}: '{prefix}flush_timeout_s' must be >= 0, got {obj.flush_timeout_s}")
    if isinstance(obj, PaCoReConfig):
        for i, st in enumerate(obj.curriculum):
            if st.prompts < 1 or not 1 <= st.width <= 256 or st.sft_steps < 0 or st.rl_iterations < 0:
                raise ConfigError(f"{source}: '{prefix}curriculum[{i}]' needs prompts >= 1, width in 1..256 and "
                                  f"non-negative sft_steps/rl_iterations, got {st}")
        if not 0.0 <= obj.subset_share <= 1.0:
            raise ConfigError(f"{source}: '{prefix}subset_share' must be a share in [0, 1], got {obj.subset_share}")
        if not obj.rounds or any(not 1 <= w <= 256 for w in obj.rounds):
            raise ConfigError(f"{source}: '{prefix}rounds' must list widths in 1..256, got {list(obj.rounds)}")
    if isinstance(obj, EvalConfig):
        for mode in obj.modes:
            if mode not in ("greedy", "sere", "pacore") and not re.fullmatch(r"majority@[1-9]\d*", mode):
                raise ConfigError(f"{source}: '{prefix}modes' has {mode!r}: greedy, sere, majority@K or pacore")
        if obj.per_family < 0 or obj.batch_size < 1:
            raise ConfigError(f"{source}: '{prefix}per_family' must be >= 0 and '{prefix}batch_size' >= 1")
    if isinstance(obj, PromotionConfig):
        if obj.mode not in ("greedy", "sere", "pacore") and not re.fullmatch(r"majority@[1-9]\d*", obj.mode):
            raise ConfigError(f"{source}: '{prefix}mode' is {obj.mode!r}: greedy, sere, majority@K or pacore")
        if not obj.headline:
            raise ConfigError(f"{source}: '{prefix}headline' must name an eval family")
        for fam, floor in obj.min_accuracy.items():
            if not 0.0 <= floor <= 1.0:
                raise ConfigError(f"{source}: '{prefix}min_accuracy.{fam}' must be an accuracy in [0, 1], got {floor}")
        if not 0.0 <= obj.max_regression <= 1.0:
            raise ConfigError(f"{source}: '{prefix}max_regression' must be in [0, 1], got {obj.max_regression}")
        if not -1.0 <= obj.min_improvement <= 1.0:
            raise ConfigError(f"{source}: '{prefix}min_improvement' must be in [-1, 1], got {obj.min_improvement}")
    if isinstance(obj, ModelConfig) and obj.tokenizer.vocab_size > obj.text.vocab_size:
        raise ConfigError(
            f"{source}: '{prefix}tokenizer.vocab_size' ({obj.tokenizer.vocab_size}) exceeds "
            f"'{prefix}text.vocab_size' ({obj.text.vocab_size})"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_reference(name: str, subdir: str, source: str) -> Path:
    """``tiny`` → conf/<subdir>/tiny.yaml; a path ending in .yaml is taken relative to the referring file."""
    if name.endswith((".yaml", ".yml")):
        p = Path(name)
        if not p.is_absolute() and source and Path(source).exists():
            rel = Path(source).parent / p
            p = rel if rel.exists() else p
        return p
    p = conf_dir() / subdir / f"{name}.yaml"
    if not p.exists():
        avail = sorted(q.stem for q in (conf_dir() / subdir).glob("*.yaml"))
        raise ConfigError(f"{source}: no {subdir} config named '{name}' (available: {', '.join(avail)})")
    return p


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` → nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': cannot parse value: {e}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any], cls: type | None, source: str, prefix: str = "") -> dict[str, Any]:
    """Deep-merge overrides into raw YAML data; a string reference being overridden is expanded first."""
    out = dict(base)
    hints = typing.get_type_hints(cls) if cls is not None and dataclasses.is_dataclass(cls) else {}
    for k, v in over.items():
        sub_cls = hints.get(k)
        if isinstance(v, dict) and get_origin(sub_cls) is dict and isinstance(out.get(k), dict):
            # a mapping field (e.g. data.sets): merge entry by entry with the value type
            out[k] = _merge_mapping(out[k], v, get_args(sub_cls)[1], source, prefix + k + ".")
            continue
        if isinstance(v, dict) and sub_cls is not None and dataclasses.is_dataclass(sub_cls):
            cur = out.get(k, {})
            if isinstance(cur, str) and sub_cls in _REFERENCE_DIRS:
                cur = _read_yaml(_resolve_reference(cur, _REFERENCE_DIRS[sub_cls], source))
            if cur is None:
                cur = {}
            if not isinstance(cur, dict):
                raise ConfigError(f"{source}: '{k}' is not a mapping and cannot take nested overrides")
            out[k] = _merge(cur, v, sub_cls, source, prefix + k + ".")
        else:
            if cls is not None and hints and k not in hints:
                raise ConfigError(
                    f"{source} (override): unknown key '{prefix}{k}' for {cls.__name__} "
                    f"(allowed: {', '.join(sorted(hints))})"
                )
            out[k] = v
    return out


def _merge_mapping(base: dict[str, Any], over: dict[str, Any], value_cls: Any, source: str, prefix: str) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and dataclasses.is_dataclass(value_cls):
            out[k] = _merge(out[k], v, value_cls, source, prefix + k + ".")
        else:
            out[k] = v
    return out


def load(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load a YAML file into ``cls``, applying ``key=value`` overrides. Raises ``ConfigError``."""
    path = Path(path)
    data = _read_yaml(path)
    if overrides:
        data = _merge(data, parse_overrides(list(overrides)), cls, str(path))
    return _build(cls, data, str(path))


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    return _build(cls, data, source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples → lists) for logging/serialising."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_hash(cfg: Any) -> str:
    """Stable sha256 of the resolved config (first 16 hex digits)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_any(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig | ModelConfig:
    """Load a pipeline or a model config, deciding by the folder it sits in (``conf/model/`` → model)."""
    p = Path(path)
    if p.parent.name == "model":
        return load(ModelConfig, p, overrides)
    return load(PipelineConfig, p, overrides)
