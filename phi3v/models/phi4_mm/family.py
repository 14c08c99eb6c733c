"""Phi-4-multimodal-instruct's vision path behind the model seam (phi3v.models.family)."""

from __future__ import annotations

from phi3v.models.family import LM_TARGETS, VISION_TARGETS, ModelFamily
from phi3v.models.phi4_mm.modeling import Phi4MultimodalForCausalLM, vision_lora
from phi3v.models.phi4_mm.processing import Phi4MMProcessor

IMAGE = "model.embed_tokens_extend.image_embed"
AUDIO = "model.embed_tokens_extend.audio_embed"


def part_of(name: str) -> str:
    """"vision" (SigLIP), "projector" (img_projection_up/down and the two separators), "audio" (the speech encoder
    and its projectors, never trained here) or "language", for a parameter or module path."""
    if ".image_embed.img_processor." in name:
        return "vision"
    if ".image_embed." in name:
        return "projector"
    return "audio" if ".audio_embed." in name else "language"


def used_siglip_layers(model) -> int:
    """SigLIP layers the features pass through: those up to vision_config.feature_layer (-2: all but the last)."""
    config = model.config.vision_config
    return config.feature_layer % (config.num_hidden_layers + 1)


def lora_targets(model) -> list[str]:
    """The decoder's fused projections (the built-in vision LoRA's targets) and, in the vision tower, SigLIP's
    attention/MLP of the layers in use and the projector. lm_head is tied to the embeddings: not a target."""
    targets = [f"model.layers.{i}.{t}" for i in range(model.config.num_hidden_layers) for t in LM_TARGETS]
    targets += [f"{IMAGE}.img_processor.encoder.layers.{i}.{t}" for i in range(used_siglip_layers(model))
                for t in VISION_TARGETS]
    return targets + [f"{IMAGE}.img_projection_up", f"{IMAGE}.img_projection_down"]


def unused_parameters(model):
    """Weights that never compute in a vision fine-tune: the audio tower, SigLIP's layers after the feature layer,
    its post_layernorm and pooling head."""
    siglip = model.model.embed_tokens_extend.image_embed.img_processor
    yield from model.model.embed_tokens_extend.audio_embed.parameters()
    yield from siglip.encoder.layers[used_siglip_layers(model):].parameters()
    yield from siglip.post_layernorm.parameters()
    yield from siglip.head.parameters()


PHI4_MM = ModelFamily(
    name="Phi-4-multimodal", model_types=("phi4_multimodal",), model_class=Phi4MultimodalForCausalLM,
    processor_class=Phi4MMProcessor, part_of=part_of, lora_targets=lora_targets, unused_parameters=unused_parameters,
    vision_modules=(IMAGE, AUDIO), complete_layout=lambda out_dir, base, remote_code_files=True: [],
    remote_code_dir=lambda base: None, shard_size=lambda: "5GB", built_in_lora=vision_lora,
    serving="transformers' native Phi-4-multimodal layout (`AutoModelForCausalLM`, `AutoProcessor`), which vLLM "
            "serves as `Phi4MultimodalForCausalLM`:\n\n```bash\nvllm serve REPO_OR_DIR\n```",
)
