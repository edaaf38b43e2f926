"""`step3vl export`: the Hugging Face layout vLLM's built-in step_vl loads, checked against the spec
vendored from vLLM's source (step3vl.serve.vllm_layout), and an identity round trip of the weights."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from step3vl.serve import vllm_layout
from step3vl.serve.export import ExportError, export_hf, hf_config, load_export_state


@pytest.fixture(scope="module")
def checkpoint(micro_cfg, tmp_path_factory):
    from step3vl.serve.tiny import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("export") / "ckpt", micro_cfg.model, seed=1)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    export_hf(checkpoint, out)
    return out


def test_config_has_every_key_vllm_reads(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [vllm_layout.ARCHITECTURE]
    assert config["model_type"] == vllm_layout.MODEL_TYPE
    assert config["auto_map"] == vllm_layout.AUTO_MAP
    missing = [k for k in vllm_layout.TOP_LEVEL_KEYS if k not in config]
    missing += [f"vision_config.{k}" for k in vllm_layout.VISION_CONFIG_KEYS if k not in config["vision_config"]]
    missing += [f"text_config.{k}" for k in vllm_layout.TEXT_CONFIG_KEYS if k not in config["text_config"]]
    assert not missing
    assert config["vision_config"]["use_rope2d"] is True
    assert config["text_config"]["architectures"] == [vllm_layout.TEXT_ARCHITECTURE]
    tok = json.loads((exported / "tokenizer.json").read_text())
    patch_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<im_patch>")
    assert config["image_token_id"] == patch_id  # vLLM marks image positions with it
    gen = json.loads((exported / "generation_config.json").read_text())
    assert len(gen["eos_token_id"]) == 2


def test_weights_are_exactly_the_names_and_shapes_vllm_loads(exported):
    config = json.loads((exported / "config.json").read_text())
    expected = vllm_layout.expected_weights(config)
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert stored == expected
    # tied head: left out, as vLLM's Qwen3 skips lm_head.* then
    assert config["text_config"]["tie_word_embeddings"] and "lm_head.weight" not in stored
    vllm_names = {vllm_layout.to_vllm_name(k) for k in stored}
    assert "vision_model.transformer.resblocks.0.attn.qkv_proj.weight" in vllm_names
    assert "vision_model.transformer.resblocks.0.mlp.fc1.bias" in vllm_names
    assert "language_model.model.embed_tokens.weight" in vllm_names
    assert not any(".in_proj_" in n or ".c_fc." in n or n.startswith("model.") for n in vllm_names)


def test_export_round_trips_into_the_same_model(checkpoint, exported):
    from step3vl.model.loading import load_model
    from step3vl.rl.rollout import Prompt, encode_prompt, merge_images

    ref = load_model(checkpoint)
    fresh = load_model(checkpoint)
    state = load_export_state(exported)
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.zero_()
    missing, unexpected = fresh.model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # restored by the tie
    from PIL import Image

    prompt = Prompt([{"role": "user", "content": "<image>\nWhat colour?"}], [Image.new("RGB", (64, 64), (9, 99, 199))])
    ids, images = encode_prompt(prompt, ref.tokenizer, ref.processor)
    batch = merge_images([images], ref.processor.vision)
    with torch.no_grad():
        a = ref.model(torch.tensor([ids]), batch).logits
        b = fresh.model(torch.tensor([ids]), batch).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_class_loads_through_transformers_remote_code(exported):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(exported), trust_remote_code=True)
    assert c.architectures == [vllm_layout.ARCHITECTURE]
    assert type(c.text_config).__name__ == "Qwen3Config" and c.hidden_size == c.text_config.hidden_size
    for k in vllm_layout.VISION_CONFIG_KEYS:
        assert hasattr(c.vision_config, k), k
    assert c.vision_config.output_dim is None and c.vision_config.use_cls_token is False


def test_chat_template_renders_vllm_placeholder(exported):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(exported))
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert "<im_patch>hi" in text and "<image>" not in text
    assert json.loads((exported / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_sharded_export_has_an_index(checkpoint, exported, tmp_path):
    res = export_hf(checkpoint, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(res.weight_files) > 1
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(res.weight_files)
    a, b = load_export_state(exported), load_export_state(tmp_path / "sharded")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ExportError, match="not empty"):
        export_hf(checkpoint, tmp_path / "sharded")


def test_what_vllm_cannot_represent_is_refused(micro_cfg):
    cfg = micro_cfg.model
    bad = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, layer_norm_eps=1e-6))
    with pytest.raises(ExportError, match="layer_norm_eps"):
        hf_config(bad, 6, "float32")
    no_ls = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, ls_init_value=0.0))
    assert hf_config(no_ls, 6, "float32")["vision_config"]["ls_init_value"] is None  # vLLM: no layer scale


def test_cli_export(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from step3vl.cli import app

    res = CliRunner().invoke(app, ["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "o"),
                                   "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert "text only in vLLM" in " ".join(res.output.split())  # the tiny model's image geometry is not vLLM's 728/504
    info = json.loads((tmp_path / "o" / "step3vl_export.json").read_text())
    assert info["dtype"] == "bfloat16" and info["vllm_images"] is False
    assert "--trust-remote-code" in info["serve"]
    with safe_open(str(tmp_path / "o" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
