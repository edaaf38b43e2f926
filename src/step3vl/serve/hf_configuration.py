"""The config classes of an exported checkpoint, shipped in it as ``configuration_step_vl.py``.

The official STEP3-VL-10B checkpoint declares ``model_type: step_robotics`` and brings its config
class as remote code (``auto_map``); neither transformers nor vLLM registers that model type, so
vLLM loads it with ``--trust-remote-code`` and builds its own built-in
``StepVLForConditionalGeneration`` on top. This module is this project's implementation of that
config interface (the attributes vLLM's ``step_vl.py`` reads); ``step3vl.serve.export`` copies
this file verbatim into every export. It must import nothing but transformers.
"""

from transformers import PretrainedConfig, Qwen3Config


class StepRoboticsVisionEncoderConfig(PretrainedConfig):
    """The PE vision encoder, in the attribute names vLLM's ``PerceptionEncoder`` reads."""

    model_type = "step_robotics_vision_encoder"

    def __init__(self, width=1536, layers=47, heads=16, num_channels=3, image_size=728, patch_size=14,
                 mlp_ratio=8960 / 1536, hidden_act="gelu", layer_norm_eps=1e-5, use_cls_token=False,
                 use_ln_pre=True, use_ln_post=True, use_abs_posemb=True, use_rope2d=True, ls_init_value=0.1,
                 output_dim=None, enable_patch=True, **kwargs):
        self.width = width
        self.layers = layers
        self.heads = heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.mlp_ratio = mlp_ratio
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.use_cls_token = use_cls_token
        self.use_ln_pre = use_ln_pre
        self.use_ln_post = use_ln_post
        self.use_abs_posemb = use_abs_posemb
        self.use_rope2d = use_rope2d
        self.ls_init_value = ls_init_value
        self.output_dim = output_dim
        self.enable_patch = enable_patch
        super().__init__(**kwargs)


class StepRoboticsConfig(PretrainedConfig):
    """Top level: ``vision_config`` (PE encoder), ``text_config`` (Qwen3), projector and image token."""

    model_type = "step_robotics"

    def __init__(self, vision_config=None, text_config=None, projector_bias=True, image_token_id=6,
                 understand_projector_stride=2, **kwargs):
        if not isinstance(vision_config, PretrainedConfig):
            vision_config = StepRoboticsVisionEncoderConfig(**(vision_config or {}))
        if not isinstance(text_config, PretrainedConfig):
            text_config = Qwen3Config(**(text_config or {}))
        self.vision_config = vision_config
        self.text_config = text_config
        self.projector_bias = projector_bias
        self.image_token_id = image_token_id
        self.understand_projector_stride = understand_projector_stride
        self.hidden_size = text_config.hidden_size
        super().__init__(**kwargs)
