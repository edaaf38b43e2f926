"""Config loading: every shipped file validates; bad keys/types name the key and the file."""

from pathlib import Path

import pytest

from step3vl import config
from step3vl.config import ConfigError, ModelConfig, PipelineConfig

CONF = Path(__file__).resolve().parent.parent / "conf"


TEST_CONF = Path(__file__).resolve().parent / "conf"


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")) + sorted(TEST_CONF.glob("*.yaml")),
                         ids=lambda p: p.name if p.parent == TEST_CONF else str(p.relative_to(CONF)))
def test_every_shipped_config_loads(path):
    if path.parent == TEST_CONF:
        assert config.load(PipelineConfig, path).data.sets
    elif path.parent.name == "model":
        cfg = config.load(ModelConfig, path)
        assert cfg.text.vocab_size >= cfg.tokenizer.vocab_size
    elif path.parent.name == "pipeline":
        cfg = config.load(PipelineConfig, path)
        assert isinstance(cfg.model, ModelConfig)
    else:
        pytest.fail(f"no loader for config folder {path.parent.name}: add one to this test")
    # the header comment is the command that runs it
    assert path.read_text().startswith("#"), f"{path} lacks its header comment"


def test_required_configs_exist():
    for name in ("model/tiny", "model/small", "model/step3vl-10b", "pipeline/tiny", "pipeline/step3vl-10b"):
        assert (CONF / f"{name}.yaml").is_file(), name


def test_10b_pipeline_has_paper_stage_sizes():
    cfg = config.load(PipelineConfig, CONF / "pipeline/step3vl-10b.yaml")
    p1, p2 = cfg.pretrain.phases
    assert p1.tokens + p2.tokens == pytest.approx(1.2e12)
    assert (p1.lr_start, p1.lr_end, p2.lr_start, p2.lr_end) == (5e-5, 1e-5, 1e-5, 6e-6)
    s1, s2 = cfg.sft.phases
    assert s1.tokens + s2.tokens == pytest.approx(2.26e11)
    assert (cfg.rlvr.iterations, cfg.rlvr.prompts_per_iteration, cfg.rlvr.rollouts) == (600, 512, 16)
    assert (cfg.rlhf.iterations, cfg.rlhf.prompts_per_iteration, cfg.rlhf.rollouts) == (300, 512, 8)
    assert sum(st.rl_iterations for st in cfg.pacore.curriculum) == 500
    assert (cfg.pacore.rl.prompts_per_iteration, cfg.pacore.rl.rollouts, cfg.pacore.rounds) == (64, 16, (16,))
    widths = [st.width for st in cfg.pacore.curriculum]
    assert widths == sorted(widths) and len(widths) == 2  # a smaller set first, then a larger one
    assert cfg.pretrain.zero_stage == 3 and cfg.model.text.num_hidden_layers == 36
    assert cfg.pretrain.steps_for(p1) == round(9e11 / (8192 * 4096))


def test_tiny_sft_mixture_ratios():
    cfg = config.load(PipelineConfig, CONF / "pipeline/tiny.yaml")
    text_families = {"text_math", "chat", "text"}
    for name, ratio in (("sft_stage1", 0.9), ("sft_stage2", 0.5)):
        fams = cfg.data.sets[name].families
        text = sum(f.n for k, f in fams.items() if k in text_families)
        assert text / sum(f.n for f in fams.values()) == pytest.approx(ratio), name


def test_dataset_references_are_checked(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("model: tiny\ndata:\n  sets:\n    a: {purpose: sft}\nsft:\n  phases:\n    - {data: b, steps: 1}\n")
    with pytest.raises(ConfigError, match=r"'sft\.phases\[0\]\.data' names dataset 'b'"):
        config.load(PipelineConfig, p)


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\ntext:\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"m\.yaml.*'text\.hiden_size'"):
        config.load(ModelConfig, p)


def test_wrong_type_names_key_and_file(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("vision:\n  layers: two\n")
    with pytest.raises(ConfigError, match=r"m\.yaml.*'vision\.layers' must be an int"):
        config.load(ModelConfig, p)
    p.write_text("vision:\n  use_rope2d: 'yes'\n")
    with pytest.raises(ConfigError, match=r"'vision\.use_rope2d' must be a bool"):
        config.load(ModelConfig, p)


def test_overrides_apply_and_are_checked():
    cfg = config.load(PipelineConfig, CONF / "pipeline/tiny.yaml", ["model.text.hidden_size=64", "seed=7"])
    assert cfg.model.text.hidden_size == 64 and cfg.seed == 7
    with pytest.raises(ConfigError, match=r"unknown key 'model\.text\.hidden_sise'"):
        config.load(PipelineConfig, CONF / "pipeline/tiny.yaml", ["model.text.hidden_sise=64"])
    with pytest.raises(ConfigError, match=r"'seed' must be an int"):
        config.load(PipelineConfig, CONF / "pipeline/tiny.yaml", ["seed=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        config.parse_overrides(["seed"])


def test_frozen_and_hash_stable():
    a = config.load(PipelineConfig, CONF / "pipeline/tiny.yaml")
    b = config.load(PipelineConfig, CONF / "pipeline/tiny.yaml")
    with pytest.raises(Exception):
        a.seed = 3  # type: ignore[misc]
    assert config.config_hash(a) == config.config_hash(b)
    c = config.load(PipelineConfig, CONF / "pipeline/tiny.yaml", ["seed=1"])
    assert config.config_hash(c) != config.config_hash(a)


def test_cross_field_validation(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("vision:\n  image_size: 30\n  patch_size: 4\n")
    with pytest.raises(ConfigError, match="image_size.*multiple of"):
        config.load(ModelConfig, p)
    p.write_text("text:\n  num_attention_heads: 6\n  num_key_value_heads: 4\n")
    with pytest.raises(ConfigError, match="num_attention_heads"):
        config.load(ModelConfig, p)


def test_yaml11_exponent_floats(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("model: tiny\npretrain:\n  phases:\n    - {lr_start: 1e-5, tokens: 9.0e11}\n")
    cfg = config.load(PipelineConfig, p)
    assert cfg.pretrain.phases[0].lr_start == 1e-5 and cfg.pretrain.phases[0].tokens == 9e11


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        config.load(ModelConfig, p)
    with pytest.raises(ConfigError, match="not found"):
        config.load(ModelConfig, tmp_path / "nope.yaml")
    p.write_text("model: nosuchmodel\n")
    with pytest.raises(ConfigError, match="no model config named 'nosuchmodel'"):
        config.load(PipelineConfig, p)


def test_override_inside_a_mapping_keeps_its_siblings():
    cfg = config.load(PipelineConfig, CONF / "pipeline/tiny.yaml", ["data.sets.eval.path=/x", "data.sets.rl.families.ocr.n=7"])
    assert cfg.data.sets["eval"].path == "/x" and cfg.data.sets["eval"].families  # siblings kept
    assert cfg.data.sets["rl"].families["ocr"].n == 7 and "text_math" in cfg.data.sets["rl"].families
    assert set(cfg.data.sets) == set(config.load(PipelineConfig, CONF / "pipeline/tiny.yaml").data.sets)
