"""Command-line arguments shared by the four recipes: ModelArguments, BaseDataArguments, RecipeTrainingArguments.

Every flag of the original scripts keeps its meaning and default (--use_flash_attention, --bf16, --use_lora,
--use_qlora, --freeze_vision_model, --batch_size as the *global* batch, --batch_size_per_gpu, --num_crops,
--learning_rate, --num_train_epochs, --wd, --lora_rank, --lora_alpha_ratio, --lora_dropout, --output_dir,
--no-tqdm), next to every standard `transformers.TrainingArguments` flag (--save_steps, --resume_from_checkpoint,
--report_to, --deepspeed, ...). The original's hard-coded training settings are our defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.integrations import is_deepspeed_available

from phi3v.errors import BadValue, MissingFile, OneLineErrors, UserError, unknown_arguments

TUNING_MODES = ("full", "frozen_vision", "lora", "qlora")
# ds_configs/ of the checkout, or its copy installed as phi3v/ds_configs by `pip install .`
DS_CONFIGS = next((p for p in (Path(__file__).resolve().parent.parent / "ds_configs",
                               Path(__file__).resolve().parent / "ds_configs") if (p / "zero2.json").is_file()),
                  Path(__file__).resolve().parent.parent / "ds_configs")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="microsoft/Phi-3.5-vision-instruct",
                                    metadata={"help": "Hub id or local checkpoint directory (official layout)."})
    use_flash_attention: bool = field(default=False, metadata={
        "help": "flash_attention_2 with bf16 weights (Ampere+ GPU and the flash-attn package)."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Language model attention: sdpa (default), eager or flash_attention_2; --use_flash_attention means "
                "flash_attention_2. The CLIP tower follows --vision_attn_implementation."})
    vision_attn_implementation: str = field(default="sdpa", metadata={
        "help": "CLIP tower attention: sdpa (default, whatever the language model uses: the official code's "
                "'eager' also applies to its language model only), eager or flash_attention_2.",
        "choices": ("sdpa", "eager", "flash_attention_2")})
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the LM (and the vision tower unless frozen)."})
    use_qlora: bool = field(default=False, metadata={"help": "QLoRA: LoRA on a 4-bit NF4 base (implies --use_lora)."})
    freeze_vision_model: bool = field(default=False, metadata={
        "help": "Freeze CLIP and the image projector (the text embeddings still train)."})
    tuning_mode: str | None = field(default=None, metadata={
        "help": "full | frozen_vision | lora | qlora; the same as the flags above (which it overrides).",
        "choices": TUNING_MODES})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha_ratio: float | None = field(default=None, metadata={
        "help": "LoRA alpha / rank (default 2: alpha = round(rank * ratio)); rank 32 with alpha 16 is "
                "--lora_alpha_ratio 0.5, or --lora_alpha 16."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    num_crops: int | None = field(default=None, metadata={
        "help": "Maximum 336px crops per image (<= 16); each script sets its default (16 images, 4 video)."})
    torch_dtype: str = field(default="auto", metadata={
        "help": "Weight dtype: auto (bf16 with flash attention, else fp32 master weights, as the original), "
                "float32, bfloat16 or float16.", "choices": ("auto", "float32", "bfloat16", "float16")})
    save_merged_model: bool = field(default=False, metadata={
        "help": "LoRA/QLoRA: also write the adapter merged into the base model to OUTPUT_DIR/merged."})
    # Which parts train and how. Each part (vision tower = CLIP, projector = img_projection + separators, language
    # model = decoder + text embeddings + lm_head) is trained in full, carries LoRA adapters (--use_lora), or is
    # frozen. --freeze_vision_model is --freeze_vision_tower --freeze_projector.
    freeze_vision_tower: bool = field(default=False, metadata={
        "help": "Freeze CLIP (the projector still trains unless --freeze_projector)."})
    freeze_projector: bool = field(default=False, metadata={
        "help": "Freeze the image projector (img_projection and the glb_GN/sub_GN separators)."})
    freeze_llm: bool = field(default=False, metadata={
        "help": "Freeze the language model (decoder, text embeddings, lm_head): train the vision side only."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "LoRA targets, only inside the parts not frozen: module names (matched at the end of the module "
                "path, e.g. qkv_proj o_proj fc1), one regular expression (matched against the whole path), or "
                "all-linear (every Linear but lm_head). Default, the original's: the decoder's qkv_proj o_proj "
                "gate_up_proj down_proj and lm_head; CLIP attention/MLP and the projector."})
    lora_exclude_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names (or one regular expression) taken out of the LoRA targets."})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained in full next to LoRA and saved with the adapter, e.g. img_projection (LoRA on the "
                "LM + full projector), lm_head, embed_tokens."})
    lora_alpha: int | None = field(default=None, metadata={
        "help": "LoRA alpha as a number (default: rank x --lora_alpha_ratio = 128)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA (peft use_dora)."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale adapters by alpha / sqrt(rank)."})
    quant_bits: int | None = field(default=None, metadata={
        "help": "QLoRA base weights: 4 (NF4, the default and the original) or 8 (LLM.int8).", "choices": (4, 8)})
    double_quant: bool = field(default=False, metadata={
        "help": "QLoRA 4-bit: also quantize the quantization constants (~0.4 bits per weight less)."})
    quantize_vision: bool = field(default=True, metadata={
        "help": "QLoRA: quantize CLIP and the projector too, as the original does; --no_quantize_vision keeps them "
                "in --torch_dtype (more memory, the image features unchanged)."})

    def __post_init__(self):
        if self.tuning_mode is None:
            self.tuning_mode = ("qlora" if self.use_qlora else "lora" if self.use_lora
                                else "frozen_vision" if self.freeze_vision_model else "full")
        elif self.tuning_mode == "frozen_vision":
            self.freeze_vision_model = True
        self.use_qlora = self.tuning_mode == "qlora"
        self.use_lora = self.tuning_mode in ("lora", "qlora")
        if self.use_flash_attention:
            if self.attn_implementation not in (None, "flash_attention_2"):
                raise ValueError(
                    f"--use_flash_attention conflicts with --attn_implementation {self.attn_implementation}"
                )
            self.attn_implementation = "flash_attention_2"
        self.attn_implementation = self.attn_implementation or "sdpa"
        if self.num_crops is not None and not 1 <= self.num_crops <= 16:
            raise ValueError(f"--num_crops must be between 1 and 16, got {self.num_crops}")
        if self.lora_rank < 1:
            raise ValueError(f"--lora_rank must be >= 1, got {self.lora_rank}")
        self.resolve_parts()

    def resolve_parts(self) -> None:
        """The freeze flags, LoRA and quantization knobs: derived values filled, combinations that would be ignored
        refused (a knob that silently does nothing is the worst kind)."""
        if self.freeze_vision_model:
            self.freeze_vision_tower = self.freeze_projector = True
        self.freeze_vision_model = self.freeze_vision_tower and self.freeze_projector
        if self.tuning_mode == "full" and self.freeze_vision_model:
            self.tuning_mode = "frozen_vision"
        if self.freeze_vision_model and self.freeze_llm and not self.lora_modules_to_save:
            raise ValueError("--freeze_llm with a frozen vision tower and projector leaves nothing to train")
        if self.lora_alpha is not None and self.lora_alpha_ratio is not None and \
                self.lora_alpha != round(self.lora_rank * self.lora_alpha_ratio):
            raise ValueError(f"--lora_alpha {self.lora_alpha} disagrees with --lora_rank {self.lora_rank} x "
                             f"--lora_alpha_ratio {self.lora_alpha_ratio}: give one of them")
        self.lora_alpha_ratio = 2.0 if self.lora_alpha_ratio is None else self.lora_alpha_ratio  # the original's
        self.lora_alpha = round(self.lora_rank * self.lora_alpha_ratio) if self.lora_alpha is None else self.lora_alpha
        if not self.use_lora:
            lora_only = [flag for flag, value in (
                ("--lora_target_modules", self.lora_target_modules), ("--lora_exclude_modules",
                 self.lora_exclude_modules), ("--lora_modules_to_save", self.lora_modules_to_save),
                ("--use_dora", self.use_dora), ("--use_rslora", self.use_rslora)) if value]
            if lora_only:
                raise ValueError(f"{', '.join(lora_only)} need(s) --use_lora (or --use_qlora)")
        if not self.use_qlora and (self.quant_bits is not None or self.double_quant):
            raise ValueError("--quant_bits and --double_quant need --use_qlora")
        if self.use_qlora:
            self.quant_bits = self.quant_bits or 4
            if self.double_quant and self.quant_bits != 4:
                raise ValueError("--double_quant applies to 4-bit weights only (--quant_bits 4)")

    @property
    def vision_frozen(self) -> bool:
        return self.freeze_vision_tower and self.freeze_projector

    @property
    def frozen_parts(self) -> set[str]:
        """Of "vision", "projector", "language" (phi3v.model_loading.part_of names them)."""
        return {part for part, frozen in (("vision", self.freeze_vision_tower), ("projector", self.freeze_projector),
                                          ("language", self.freeze_llm)) if frozen}


@dataclass
class BaseDataArguments:
    """Data flags every recipe has; each script's DataArguments adds its own on top."""

    train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    max_length: int | None = field(default=None, metadata={
        "help": "Longest allowed sequence in tokens (image tokens included). Longer samples are an error, or are "
                "skipped and recorded with --skip_bad_samples; a sample is never cut inside an image."})
    skip_bad_samples: bool = field(default=False, metadata={
        "help": "Skip samples that fail validation (logged, counted and saved to "
                "OUTPUT_DIR/skipped_samples_<split>.jsonl) instead of stopping before the first step."})
    validate_only: bool = field(default=False, metadata={"help": "Validate the datasets, print a summary, exit."})
    max_image_pixels: int = field(default=89_478_485, metadata={
        "help": "Images with more pixels are rejected (decompression-bomb guard; PIL's default limit)."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Where validation results are kept between starts, so a restart re-checks only changed files "
                "(default: --output_dir; 'none' turns it off)."})
    eval_before_training: bool = field(default=True, metadata={"help": "Evaluate the base model before training."})
    eval_after_training: bool = field(default=True, metadata={"help": "Evaluate the fine-tuned model."})
    eval_batch_size: int | None = field(default=None, metadata={
        "help": "Prompts per generate() call and GPU in evaluation (default: as many as --eval_kv_cache_gb holds)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation limit in evaluation (original: 64)."})

    def __post_init__(self):
        # every integer data flag (here and in each script's DataArguments) is a count: a negative one would act
        # as a Python negative slice (--train_samples -1 = all but the last) instead of failing
        for name, value in vars(self).items():
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"--{name} must be >= 0, got {value}")
        for name in ("max_length", "max_new_tokens", "max_image_pixels", "eval_batch_size"):
            if getattr(self, name) == 0:
                raise ValueError(f"--{name} must be >= 1, got 0")


@dataclass
class RecipeTrainingArguments(TrainingArguments):
    """TrainingArguments with the original recipe's hard-coded values as defaults, and its batch-size flags."""

    output_dir: str = field(default="./output/", metadata={"help": "Where checkpoints and results go."})
    batch_size: int | None = field(default=None, metadata={
        "help": "Global effective batch (default 16): gradient accumulation = batch_size / (batch_size_per_gpu x "
                "world size). Or give the HF pair --per_device_train_batch_size / --gradient_accumulation_steps."})
    batch_size_per_gpu: int | None = field(default=None, metadata={
        "help": "Micro-batch per GPU (default 1; fit it to GPU memory). Same as --per_device_train_batch_size."})
    per_device_train_batch_size: int | None = field(default=None, metadata={
        "help": "The HF name of --batch_size_per_gpu."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={
        "help": "Micro-batches per optimizer step; the global batch is then per-GPU batch x processes x this. "
                "Give it or --batch_size, not both."})
    wd: float | None = field(default=None, metadata={"help": "Weight decay (original name of --weight_decay)."})
    no_tqdm: bool = field(default=False, metadata={"help": "Disable progress bars (original flag)."})
    fp32: bool = field(default=False, metadata={
        "help": "No mixed precision. Without --bf16 the original trains in fp16 on GPUs; on CPU fp32 is used."})
    eval_kv_cache_gb: float | None = field(default=None, metadata={
        "help": "KV-cache memory per GPU that sizes the evaluation batch (default: 40%% of the GPU memory free when "
                "evaluation starts; 2 on CPU). Phi-3.5-vision needs 384 KiB per token in bf16."})
    skip_nonfinite_steps: bool = field(default=False, metadata={
        "help": "Skip optimizer steps whose loss or gradient is NaN/inf (counted and logged) instead of stopping."})
    learning_rate: float = field(default=4.0e-5, metadata={"help": "Peak learning rate (linear decay to 0)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    num_train_epochs: float = field(default=1, metadata={"help": "Training epochs."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (original: 0.95)."})
    adam_epsilon: float = field(default=1e-7, metadata={"help": "AdamW epsilon (original: 1e-7)."})
    warmup_steps: float = field(default=50, metadata={"help": "Linear warmup steps (original: 50)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (original: adamw_torch)."})
    activation_checkpointing: bool = field(default=True, metadata={
        "help": "Gradient checkpointing in both towers (original: on); --no_activation_checkpointing to turn off."})
    dataloader_num_workers: int = field(default=4, metadata={"help": "Data-loading worker processes."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False (collator needs rows)."})
    ddp_find_unused_parameters: bool = field(default=False, metadata={
        "help": "Every trainable parameter gets a gradient in every step, so DDP needs no search."})
    train_sampling_strategy: str = field(default="group_by_length", metadata={
        "help": "group_by_length (default: batches of similar token counts, computed without decoding images), "
                "random or sequential."})
    compute_eval_loss: bool = field(default=True, metadata={
        "help": "At each evaluation, also the loss on the evaluation set (one forward pass per batch of "
                "--per_device_eval_batch_size; logged as eval_loss and plotted with the training loss)."})
    vision_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the vision tower (CLIP, its LoRA adapters included); default --learning_rate. "
                "5-10x below it is a common choice."})
    projector_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the projector (img_projection, separators); default --learning_rate."})

    def __post_init__(self):
        if self.wd is not None:
            self.weight_decay = self.wd
        if self.no_tqdm:
            self.disable_tqdm = True
        if self.fp32 and (self.bf16 or self.fp16):
            raise ValueError("--fp32 cannot be combined with --bf16 or --fp16")
        if self.bf16 and self.fp16:
            raise ValueError("--fp16 cannot be combined with --bf16 (flash attention runs only in bf16, so "
                             "--use_flash_attention implies --bf16)")
        if not (self.bf16 or self.fp16 or self.fp32) and torch.cuda.is_available():
            self.fp16 = True  # the original: without --bf16, fp16 mixed precision
        if self.activation_checkpointing:  # non-reentrant: works with frozen embeddings (LoRA) and in DDP
            self.activation_checkpointing_kwargs = {"use_reentrant": False,
                                                    **(self.activation_checkpointing_kwargs or {})}
        if isinstance(self.deepspeed, str) and self.deepspeed.lower() in ("none", ""):
            self.deepspeed = None
        if not torch.cuda.is_available():
            self.use_cpu = True
        for name in ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm", "dataloader_num_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs must be > 0 (or set --max_steps), got {self.num_train_epochs}")
        if self.deepspeed:
            os.environ.update(single_process_launch_env(os.environ))
            from phi3v.reporting import announce_deepspeed_compiles  # before DeepSpeed starts, which may compile

            announce_deepspeed_compiles()
        if self.eval_kv_cache_gb is not None and self.eval_kv_cache_gb <= 0:
            raise ValueError(f"--eval_kv_cache_gb must be > 0, got {self.eval_kv_cache_gb}")
        self.resolve_batch_sizes(int(os.environ.get("WORLD_SIZE", 1)))
        super().__post_init__()

    def resolve_batch_sizes(self, world: int) -> None:
        """Fill both spellings of the batch flags: the original (--batch_size global, --batch_size_per_gpu) and the
        HF one (--per_device_train_batch_size, --gradient_accumulation_steps). Whatever was given is honoured;
        two flags that disagree are an error, never silently replaced. `world` is the number of processes (the
        launchers export WORLD_SIZE); this runs before TrainingArguments fills DeepSpeed's "auto" values."""
        per_gpu = {"--batch_size_per_gpu": self.batch_size_per_gpu,
                   "--per_device_train_batch_size": self.per_device_train_batch_size}
        given = {flag: value for flag, value in per_gpu.items() if value is not None}
        if len(set(given.values())) > 1:
            raise ValueError(f"--batch_size_per_gpu {self.batch_size_per_gpu} and --per_device_train_batch_size "
                             f"{self.per_device_train_batch_size} are the same setting: give one of them")
        for flag, value in [*given.items(), ("--batch_size", self.batch_size),
                            ("--gradient_accumulation_steps", self.gradient_accumulation_steps)]:
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        per_gpu = next(iter(given.values()), 1)
        if self.gradient_accumulation_steps is not None:
            implied = per_gpu * world * self.gradient_accumulation_steps
            if self.batch_size not in (None, implied):
                raise ValueError(
                    f"--batch_size {self.batch_size} (the global batch) disagrees with --gradient_accumulation_steps "
                    f"{self.gradient_accumulation_steps} x {per_gpu} per GPU x {world} process(es) = {implied}: "
                    "give one of --batch_size and --gradient_accumulation_steps"
                )
            self.batch_size = implied
        else:
            self.batch_size = 16 if self.batch_size is None else self.batch_size  # the original default
            if self.batch_size % (per_gpu * world):
                raise ValueError(
                    f"--batch_size {self.batch_size} is the global batch: it must be a multiple of "
                    f"--batch_size_per_gpu ({per_gpu}) x the number of processes ({world}) = {per_gpu * world}"
                )
            self.gradient_accumulation_steps = self.batch_size // (per_gpu * world)
        self.batch_size_per_gpu = self.per_device_train_batch_size = per_gpu


def single_process_launch_env(environ) -> dict[str, str]:
    """What a launcher would export for one process, when no launcher did (plain `python script.py --deepspeed`).

    DeepSpeed reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from the environment; without them it falls back
    to MPI discovery and dies with "No module named 'mpi4py'". One process on one GPU needs no launcher, so we
    export those of a single-process group (on a free local port). Under torchrun/deepspeed/accelerate: nothing.
    """
    if any(name in environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return {}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def parse_args(data_class: type, argv: list[str] | None = None, **defaults):
    """Parse (ModelArguments, DataArguments, RecipeTrainingArguments); `defaults` are the script's own.

    `argv` may start with a YAML or JSON file of settings, or name one with --config (see `with_config_file`).
    Two defaults follow the original recipe and depend on the model flags, so those are read first:
    flash attention implies --bf16 (as the original nlvr2/ucf101 scripts), and full fine-tuning on GPUs runs under
    DeepSpeed ZeRO-2 (ds_configs/zero2.json) unless --deepspeed is given (--deepspeed none: plain DDP).
    """
    argv = with_config_file(sys.argv[1:] if argv is None else list(argv),
                            (ModelArguments, data_class, RecipeTrainingArguments))
    try:
        model_args, data_args, training_args = _parse(data_class, argv, defaults)
    except ValueError as error:  # a __post_init__ check of any group: the user's flags, said in one line
        raise BadValue(str(error).strip()) from error
    check_output_dir(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume and resume.lower() not in ("last", "latest", "true") and not Path(resume).is_dir():
        raise MissingFile(f"--resume_from_checkpoint {resume}: no such directory")
    return model_args, data_args, training_args


def check_output_dir(output_dir: str) -> None:
    """Refuse an --output_dir that cannot be written, before anything is loaded (it is created later, on save)."""
    path = Path(output_dir).absolute()
    if path.exists() and not path.is_dir():
        raise BadValue(f"--output_dir {output_dir} is an existing file, not a folder: pass a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BadValue(f"--output_dir {output_dir}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadValue(f"--output_dir {output_dir}: {existing} is not writable (read-only or another user's); pass "
                       "a folder you can write to")


class RecipeParser(OneLineErrors, HfArgumentParser):
    """HfArgumentParser whose command-line errors are one line, and whose --help shows the settings file."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.add_argument_group("settings file").add_argument(
            "--config", metavar="FILE", action=AbbreviatedConfig, default=argparse.SUPPRESS,
            help="Settings from a YAML or JSON file, named as the flags without the dashes (YAML: one "
                 "`learning_rate: 1.0e-4` a line, a list for several values; JSON: {\"learning_rate\": 1e-4, "
                 "\"use_lora\": true}); also as the first argument: script.py run.yaml [flags]. Flags given on "
                 "the command line win over the file's.")


class AbbreviatedConfig(argparse.Action):
    """--config is taken out of the command line before parsing (split_config_file), so the parser meets it only
    abbreviated (--conf FILE), which argparse would accept and the file then be ignored: refused."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("write --config in full: an abbreviation of it is not read as a settings file")


def _parse(data_class: type, argv: list[str], defaults: dict):
    parser = RecipeParser((ModelArguments, data_class, RecipeTrainingArguments))
    parser.set_defaults(**defaults)
    if not {"-h", "--help"} & set(argv):  # the model-only pre-parse would answer --help with its flags alone
        model_args, _ = RecipeParser(ModelArguments).parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
        if model_args.attn_implementation == "flash_attention_2":
            parser.set_defaults(bf16=True)
        if model_args.tuning_mode in ("full", "frozen_vision") and torch.cuda.is_available() and \
                is_deepspeed_available():
            parser.set_defaults(deepspeed=str(DS_CONFIGS / "zero2.json"))
    model_args, data_args, training_args, extra = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if extra:
        raise unknown_arguments(extra, parser, "flags start with --, and a settings file (first argument or "
                                f"--config) ends in {', '.join(CONFIG_SUFFIXES)}")
    training_args.run_record = run_record(data_class, argv, model_args, data_args)
    return model_args, data_args, training_args


def run_record(data_class: type, argv: list[str], model_args: ModelArguments, data_args) -> dict:
    """What the model card says about a run: base model, mode, data flags given, and the command line."""
    module = data_class.__module__
    script = Path(sys.argv[0]).name if module == "__main__" else f"{module.replace('.', '/')}.py"
    data = {f.name: getattr(data_args, f.name) for f in dataclasses.fields(data_args)
            if f.init and getattr(data_args, f.name) != f.default}
    return {"base_model": model_args.model_name_or_path, "mode": model_args.tuning_mode, "data": data,
            "command": shlex.join(["python", script, *argv])}


# ------------------------------------------------------------------------------------------------- config files

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def with_config_file(argv: list[str], groups: tuple[type, ...]) -> list[str]:
    """`script.py run.yaml [flags]` or `script.py --config run.yaml [flags]` (as transformers' examples and TRL):
    the file's settings become flags placed before the command line's, so flags given on the command line win."""
    path, argv = split_config_file(argv)
    if path is None:
        return argv
    return config_flags(read_config(path), path, groups) + argv


def split_config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """(settings file, the other arguments): the file is the first argument (.yaml, .yml or .json) or --config's."""
    argv = list(argv)
    path = None
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
        path = argv.pop(0)
    flags = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    if len(flags) + (path is not None) > 1:
        raise UserError("give one config file (as the first argument or with --config), not two")
    if flags:
        i, arg = flags[0], argv[flags[0]]
        path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
        if not path:
            raise UserError("--config needs a file: --config run.yaml")
        del argv[i: i + (1 if "=" in arg else 2)]
    return path, argv


def read_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            settings = json.loads(text)
        else:
            import yaml

            settings = yaml.safe_load(text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError
        raise UserError(f"config file {path} could not be read: {str(error).splitlines()[0]}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values, "
                        f"got {type(settings).__name__}")
    return settings


def config_flags(settings: dict, path: str, groups: tuple[type, ...]) -> list[str]:
    """{name: value} -> ["--name", "value", ...]: booleans as true/false, lists as several values, null left out
    (the default applies). Names are the flags' (a leading "--" and dashes are accepted); unknown names are an error
    with the list of them, before anything runs."""
    known = {f.name for group in groups for f in dataclasses.fields(group) if f.init}
    flags, unknown = [], []
    for key, value in settings.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name not in known:
            unknown.append(str(key))
            continue
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        flags += [f"--{name}", *(json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool)
                                 else str(v) for v in values)]
    if unknown:
        raise UserError(f"config file {path}: unknown setting(s) {', '.join(unknown)} (names are the flags of "
                        "--help, without the dashes)")
    return flags
