"""Processor and model for a tuning mode: full | frozen_vision | lora | qlora, as small pure functions."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig
from transformers.integrations import is_deepspeed_zero3_enabled

from phi3v.args import ModelArguments, RecipeTrainingArguments
from phi3v.errors import BadValue
from phi3v.modeling import Phi3VForCausalLM
from phi3v.processing import Phi3VProcessor

logger = logging.getLogger(__name__)

LM_TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
CLIP_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def load_processor(model_args: ModelArguments) -> Phi3VProcessor:
    return Phi3VProcessor.from_pretrained(model_args.model_name_or_path, num_crops=model_args.num_crops)


def model_dtype(model_args: ModelArguments, training_args: RecipeTrainingArguments | None = None) -> torch.dtype:
    """Weights dtype. Original rule for `auto`: bf16 with flash attention, else fp32 (mixed precision on top).

    One exception: full and frozen_vision fine-tuning without DeepSpeed (--deepspeed none, FSDP) load fp32 weights
    even with flash attention. AdamW then updates fp32 master weights, and autocast hands flash attention its bf16
    inputs; on bf16 weights, updates below bf16's resolution (1/256 of a weight: most of them at lr 4e-5) are lost.
    DeepSpeed keeps fp32 master copies itself, and LoRA trains fp32 adapters on a frozen base, so those load bf16.
    An explicit half-precision --torch_dtype for such a run is refused for the same reason.
    """
    trains_base_without_master = (training_args is not None and model_args.tuning_mode in ("full", "frozen_vision")
                                  and not training_args.deepspeed)
    if model_args.torch_dtype != "auto":
        dtype = getattr(torch, model_args.torch_dtype)
        if trains_base_without_master and dtype != torch.float32:
            raise BadValue(
                f"--torch_dtype {model_args.torch_dtype} with {model_args.tuning_mode} fine-tuning and no DeepSpeed "
                "would run AdamW on half-precision weights, which loses small updates. Use --torch_dtype auto "
                "(fp32 master weights, --bf16 mixed precision) or DeepSpeed (--deepspeed ds_configs/zero2.json), "
                "or train LoRA (--use_lora)."
            )
        return dtype
    if trains_base_without_master:
        return torch.float32
    return torch.bfloat16 if model_args.attn_implementation == "flash_attention_2" else torch.float32


def compute_dtype(training_args: RecipeTrainingArguments) -> torch.dtype:
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def get_quantization_config(model_args: ModelArguments, training_args: RecipeTrainingArguments):
    """4-bit NF4 base weights for QLoRA (as the original: no double quantization), else None."""
    if model_args.tuning_mode != "qlora":
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype(training_args))


def lora_target_modules(model: Phi3VForCausalLM, include_vision: bool) -> list[str]:
    """Full module paths (no suffix matching, so nothing is picked up by accident): the decoder's fused
    projections and lm_head; with the vision tower, CLIP attention/MLP of the layers in use and the projector."""
    embedding = model.model.vision_embed_tokens
    clip_layers = embedding.img_processor.vision_model.encoder.layers[: embedding.num_layers_used]
    clip_prefix = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers"
    targets = [f"model.layers.{i}.{t}" for i in range(len(model.model.layers)) for t in LM_TARGETS] + ["lm_head"]
    if include_vision:
        targets += [f"{clip_prefix}.{i}.{t}" for i in range(len(clip_layers)) for t in CLIP_TARGETS]
        targets += ["model.vision_embed_tokens.img_projection.0", "model.vision_embed_tokens.img_projection.2"]
    return targets


def get_peft_config(model_args: ModelArguments, model: Phi3VForCausalLM) -> LoraConfig | None:
    if not model_args.use_lora:
        return None
    return LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      init_lora_weights="gaussian",
                      target_modules=lora_target_modules(model, include_vision=not model_args.vision_frozen))


class AdapterModel(PeftModel):
    """A PeftModel whose saves hold the adapter only. LoRA leaves every base weight untouched, lm_head included;
    because lm_head is a target, PEFT would otherwise copy embed_tokens and lm_head (~400 MB) into each save."""

    def save_pretrained(self, save_directory, **kwargs):
        kwargs.setdefault("save_embedding_layers", False)
        return super().save_pretrained(save_directory, **kwargs)


def weights_device_map(quantized: bool, training_args: RecipeTrainingArguments, cuda: bool, zero3: bool):
    """Where from_pretrained puts the weights.

    - QLoRA: bitsandbytes places the weights while quantizing them, on this process's GPU.
    - DDP, ZeRO-2: straight to this process's GPU (N processes on a host would otherwise each hold a full copy in
      RAM first).
    - ZeRO-3 and FSDP: nowhere in particular (None): they shard the weights themselves; a per-GPU map would put
      the whole model on every GPU first (and with FSDP's cpu_ram_efficient_loading, ranks > 0 load no weights).
    """
    if quantized:
        return {"": training_args.local_process_index if cuda else "cpu"}
    if cuda and not zero3 and not training_args.fsdp:
        return {"": training_args.local_process_index}
    return None


def load_model(model_args: ModelArguments, training_args: RecipeTrainingArguments):
    """The model for `model_args.tuning_mode`, with exactly the parameters that should train left trainable."""
    if training_args.deepspeed and not torch.cuda.is_available():
        import deepspeed  # on CPU (tests), the Trainer sets up torch.distributed but not DeepSpeed's communicator,

        deepspeed.init_distributed()  # which ZeRO-3 needs already while loading (zero.Init partitions the weights)
    quantization_config = get_quantization_config(model_args, training_args)
    device_map = weights_device_map(quantization_config is not None, training_args, torch.cuda.is_available(),
                                    is_deepspeed_zero3_enabled())
    model = Phi3VForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=model_dtype(model_args, training_args),
        attn_implementation=model_args.attn_implementation,
        vision_attn_implementation=model_args.vision_attn_implementation, quantization_config=quantization_config,
        device_map=device_map,
    )
    model.config.use_cache = False  # training; generation turns it back on
    for param in model.model.vision_embed_tokens.unused_parameters():
        param.requires_grad_(False)  # in the checkpoint, never in the computation: DDP needs no unused-param search
    if model_args.vision_frozen:
        model.model.vision_embed_tokens.requires_grad_(False)  # CLIP + projector + separators; embed_tokens trains
    if quantization_config is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )
    peft_config = get_peft_config(model_args, model)
    if peft_config is not None:
        model = AdapterModel(model, peft_config)
    log_parameter_counts(model, model_args)
    return model


def count_parameters(model: torch.nn.Module, predicate=lambda name: True) -> tuple[int, int]:
    """(trainable, total) parameters whose name satisfies `predicate`; 4-bit weights count unpacked, ZeRO-3
    partitioned ones at their full size."""
    trainable = total = 0
    for name, param in model.named_parameters():
        if predicate(name):
            n = getattr(param, "ds_numel", param.numel())
            n *= 2 if getattr(param, "quant_state", None) is not None else 1
            total += n
            trainable += n if param.requires_grad else 0
    return trainable, total


def tower_of(name: str) -> str:
    if ".img_processor." in name:
        return "vision"
    return "projector" if ".vision_embed_tokens." in name else "language"


def log_parameter_counts(model: torch.nn.Module, model_args: ModelArguments) -> dict[str, tuple[int, int]]:
    """Log trainable/total parameters per tower and check them against the mode (a mis-targeted LoRA or a freeze
    that froze nothing is a common silent failure)."""
    counts = {tower: count_parameters(model, lambda n, t=tower: tower_of(n) == t)
              for tower in ("language", "vision", "projector")}
    trainable, total = count_parameters(model)
    logger.info(f"mode {model_args.tuning_mode}: trainable parameters {trainable:,} of {total:,} "
                f"({100 * trainable / total:.2f}%); " + ", ".join(f"{k} {a:,}/{b:,}" for k, (a, b) in counts.items()))
    if counts["language"][0] == 0:
        raise RuntimeError("no language-model parameter is trainable")
    if model_args.vision_frozen != (counts["vision"][0] == 0 and counts["projector"][0] == 0):
        raise RuntimeError(f"vision trainable parameters {counts['vision'][0]} / projector {counts['projector'][0]} "
                           f"do not match --freeze_vision_model={model_args.vision_frozen}")
    return counts
