"""transformers' Phi4MultimodalForCausalLM, as the recipes train it: vision only, the built-in vision LoRA merged.

The class keeps the native name, so every save loads with transformers' own class (AutoModelForCausalLM, vLLM's
Phi4MultimodalForCausalLM); it changes four things and leaves the modeling to transformers:

- SigLIP attends both ways. transformers 5.24 marks its attention `is_causal`, which sdpa and flash attention obey
  whenever no patch of the crop batch is masked, so an image's features would depend on the other images of its
  batch. Eager attention ignores the flag.
- With labels, the LM head runs only where a label is supervised (phi3v.models.causal_lm.supervised_lm_loss): the
  logits of a whole sequence over the 200k vocabulary are most of a training step's memory.
- SigLIP runs only on the real crops (RealCropImageEmbedding), not on the padding crops a batch adds to every image
  up to the largest image's count, whose features transformers never reads: the same features, loss and gradients.
- Audio inputs are refused: the recipes fine-tune the vision path.

The hub checkpoint's vision LoRA (r=256 on the decoder's qkv/o/gate_up/down projections, in `vision-lora/`) is merged
into the base weights while loading (W += alpha/r * B @ A): fine-tuning starts from the model that answers about
images, and every save is a plain native checkpoint that serves without adapters.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import Phi4MultimodalForCausalLM as NativePhi4MultimodalForCausalLM
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import (
    Phi4MultimodalImageEmbedding,
    Phi4MultimodalVisionAttention,
)

from phi3v.common.errors import UserError
from phi3v.common.hub import resolve_file
from phi3v.models.causal_lm import load_checked, supervised_lm_loss

VISION_LORA = "vision-lora"  # the folder of the built-in vision adapter, beside the base weights
AUDIO_INPUTS = ("audio_input_features", "audio_embed_sizes", "audio_attention_mask")


def vision_lora(path) -> tuple[dict, dict] | None:
    """(adapter_config, weights) of the checkpoint's built-in vision LoRA, or None where it has none."""
    try:
        config = json.loads(resolve_file(path, f"{VISION_LORA}/adapter_config.json").read_text())
    except UserError:
        return None
    return config, load_file(resolve_file(path, f"{VISION_LORA}/adapter_model.safetensors"))


@torch.no_grad()
def merge_lora(model: torch.nn.Module, config: dict, weights: dict) -> None:
    """Add scale * B @ A (scale = lora_alpha / r) to the weight of every module the adapter holds. Keys are the
    converted checkpoint's: `<module path>.lora_A.weight` (r, in), `.lora_B.weight` (out, r)."""
    scale = config["lora_alpha"] / config["r"]
    modules = dict(model.named_modules())
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        path = key.removesuffix(".lora_A.weight")
        module = modules.get(path)
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{VISION_LORA}: {path} is not a Linear layer of the model")
        delta = weights[f"{path}.lora_B.weight"].float() @ weights[key].float()
        module.weight.add_((scale * delta).to(module.weight.dtype))


def real_crops(image_sizes: torch.Tensor, crops: int, crop_size: int) -> torch.Tensor:
    """(images, crops) bool: the global view and the rows x cols HD tiles of each image (image_sizes is the padded
    [height, width], a multiple of crop_size); False for the padding crops a batch adds after them."""
    tiles = (image_sizes[:, 0] // crop_size) * (image_sizes[:, 1] // crop_size)
    return torch.arange(crops, device=image_sizes.device) <= tiles.unsqueeze(1)


class RealCropImageEmbedding(Phi4MultimodalImageEmbedding):
    """transformers' image embedding, with SigLIP run on the real crops only: their features are scattered into a
    zero tensor of the full (images x crops) shape, whose padding rows the native code never reads."""

    _real = None  # (images * crops,) bool during a forward

    def forward(self, input_ids, inputs_embeds, image_pixel_values, image_sizes=None, image_attention_mask=None):
        self._real = real_crops(image_sizes.view(-1, 2), image_pixel_values.shape[1], self.crop_size).flatten()
        try:
            return super().forward(input_ids, inputs_embeds, image_pixel_values, image_sizes, image_attention_mask)
        finally:
            self._real = None

    def get_img_features(self, img_embeds, attention_mask=None):
        real = self._real
        if real is None or bool(real.all()):
            return super().get_img_features(img_embeds, attention_mask)
        features = super().get_img_features(img_embeds[real], None if attention_mask is None else attention_mask[real])
        return features.new_zeros(real.shape[0], *features.shape[1:]).index_put((real,), features)


class Phi4MultimodalForCausalLM(NativePhi4MultimodalForCausalLM):
    """See the module docstring. Saves as, and loads from, the native layout."""

    def __init__(self, config):
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, Phi4MultimodalVisionAttention):
                module.is_causal = False
        # no new module (the same parameters and names): only its forward changes
        self.model.embed_tokens_extend.image_embed.__class__ = RealCropImageEmbedding

    @classmethod
    def from_pretrained(cls, path, *args, vision_attn_implementation: str | None = None, **kwargs):
        """The native from_pretrained, plus the built-in vision LoRA merged. `vision_attn_implementation` (eager,
        sdpa, flash_attention_2) sets SigLIP's attention apart from the decoder's."""
        adapter = vision_lora(path)
        if adapter is not None and (kwargs.get("quantization_config") is not None or is_deepspeed_zero3_enabled()):
            raise UserError(f"{path} has a built-in vision LoRA ({VISION_LORA}/), which cannot be merged into "
                            "quantized or ZeRO-3-partitioned weights: merge it once with `python -m "
                            f"phi3v.models.phi4_mm.merge_vision_lora {path} MERGED_DIR` and train on MERGED_DIR")
        model = load_checked(super().from_pretrained, path, *args, **kwargs)
        if vision_attn_implementation is not None:
            model.config.vision_config._attn_implementation = vision_attn_implementation
        if adapter is not None:
            merge_lora(model, *adapter)
        return model

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, logits_to_keep=0,
                **kwargs):
        given = [name for name in AUDIO_INPUTS if kwargs.get(name) is not None]
        if given:
            raise ValueError(f"audio inputs ({', '.join(given)}) are not supported: these recipes fine-tune "
                             "Phi-4-multimodal's vision path only")
        if labels is None:  # logits_to_keep in the signature: generate() then computes the last position's only
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                                   **kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        loss = supervised_lm_loss(outputs.last_hidden_state, labels, self.lm_head, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)

