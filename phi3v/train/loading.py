"""Processor and model for a tuning mode: full | frozen_vision | lora | qlora, as small pure functions."""

from __future__ import annotations

import json
import logging
import re

import torch
from peft import LoraConfig, PeftModelForCausalLM, prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig
from transformers.integrations import is_deepspeed_zero3_enabled

from phi3v.common.errors import BadValue, UserError
from phi3v.common.hub import resolve_file
from phi3v.models.family import ModelFamily
from phi3v.models.registry import checkpoint_family, family_of
from phi3v.train.arguments import ModelArguments
from phi3v.train.reporting import count_parameters
from phi3v.train.training_arguments import RecipeTrainingArguments

logger = logging.getLogger(__name__)


def model_family(model: torch.nn.Module) -> ModelFamily:
    return family_of(model.config.model_type)


def load_processor(model_args: ModelArguments):
    """The processor, with `context_length` (the model's max_position_embeddings) for the default length limit."""
    config = json.loads(resolve_file(model_args.model_name_or_path, "config.json").read_text())
    processor = family_of(config.get("model_type")).processor_class.from_pretrained(
        model_args.model_name_or_path, num_crops=model_args.num_crops)
    processor.context_length = (config.get("text_config") or config).get("max_position_embeddings")
    return processor


def model_dtype(model_args: ModelArguments, training_args: RecipeTrainingArguments | None = None) -> torch.dtype:
    """Weights dtype. Original rule for `auto`: bf16 with flash attention, else fp32 (mixed precision on top).

    Except that full and frozen_vision fine-tuning without DeepSpeed (--deepspeed none, FSDP) load fp32 even with
    flash attention (an explicit half-precision --torch_dtype is refused): AdamW updates below bf16's resolution
    (1/256 of a weight: most of them at lr 4e-5) would be lost. DeepSpeed keeps fp32 master copies itself, and LoRA
    trains fp32 adapters on a frozen base.
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


def precision_dtype(args) -> torch.dtype | None:
    """The training precision (--bf16, --fp16), for autocast and 4-bit compute: bf16, fp16, or None (fp32)."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


def get_quantization_config(model_args: ModelArguments, training_args: RecipeTrainingArguments, family: ModelFamily):
    """QLoRA base weights, else None. The default is the original's: 4-bit NF4 without double quantization, every
    Linear but lm_head quantized (CLIP and the projector included; --no_quantize_vision keeps those)."""
    if model_args.tuning_mode != "qlora":
        return None
    skip = None if model_args.quantize_vision else ["lm_head", *family.vision_modules]  # None: lm_head only
    if model_args.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=precision_dtype(training_args) or torch.float32,
                              bnb_4bit_use_double_quant=model_args.double_quant, llm_int8_skip_modules=skip)


def name_matcher(spec: list[str], flag: str):
    """Module-path predicate for a flag's value: `all-linear`, one regular expression (full match), or names
    matched at the end of the path on a "." boundary ("qkv_proj", "self_attn.o_proj", "lm_head")."""
    if spec == ["all-linear"]:
        return lambda path: path != "lm_head"
    if len(spec) == 1 and re.search(r"[\\^$*+?()\[\]{}|]", spec[0]):
        try:
            pattern = re.compile(spec[0])
        except re.error as error:
            raise UserError(f"{flag} {spec[0]!r} is not a valid regular expression: {error}") from None
        return lambda path: pattern.fullmatch(path) is not None
    return lambda path: any(path == name or path.endswith("." + name) for name in spec)


def modules_to_save(model: torch.nn.Module, model_args: ModelArguments) -> list[str]:
    """Full paths of --lora_modules_to_save, each matching at least one module, none in a frozen part."""
    paths, part_of = [], model_family(model).part_of
    for name in model_args.lora_modules_to_save or []:
        found = [path for path, _ in model.named_modules() if path == name or path.endswith("." + name)]
        if not found:
            raise UserError(f"--lora_modules_to_save {name}: no module of the model is called that (e.g. "
                            "img_projection, lm_head, embed_tokens)")
        frozen = [path for path in found if part_of(path + ".") in model_args.frozen_parts]
        if frozen:
            raise UserError(f"--lora_modules_to_save {name}: {frozen[0]} is in a frozen part "
                            f"({part_of(frozen[0] + '.')}); unfreeze it or leave it out")
        paths += found
    return paths


def select_lora_targets(model: torch.nn.Module, model_args: ModelArguments, saved: list[str]) -> list[str]:
    """Full paths of the Linear layers that get adapters: --lora_target_modules (default: the original's targets)
    minus --lora_exclude_modules, inside the parts not frozen."""
    family = model_family(model)
    unused = {id(p) for p in family.unused_parameters(model)}  # CLIP layers after the feature layer: never run
    linear = [path for path, module in model.named_modules() if isinstance(module, torch.nn.Linear)
              and not any(id(p) in unused for p in module.parameters())]
    if model_args.lora_target_modules:
        chosen = name_matcher(model_args.lora_target_modules, "--lora_target_modules")
        targets = [path for path in linear if chosen(path)]
        if not targets:
            raise UserError(f"--lora_target_modules {' '.join(model_args.lora_target_modules)} matches no Linear "
                            "layer of the model (e.g. qkv_proj o_proj gate_up_proj down_proj lm_head; q_proj k_proj "
                            "v_proj out_proj fc1 fc2 in CLIP; img_projection.0 img_projection.2; or all-linear)")
    else:
        targets = [path for path in family.lora_targets(model) if path in linear]
    if model_args.lora_exclude_modules:
        excluded = name_matcher(model_args.lora_exclude_modules, "--lora_exclude_modules")
        targets = [path for path in targets if not excluded(path)]
    # (PEFT itself leaves out targets inside the modules trained in full)
    targets = [path for path in targets if family.part_of(path + ".") not in model_args.frozen_parts]
    if not targets and not saved:
        raise UserError("LoRA has no target left: every module named by --lora_target_modules is frozen or "
                        "excluded, and --lora_modules_to_save is empty")
    return targets


def get_peft_config(model_args: ModelArguments, model: torch.nn.Module) -> LoraConfig | None:
    if not model_args.use_lora:
        return None
    saved = modules_to_save(model, model_args)
    return LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      init_lora_weights="gaussian", target_modules=select_lora_targets(model, model_args, saved),
                      modules_to_save=saved or None, use_dora=model_args.use_dora, use_rslora=model_args.use_rslora,
                      task_type="CAUSAL_LM")  # so AutoPeftModelForCausalLM loads the adapter (phi3v imported)


class AdapterModel(PeftModelForCausalLM):
    """A PeftModel whose saves hold the adapter only. LoRA leaves every base weight untouched, lm_head included;
    because lm_head is a target, PEFT would otherwise copy embed_tokens and lm_head (~400 MB) into each save."""

    def save_pretrained(self, save_directory, **kwargs):
        kwargs.setdefault("save_embedding_layers", False)
        return super().save_pretrained(save_directory, **kwargs)


def weights_device_map(quantized: bool, training_args: RecipeTrainingArguments, cuda: bool, zero3: bool):
    """Where from_pretrained puts the weights: QLoRA, this process's GPU (bitsandbytes places them as it quantizes);
    DDP and ZeRO-2, the same (N processes on a host would otherwise each hold a full copy in RAM first); ZeRO-3 and
    FSDP, nowhere in particular (None): they shard the weights themselves, and a per-GPU map would put the whole
    model on every GPU first (with FSDP's cpu_ram_efficient_loading, ranks > 0 load no weights)."""
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
    family = checkpoint_family(model_args.model_name_or_path)
    quantization_config = get_quantization_config(model_args, training_args, family)
    device_map = weights_device_map(quantization_config is not None, training_args, torch.cuda.is_available(),
                                    is_deepspeed_zero3_enabled())
    model = family.model_class.from_pretrained(
        model_args.model_name_or_path, dtype=model_dtype(model_args, training_args),
        attn_implementation=model_args.attn_implementation,
        vision_attn_implementation=model_args.vision_attn_implementation, quantization_config=quantization_config,
        device_map=device_map,
    )
    model.config.use_cache = False  # training; generation turns it back on
    for param in family.unused_parameters(model):
        param.requires_grad_(False)  # in the checkpoint, never in the computation: DDP needs no unused-param search
    for name, param in model.named_parameters():  # --freeze_vision_model: CLIP + projector; embed_tokens trains
        if family.part_of(name) in model_args.frozen_parts:
            param.requires_grad_(False)
    if quantization_config is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs,
        )
        # bitsandbytes (0.50) on a CPU with AVX512-BF16 repacks a 4-bit layer in place the first time it runs in
        # eval mode without gradients (the evaluation before training), into a layout its training forward fails on
        # ("a view of a leaf Variable that requires grad"): training keeps the layout it quantized to
        for module in model.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
    peft_config = get_peft_config(model_args, model)
    if peft_config is not None:
        model = AdapterModel(model, peft_config)
    log_parameter_counts(model, model_args)
    return model


def log_parameter_counts(model: torch.nn.Module, model_args: ModelArguments) -> None:
    """Log trainable/total parameters per part and check them against the flags (a mis-targeted LoRA or a freeze
    that froze nothing is a common silent failure)."""
    part_of = model_family(model).part_of
    counts = {part: count_parameters(model, lambda n, t=part: part_of(n) == t)
              for part in ("language", "vision", "projector")}
    trainable, total = count_parameters(model)
    logger.info(f"mode {model_args.tuning_mode}: trainable parameters {trainable:,} of {total:,} "
                f"({100 * trainable / total:.2f}%); " + ", ".join(f"{k} {a:,}/{b:,}" for k, (a, b) in counts.items()))
    if trainable == 0:
        raise RuntimeError("no parameter is trainable")
    for part, (part_trainable, _) in counts.items():
        if part in model_args.frozen_parts and part_trainable:
            raise RuntimeError(f"{part} is frozen but {part_trainable:,} of its parameters are trainable")
        if not model_args.use_lora and part not in model_args.frozen_parts and not part_trainable:
            raise RuntimeError(f"{part} should train in full but none of its parameters is trainable")
