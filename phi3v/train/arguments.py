"""Command-line arguments shared by the four recipes: ModelArguments and BaseDataArguments (the training flags, every
standard TrainingArguments one included: training_arguments.py). Every flag of the original scripts keeps its meaning
and default (--batch_size is the *global* batch); its hard-coded training settings are our defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TUNING_MODES = ("full", "frozen_vision", "lora", "qlora")
# ds_configs/ of the checkout, or its copy installed as phi3v/ds_configs by `pip install .`
PACKAGE = Path(__file__).resolve().parent.parent
DS_CONFIGS = next((p for p in (PACKAGE.parent / "ds_configs", PACKAGE / "ds_configs") if (p / "zero2.json").is_file()),
                  PACKAGE.parent / "ds_configs")


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
    # Each part (vision tower, projector, language model) is trained in full, carries LoRA adapters, or is frozen.
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
                raise ValueError("--use_flash_attention conflicts with --attn_implementation "
                                 f"{self.attn_implementation}")
            self.attn_implementation = "flash_attention_2"
        self.attn_implementation = self.attn_implementation or "sdpa"
        if self.num_crops is not None and not 1 <= self.num_crops <= 16:
            raise ValueError(f"--num_crops must be between 1 and 16, got {self.num_crops}")
        if self.lora_rank < 1:
            raise ValueError(f"--lora_rank must be >= 1, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:  # torch refuses it, but only once the model is loaded
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for flag, value in (("--lora_alpha", self.lora_alpha), ("--lora_alpha_ratio", self.lora_alpha_ratio)):
            if value is not None and not 0 < value < float("inf"):  # PEFT would train with that scale, silently
                raise ValueError(f"{flag} must be a number > 0, got {value}")
        self.resolve_parts()

    def resolve_parts(self) -> None:
        """The freeze flags, LoRA and quantization knobs: derived values filled, ignored combinations refused."""
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
        if self.lora_alpha < 1:
            raise ValueError(f"--lora_rank {self.lora_rank} x --lora_alpha_ratio {self.lora_alpha_ratio} rounds to a "
                             "LoRA alpha of 0 (adapters that change nothing): raise the ratio or pass --lora_alpha")
        if not self.use_lora:
            lora_only = [f"--{name}" for name in ("lora_target_modules", "lora_exclude_modules",
                                                  "lora_modules_to_save", "use_dora", "use_rslora")
                         if getattr(self, name)]
            if lora_only:
                raise ValueError(f"{', '.join(lora_only)} need(s) --use_lora (or --use_qlora)")
        if not self.use_qlora and (self.quant_bits is not None or self.double_quant):
            raise ValueError("--quant_bits and --double_quant need --use_qlora")
        if self.use_qlora:
            self.quant_bits = self.quant_bits or 4
            if self.double_quant and self.quant_bits != 4:
                raise ValueError("--double_quant applies to 4-bit weights only (--quant_bits 4)")

    @property
    def frozen_parts(self) -> set[str]:
        """Of "vision", "projector", "language" (phi3v.models.phi3_v.family.part_of names them)."""
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
        # every integer data flag is a count: a negative one would act as a Python negative slice
        for name, value in vars(self).items():
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"--{name} must be >= 0, got {value}")
        for name in ("max_length", "max_new_tokens", "max_image_pixels", "eval_batch_size"):
            if getattr(self, name) == 0:
                raise ValueError(f"--{name} must be >= 1, got 0")
