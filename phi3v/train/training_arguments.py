"""RecipeTrainingArguments: TrainingArguments with the original recipe's defaults, its batch-size flags and checks."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments


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
            from phi3v.train.reporting import announce_deepspeed_compiles  # before DeepSpeed starts, which may compile

            announce_deepspeed_compiles()
        if self.eval_kv_cache_gb is not None and self.eval_kv_cache_gb <= 0:
            raise ValueError(f"--eval_kv_cache_gb must be > 0, got {self.eval_kv_cache_gb}")
        self.resolve_batch_sizes(int(os.environ.get("WORLD_SIZE", 1)))
        super().__post_init__()

    def resolve_batch_sizes(self, world: int) -> None:
        """Fill both spellings of the batch flags, the original's and HF's, honouring whatever was given (two that
        disagree are an error) for `world` processes, before TrainingArguments fills DeepSpeed's "auto" values."""
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
                raise ValueError(f"--batch_size {self.batch_size} (the global batch) disagrees with "
                                 f"--gradient_accumulation_steps {self.gradient_accumulation_steps} x {per_gpu} per "
                                 f"GPU x {world} process(es) = {implied}: give one of --batch_size and "
                                 "--gradient_accumulation_steps")
            self.batch_size = implied
        else:
            self.batch_size = 16 if self.batch_size is None else self.batch_size  # the original default
            if self.batch_size % (per_gpu * world):
                raise ValueError(f"--batch_size {self.batch_size} is the global batch: it must be a multiple of "
                                 f"--batch_size_per_gpu ({per_gpu}) x the number of processes ({world}) = "
                                 f"{per_gpu * world}")
            self.gradient_accumulation_steps = self.batch_size // (per_gpu * world)
        self.batch_size_per_gpu = self.per_device_train_batch_size = per_gpu


def single_process_launch_env(environ) -> dict[str, str]:
    """What a launcher would export for one process (on a free local port), when none did (plain `python script.py
    --deepspeed`): without RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT DeepSpeed falls back to MPI discovery and
    dies with "No module named 'mpi4py'". Under torchrun/deepspeed/accelerate: nothing."""
    if any(name in environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return {}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
