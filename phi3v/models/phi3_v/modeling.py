"""Phi-3.5-vision on transformers 5.x: CLIP ViT-L/14-336 + Phi-3-mini, loading the official checkpoint as is.

    pixel_values (N, num_crops+1, 3, 336, 336), image_sizes (N, 2)       input_ids with -k at image k's tokens
            |  real crops only: 1 global + h_c*w_c per image                    |
            v                                                                  |
    CLIP, output of layer -2, CLS dropped            (crops, 576, 1024)        |
            |  2x2 patch merge                        (crops, 12, 12, 4096)    |
            v                                                                  |
    per image:  [ sub grid 12h_c x 12w_c, sub_GN after every row ]             |
                [ glb_GN ]                                                     |
                [ global 12 x 12, sub_GN after every row ]                     |
            |  img_projection: Linear(4096, 3072) - GELU - Linear(3072, 3072)  |
            v                                                                  v
    (sum of image tokens, 3072)  ---- masked_scatter into placeholders ---> embed_tokens(ids.clamp(min=0))
                                                                               |
                                                                        Phi-3 decoder -> lm_head

Module names are the official checkpoint's (`model.vision_embed_tokens.img_processor.vision_model.*`, ...), so
the safetensors files load and save with no renaming. The CLIP tower is transformers' own `CLIPVisionModel` and the
decoder is transformers' own `Phi3Model`; this file adds only the image embedding and the glue.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import (
    Phi3ForCausalLM,
    Phi3Model,
    Phi3PreTrainedModel,
    Phi3RotaryEmbedding,
)
from transformers.utils import is_flash_attn_2_available

from phi3v.common.errors import Unavailable
from phi3v.models.causal_lm import load_checked, supervised_lm_loss
from phi3v.models.phi3_v.configuration import Phi3VConfig
from phi3v.models.phi3_v.image_embedding import Phi3VImageEmbedding
from phi3v.models.phi3_v.kv_cache import append_cache
from phi3v.models.phi3_v.layout import stop_token_ids

PLACEHOLDER_MIN = -1_000_000_000  # official: ids in (-1e9, 0) are image placeholders
MAX_SHARD_SIZE = "5GB"  # the official repo: 4.94 GB + 3.35 GB shards


# ------------------------------------------------------------------------------------------------- rotary


class Phi3VRotaryEmbedding(Phi3RotaryEmbedding):
    """LongRoPE with the short/long choice made per row, not per batch (spec 6.2).

    transformers switches the whole batch to the long factors once max(position_ids) + 1 passes 4096, so a row's
    answer would depend on its batch mates. Here each row uses the factors of its own length, max(position_ids[row])
    + 1 (position ids come from the attention mask, padding at 0), which is what the official model gives it alone.
    """

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):  # (B, L, ...), (B or 1, L)
        if self.rope_type != "longrope":
            return super().forward(x, position_ids)
        original = self.config.rope_parameters["original_max_position_embeddings"]
        long = getattr(self, "long_inv_freq", None)
        if long is None or long.device != x.device:
            long, _ = ROPE_INIT_FUNCTIONS["longrope"](self.config, x.device, seq_len=original + 1)
            self.long_inv_freq = long  # a plain attribute (not a buffer): recomputed when the device changes
        short = self.original_inv_freq.to(device=x.device, dtype=torch.float)
        is_long = (position_ids.amax(-1, keepdim=True) + 1 > original)[..., None]  # (B, 1, 1)
        inv_freq = torch.where(is_long, long.float(), short)  # (B, 1, head_dim/2)
        freqs = position_ids[..., None].float() * inv_freq  # (B, L, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def crosses_rope_switch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_length: int,
                        original: int) -> bool:
    """True when, in this generation step, some row's own length (not the padded one) first passes `original` tokens:
    its cached keys, computed with the short factors, must be recomputed with the long ones (spec 6.4)."""
    if past_length == 0:
        return False  # prefill: every row already gets the factors of its length
    lengths = attention_mask.sum(-1) if attention_mask is not None else torch.full((len(input_ids),),
                                                                                  input_ids.shape[1])
    new = input_ids.shape[1] - past_length
    return bool(((lengths > original) & (lengths - new <= original)).any())


# ------------------------------------------------------------------------------------------------- models


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config: Phi3VConfig
    config_class = Phi3VConfig
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    # Some exports store the alias of embed_tokens that the official module tree holds; it is the same tensor.
    _keys_to_ignore_on_load_unexpected = [r"model\.vision_embed_tokens\.wte\.weight"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Phi3VImageEmbedding):
            for separator in (module.glb_GN, module.sub_GN):
                nn.init.normal_(separator, std=self.config.initializer_range)


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """Phi-3 decoder whose input embeddings get the image features scattered into the placeholder positions."""

    def __init__(self, config: Phi3VConfig):
        Phi3Model.__init__(self, config)
        self.rotary_emb = Phi3VRotaryEmbedding(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with image features in the placeholder positions: (B, L) -> (B, L, hidden).

        `image_features` (total image tokens, hidden): `vision_embed_tokens(pixel_values, image_sizes)` computed before
        (once per prompt by `generate`), used instead of running CLIP again.
        """
        inputs_embeds = self.embed_tokens(input_ids.clamp(min=0))
        mask = (input_ids < 0) & (input_ids > PLACEHOLDER_MIN)
        if image_features is not None or pixel_values is not None:
            features = image_features if image_features is not None else self.vision_embed_tokens(pixel_values,
                                                                                                   image_sizes)
            num_placeholders = int(mask.sum())
            if num_placeholders != features.shape[0]:
                images = f"the {len(image_sizes)} image(s)" if image_sizes is not None else "the images"
                raise ValueError(f"input_ids hold {num_placeholders} image placeholders but {images} give "
                                 f"{features.shape[0]} feature tokens; build inputs with Phi3VProcessor and the same "
                                 "num_crops")
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], features.to(inputs_embeds.dtype))
        elif input_ids.shape[1] > 1 and mask.any():
            raise ValueError(f"input_ids hold {int(mask.sum())} image placeholders but no pixel_values were given")
        elif self.training and any(p.requires_grad for p in self.vision_embed_tokens.parameters()):
            # A batch without images still runs a blank image through the trainable vision tower, at zero weight:
            # every rank then touches the same parameters (DDP and ZeRO-3 would otherwise fail or hang).
            size = self.vision_embed_tokens.crop_size
            blank = inputs_embeds.new_zeros(1, 2, 3, size, size)
            features = self.vision_embed_tokens(blank, torch.tensor([[size, size]], device=blank.device))
            inputs_embeds = inputs_embeds + 0.0 * features.sum().to(inputs_embeds.dtype)
        return F.dropout(inputs_embeds, p=self.config.embd_pdrop, training=self.training)

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, inputs_embeds=None, image_features=None,
                **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, image_features)
        mask, cache = kwargs.get("attention_mask"), kwargs.get("cache")
        if kwargs.get("position_ids") is None and mask is not None and mask.dim() == 2 and \
                (cache is None or cache.get_seq_length() == 0):
            # positions from the mask (as generate() makes them), so that each row's LongRoPE factors follow its own
            # length in padded training batches too; real tokens keep positions 0..len-1
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return Phi3Model.forward(self, inputs_embeds=inputs_embeds, **kwargs)


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM):
    """Phi3VModel + LM head. `forward(..., labels=...)` returns the loss only (logits=None), computed by
    `supervised_lm_loss`; without labels it returns logits (for generation, only the last position's)."""

    def __init__(self, config: Phi3VConfig):
        Phi3VPreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, vision_attn_implementation: str = "sdpa",
                        **kwargs):
        """Load an official-layout checkpoint (local directory or hub id).

        `attn_implementation` (default sdpa) is the language model's, `vision_attn_implementation` (default sdpa) the
        CLIP tower's, as in the official code; a dict ({"": lm, "vision_config": clip}) is taken as it is.
        """
        if "torch_dtype" in kwargs:  # the name the official recipe and model card use
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        implementation = kwargs.get("attn_implementation") or "sdpa"
        if not isinstance(implementation, dict):
            implementation = {"": implementation, "vision_config": vision_attn_implementation}
        kwargs["attn_implementation"] = implementation
        local = Path(pretrained_model_name_or_path)
        if local.is_dir() and not list(local.glob("*.safetensors")) and list(local.glob("*.bin")):
            raise Unavailable(f"{local} holds pickle weights (*.bin) only. Weights are loaded from safetensors only, "
                              "because unpickling a file can execute code; convert the checkpoint where you trust it "
                              "(load it and call save_pretrained) and pass the safetensors copy.")
        if "flash_attention_2" in implementation.values() and not is_flash_attn_2_available():
            raise ImportError("attn_implementation='flash_attention_2' needs the flash-attn package and a CUDA GPU "
                              "(Ampere or newer): `pip install flash-attn --no-build-isolation`. Without it use "
                              "'sdpa' (the default) or 'eager'.")
        model = load_checked(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)
        model.generation_config.eos_token_id = stop_token_ids(model.generation_config.eos_token_id)
        if model.config.pad_token_id is not None:  # Phi-3-vision-128k has none: generation_config's 32000 stays
            model.generation_config.pad_token_id = model.config.pad_token_id
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As the hub repo: shards of at most 5 GB named model-0000k-of-0000n.safetensors, with
        model.safetensors.index.json (transformers 5 would write one file of up to 50 GB)."""
        kwargs.setdefault("max_shard_size", MAX_SHARD_SIZE)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                cache=None, inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes,
                             attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        if labels is not None:
            loss, logits = supervised_lm_loss(hidden, labels, self.lm_head, num_items_in_batch), None
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            loss, logits = None, self.lm_head(hidden[:, keep, :])
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def generate(self, inputs=None, generation_config=None, pixel_values=None, image_sizes=None, **kwargs):
        """`GenerationMixin.generate`, faster with no token changed: CLIP runs once per prompt (the features are reused
        when the LongRoPE switch feeds the prompt again), and unless the caller passes a cache or a
        cache_implementation the KV cache appends in place (`kv_cache.append_cache`) instead of copying every step.
        """
        config = generation_config or self.generation_config
        if kwargs.get("cache") is None and kwargs.get("cache_implementation") is None and \
                config.cache_implementation is None and kwargs.get("use_cache", config.use_cache) is not False:
            kwargs["cache"] = append_cache(self.config)
        if pixel_values is not None and kwargs.get("image_features") is None:
            with torch.no_grad():
                kwargs["image_features"] = self.model.vision_embed_tokens(pixel_values, image_sizes)
        return super().generate(inputs, generation_config, image_sizes=image_sizes, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_sizes=None, cache=None,
                                      attention_mask=None, image_features=None, **kwargs):
        # The LongRoPE rule, per row: the first time a row's own length passes 4096 tokens the cache is dropped and
        # the whole batch is fed again (Phi3's version decides on the padded length). Whenever the fed ids hold
        # placeholders (prefill, or that re-feed), the images go with them: the features `generate` made, or pixels.
        original = getattr(self.config, "original_max_position_embeddings", None)
        if cache is not None and original and self.config.rope_parameters.get("rope_type") == "longrope" and \
                crosses_rope_switch(input_ids, attention_mask, cache.get_seq_length(), original):
            cache = None
            kwargs["next_sequence_length"] = None
        inputs = GenerationMixin.prepare_inputs_for_generation(self, input_ids, cache=cache,
                                                               attention_mask=attention_mask, **kwargs)
        fed = inputs.get("input_ids")
        if fed is not None and fed.shape[1] > 1 and (fed < 0).any():
            if image_features is not None:
                inputs.update(image_features=image_features)
            elif pixel_values is not None:
                inputs.update(pixel_values=pixel_values, image_sizes=image_sizes)
        return inputs


# `AutoConfig` / `AutoModelForCausalLM` then read official checkpoints natively, with no trust_remote_code.
AutoConfig.register("phi3_v", Phi3VConfig)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VModel", "Phi3VImageEmbedding", "supervised_lm_loss"]
