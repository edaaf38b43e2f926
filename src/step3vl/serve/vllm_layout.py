"""What vLLM's built-in STEP3-VL support expects of a checkpoint: a vendored, hand-derived spec.

Derived by reading vLLM's source (not imported: vLLM cannot share this venv):

- ``vllm/model_executor/models/step_vl.py`` at vllm-project/vllm commit
  ``055e47c28003156421365af985d676fc921cb075`` (main, 2026; the ``vllm`` extra pins vllm==0.33.0):
  ``StepVLForConditionalGeneration`` (registered as architecture ``StepVLForConditionalGeneration``,
  module ``step_vl``), its ``PerceptionEncoder`` and its ``hf_to_vllm_mapper``.
- ``vllm/model_executor/models/step3_vl.py`` (its base class): ``forward`` marks image positions
  with ``config.image_token_id``; ``Step3VLProcessor`` finds ``<im_patch>`` in the tokenizer's
  vocabulary and hard-codes the 10B image geometry (728 px global view, 504 px crops, 169 / 81
  feature tokens, i.e. patch 14 and the 4x conv downsampling).
- ``vllm/transformers_utils/config.py``: ``model_type`` ``step_robotics`` is in neither vLLM's
  nor transformers' config registry, so the config class comes with the checkpoint
  (``auto_map`` + ``--trust-remote-code``), as in the official ``stepfun-ai/Step3-VL-10B``.

``test_export`` checks every export against this spec; ``docs/serving.md`` shows it as a table.
If vLLM changes, update this file from the new source and say which commit in ``SOURCE``.
"""

from __future__ import annotations

from typing import Any

SOURCE = {
    "repo": "vllm-project/vllm",
    "files": ["vllm/model_executor/models/step_vl.py", "vllm/model_executor/models/step3_vl.py"],
    "commit": "055e47c28003156421365af985d676fc921cb075",
    "pinned_release": "vllm==0.33.0",
}

ARCHITECTURE = "StepVLForConditionalGeneration"
MODEL_TYPE = "step_robotics"
CONFIG_MODULE = "configuration_step_vl"
AUTO_MAP = {"AutoConfig": f"{CONFIG_MODULE}.StepRoboticsConfig"}

# attributes of hf_config that vLLM reads (top level; step_vl.py + step3_vl.py)
TOP_LEVEL_KEYS = ("architectures", "model_type", "vision_config", "text_config", "projector_bias",
                  "image_token_id")
# hf_config.vision_config attributes read by PerceptionEncoder.__init__ (enable_patch: the processor)
VISION_CONFIG_KEYS = ("patch_size", "output_dim", "heads", "width", "layers", "use_abs_posemb", "use_cls_token",
                      "use_rope2d", "image_size", "use_ln_pre", "use_ln_post", "mlp_ratio", "ls_init_value",
                      "hidden_act")
# hf_config.text_config is handed to vLLM's registered Qwen3ForCausalLM
TEXT_CONFIG_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
TEXT_ARCHITECTURE = "Qwen3ForCausalLM"

# fixed in vLLM's encoder, configurable in ours: an export must use these values
VLLM_FIXED = {"vision.layer_norm_eps": 1e-5, "vision.rope_theta": 10000.0, "vision.use_rope2d": True}
# Step3VLProcessor's hard-coded geometry: images work in vLLM only for a checkpoint built to it
VLLM_IMAGE_GEOMETRY = {"image_size": 728, "crop_size": 504, "patch_size": 14}

# StepVLForConditionalGeneration.hf_to_vllm_mapper: checkpoint name -> vLLM parameter name
HF_TO_VLLM_PREFIX = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
HF_TO_VLLM_SUBSTR = {
    ".attn.in_proj_weight": ".attn.qkv_proj.weight",
    ".attn.in_proj_bias": ".attn.qkv_proj.bias",
    ".mlp.c_fc": ".mlp.fc1",
    ".mlp.c_proj": ".mlp.fc2",
}


def to_vllm_name(name: str) -> str:
    """The vLLM module parameter a checkpoint tensor is loaded into (the mapper, applied)."""
    for old, new in HF_TO_VLLM_PREFIX.items():
        if name.startswith(old):
            name = new + name[len(old):]
            break
    for old, new in HF_TO_VLLM_SUBSTR.items():
        name = name.replace(old, new)
    return name


def expected_weights(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape vLLM's ``StepVLForConditionalGeneration`` loads, for an exported
    ``config.json`` (names as stored in the checkpoint, before ``hf_to_vllm_mapper``)."""
    v, t = config["vision_config"], config["text_config"]
    w, p = int(v["width"]), int(v["patch_size"])
    grid = int(v["image_size"]) // p
    mlp = int(w * float(v["mlp_ratio"]))
    out: dict[str, tuple[int, ...]] = {"vision_model.conv1.weight": (w, 3, p, p)}
    if v["use_cls_token"]:
        out["vision_model.class_embedding"] = (w,)
    if v["use_abs_posemb"]:
        out["vision_model.positional_embedding"] = (int(bool(v["use_cls_token"])) + grid * grid, w)
    norms = [n for n, on in (("ln_pre", v["use_ln_pre"]), ("ln_post", v["use_ln_post"])) if on]
    for n in norms:
        out[f"vision_model.{n}.weight"] = (w,)
        out[f"vision_model.{n}.bias"] = (w,)
    for i in range(int(v["layers"])):
        b = f"vision_model.transformer.resblocks.{i}."
        out.update({
            b + "ln_1.weight": (w,), b + "ln_1.bias": (w,),
            b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
            b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
            b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
            b + "mlp.c_fc.weight": (mlp, w), b + "mlp.c_fc.bias": (mlp,),
            b + "mlp.c_proj.weight": (w, mlp), b + "mlp.c_proj.bias": (w,),
        })
        if v["ls_init_value"] is not None:
            out[b + "ls_1.gamma"] = (w,)
            out[b + "ls_2.gamma"] = (w,)
    out["vision_model.vit_downsampler1.weight"] = (2 * w, w, 3, 3)
    out["vision_model.vit_downsampler1.bias"] = (2 * w,)
    out["vision_model.vit_downsampler2.weight"] = (4 * w, 2 * w, 3, 3)
    out["vision_model.vit_downsampler2.bias"] = (4 * w,)
    h = int(t["hidden_size"])
    out["vit_large_projector.weight"] = (h, 4 * w)
    if config["projector_bias"]:
        out["vit_large_projector.bias"] = (h,)
    vocab, hd = int(t["vocab_size"]), int(t["head_dim"])
    nq, nkv, inter = int(t["num_attention_heads"]), int(t["num_key_value_heads"]), int(t["intermediate_size"])
    out["model.embed_tokens.weight"] = (vocab, h)
    for i in range(int(t["num_hidden_layers"])):
        b = f"model.layers.{i}."
        out.update({
            b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,),
            b + "self_attn.q_proj.weight": (nq * hd, h), b + "self_attn.k_proj.weight": (nkv * hd, h),
            b + "self_attn.v_proj.weight": (nkv * hd, h), b + "self_attn.o_proj.weight": (h, nq * hd),
            b + "self_attn.q_norm.weight": (hd,), b + "self_attn.k_norm.weight": (hd,),
            b + "mlp.gate_proj.weight": (inter, h), b + "mlp.up_proj.weight": (inter, h),
            b + "mlp.down_proj.weight": (h, inter),
        })
    out["model.norm.weight"] = (h,)
    if not t["tie_word_embeddings"]:  # a tied head is the embedding: vLLM skips lm_head.* then
        out["lm_head.weight"] = (vocab, h)
    return out
