"""Phi3VConfig: the official config.json of Phi-3.5-vision (and Phi-3-vision-128k), read and written as is."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig
from transformers.models.phi3.configuration_phi3 import Phi3Config

# The official code hard-codes this CLIP; config.json only names it in img_processor.model_name.
CLIP_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
DEFAULT_IMG_PROCESSOR = {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                         "name": "clip_vision_model", "num_img_tokens": 144}
DEFAULT_EMBD_LAYER = {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                      "use_hd_transform": True, "with_learnable_separator": True}
OFFICIAL_CONFIG = Path(__file__).parent / "configs" / "phi-3.5-vision-instruct.json"
# config.json of each official checkpoint this code loads: Phi-3.5-vision and its predecessor Phi-3-vision-128k (same
# tensor names and image embedding; its own LongRoPE factors, no pad_token_id / dropout keys, 131072 window).
OFFICIAL_CONFIGS = {"phi-3.5-vision-instruct": OFFICIAL_CONFIG,
                    "phi-3-vision-128k-instruct": OFFICIAL_CONFIG.parent / "phi-3-vision-128k-instruct.json"}


@strict
class Phi3VConfig(Phi3Config):
    """The official `config.json` (model_type "phi3_v"): Phi-3 fields + `embd_layer` + `img_processor`, and our
    `vision_config` for other CLIP towers (tiny test models), written only when it differs from the official one."""

    model_type = "phi3_v"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig}

    # No default pad id, as the official Phi3VConfig (Phi-3-vision-128k's config.json sets none; Phi3Config: 32000)
    pad_token_id: int | None = None
    embd_layer: dict | None = None
    img_processor: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None

    def __post_init__(self, **kwargs):
        # The hub config.json says flash_attention_2, which fails wherever flash-attn is missing: the caller picks.
        kwargs.pop("_attn_implementation", None)
        kwargs.pop("auto_map", None)  # remote-code pointers; we are the code
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        if self.vision_config is None:
            self.vision_config = dict(CLIP_VIT_L_336)
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, **kwargs):
        # Official: rope_scaling = {"type": "su", short_factor, long_factor}. Phi3Config raises a KeyError on it in
        # transformers 5.x (see the spec, 6.3), so hand it over in the "longrope" form with its switch point.
        rope_scaling = kwargs.get("rope_scaling")
        if rope_scaling and rope_scaling.get("type", rope_scaling.get("rope_type")) in ("su", "longrope"):
            kwargs["rope_scaling"] = {
                "rope_type": "longrope", "short_factor": list(rope_scaling["short_factor"]),
                "long_factor": list(rope_scaling["long_factor"]),
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "factor": self.max_position_embeddings / self.original_max_position_embeddings,
            }
        return super().convert_rope_params_to_dict(**kwargs)

    def to_dict(self) -> dict:
        """The official layout: rope_scaling/rope_theta instead of rope_parameters, and no default CLIP."""
        out = super().to_dict()
        rope = out.pop("rope_parameters", None) or {}
        out["rope_theta"] = rope.get("rope_theta", 10000.0)
        out["rope_scaling"] = ({"long_factor": rope["long_factor"], "short_factor": rope["short_factor"], "type": "su"}
                               if rope.get("rope_type") == "longrope" else None)
        vision = out.pop("vision_config")
        if any(vision[k] != v for k, v in CLIP_VIT_L_336.items()):
            out["vision_config"] = {k: vision[k] for k in CLIP_VIT_L_336}
        return out

    def to_diff_dict(self) -> dict:
        out = super().to_diff_dict()
        if "dtype" in out:  # config.json files name it torch_dtype (transformers 5 reads both)
            out["torch_dtype"] = out.pop("dtype")
        return out

    @classmethod
    def official(cls, variant: str = "phi-3.5-vision-instruct", **overrides) -> Phi3VConfig:
        """An official config.json (full size; `variant` is a key of OFFICIAL_CONFIGS), with fields overridden."""
        if variant not in OFFICIAL_CONFIGS:
            raise ValueError(f"unknown variant {variant!r}; known: {', '.join(OFFICIAL_CONFIGS)}")
        return cls(**{**json.loads(OFFICIAL_CONFIGS[variant].read_text()), **overrides})
