"""Phi-3-vision and Phi-3.5-vision behind the model seam (phi3v.models.family)."""

from __future__ import annotations

from phi3v.models.family import LM_TARGETS, VISION_TARGETS, ModelFamily
from phi3v.models.phi3_v import modeling
from phi3v.models.phi3_v.layout import complete_layout, remote_code_dir
from phi3v.models.phi3_v.modeling import Phi3VForCausalLM
from phi3v.models.phi3_v.processing import Phi3VProcessor

VISION = "model.vision_embed_tokens"


def part_of(name: str) -> str:
    """"vision" (CLIP), "projector" (the rest of the image embedding: img_projection, glb_GN, sub_GN) or "language"
    for a parameter or module path (PEFT's prefixes and adapter names included)."""
    if ".img_processor." in name:
        return "vision"
    return "projector" if ".vision_embed_tokens." in name else "language"


def lora_target_modules(model: Phi3VForCausalLM, include_vision: bool = True) -> list[str]:
    """The original's targets as full module paths (no suffix matching, so nothing is picked up by accident): the
    decoder's fused projections and lm_head; with the vision tower, CLIP attention/MLP of the layers in use and the
    projector."""
    clip_layers = range(model.model.vision_embed_tokens.num_layers_used)
    clip_prefix = f"{VISION}.img_processor.vision_model.encoder.layers"
    targets = [f"model.layers.{i}.{t}" for i in range(len(model.model.layers)) for t in LM_TARGETS] + ["lm_head"]
    if include_vision:
        targets += [f"{clip_prefix}.{i}.{t}" for i in clip_layers for t in VISION_TARGETS]
        targets += [f"{VISION}.img_projection.0", f"{VISION}.img_projection.2"]
    return targets


PHI3_V = ModelFamily(
    name="Phi-3.5-vision", model_types=("phi3_v",), model_class=Phi3VForCausalLM, processor_class=Phi3VProcessor,
    part_of=part_of, lora_targets=lora_target_modules,
    unused_parameters=lambda model: model.model.vision_embed_tokens.unused_parameters(), vision_modules=(VISION,),
    complete_layout=complete_layout, remote_code_dir=remote_code_dir, shard_size=lambda: modeling.MAX_SHARD_SIZE,
    serving="Official Phi-3.5-vision layout with its remote code, for vLLM and transformers 4.x:\n\n```bash\n"
            "vllm serve REPO_OR_DIR --trust-remote-code\n```",
)
