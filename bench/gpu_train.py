"""Training speed and memory of the full-size model on one CUDA GPU, per tuning mode, with and without checkpointing.

    python bench/gpu_train.py                                # all 4 modes x checkpointing on/off, batch 8
    python bench/gpu_train.py --modes lora qlora --checkpointing on --batch_size 16
    python bench/gpu_train.py --dry_run                      # CPU, tiny config, same code path (CI, ~30 s)

--dry_run: the tiny config (`tiny.tiny_config()`), fp32 on CPU, batch 1 at num_crops 4, 1 warm-up + 1 step
per configuration: it checks that the whole path works, its numbers mean nothing.

What: `Phi3VForCausalLM(Phi3VConfig.official())` with random weights (built on the GPU in bf16, saved once to a
temporary checkpoint) is loaded per configuration by the recipes' own `phi3v.train.loading.load_model`, so each
mode trains exactly what it trains in the recipes: full | frozen_vision | lora (LM + CLIP + projector, the
original --use_lora) | qlora (the same on a 4-bit NF4 base, bitsandbytes). Gradient checkpointing is switched on as
the Trainer does (`activation_checkpointing_enable`, non-reentrant). One step = forward + backward + gradient
clipping (1.0) + AdamW (the recipe's betas, eps, weight decay) on a fixed synthetic DocVQA-shaped batch under bf16
autocast, with the weights in the dtype the recipes load (`--torch_dtype auto` without DeepSpeed: fp32 master
weights for full/frozen_vision, and for LoRA with sdpa; bf16 base for LoRA with flash attention; NF4 for QLoRA);
data loading is not included (see processor_throughput.py for that side).

The batch: per-GPU `--batch_size` samples, each one page at num_crops 16 plus text, no padding. The default page,
1200x2040, has a 5x3 crop grid: 16 CLIP crops and 2,377 image tokens, so with 56 prompt tokens and 10 supervised
answer tokens the sequence is 2,443 tokens, the published DocVQA mean, and 16 crops is about the DocVQA mean too
(US-letter pages give 4x4 = 17 crops, A4 4x3 = 13). pixel_values/image_sizes are made directly, input_ids hold -1
at the image's placeholder positions, as `Phi3VProcessor` writes them.

Reported per configuration: images/s, tokens/s, step time, model FLOP utilisation (MFU) against the GPU's dense
bf16 peak (H200/H100/A100 are recognised; else pass --peak_tflops), peak allocated and reserved memory (reserved is
closer to what nvidia-smi shows), trainable parameters; an out-of-memory configuration is reported as OOM.

Model FLOPs are the work the configuration needs, counted per linear layer as actually used (`training_flops`):
2*in*out per token forward; backward 2*in*out for the input gradient wherever gradients flow, plus 2*in*out for the
weight gradient only where the weight trains. So full fine-tuning is the usual 6 x parameters x tokens, a frozen
weight under LoRA costs 4x (its weight gradient is skipped), and a frozen CLIP tower 2x (forward only: nothing
upstream needs a gradient). Decoder attention adds 2*L^2*d per layer forward (causal: half the L x L scores), CLIP
attention 4*577^2*1024 per layer and crop; backward twice the forward. CLIP counts the crops actually computed (the
global view + rows x cols) and its 23 used layers; the LM head counts only the supervised positions, where
`supervised_lm_loss` applies it. Norms, activations, RoPE and the patch embedding (<1%) are left out, and so is the
forward that checkpointing recomputes: MFU here is model FLOPs, not hardware FLOPs.

Time on one H100/H200: ~1 minute to build and save the random checkpoint, then ~30-60 s per configuration.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/gpu_train.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers
from torch import nn

from bench.common import add_json_argument, gib, markdown_table, write_json
from phi3v.models.phi3_v.image_processing import CROP, crop_grid, num_image_tokens

MODES = ("full", "frozen_vision", "lora", "qlora")
# Published (original recipe, 8x A100-80GB, DocVQA): images/s for 8 GPUs, and GB per GPU.
PUBLISHED = {"full": (8.66, 36), "lora": (12.1, 16), "qlora": (10.5, 10), "frozen_vision": (31.7, 27)}
# Dense bf16 tensor-core peak, TFLOP/s; the first name contained in torch.cuda.get_device_name() wins.
# The NVL/PCIe parts run at lower clocks and power: H200 NVL is 835 TFLOP/s dense (1,671 with sparsity), not the SXM's
# 989.5, so it must be matched before "H200" (mapping it to the SXM peak understated its MFU by ~16%).
PEAK_BF16_TFLOPS = [("H200 NVL", 835.5), ("H200", 989.5), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.5), ("A100", 312.0)]
CLIP_TOKENS = (CROP // 14) ** 2 + 1  # 576 patches + CLS per crop
TEXT_TOKENS = 66  # prompt + answer of a DocVQA sample: 2,443 tokens in all with the default page


# ------------------------------------------------------------------------------------------------- inputs


def make_batch(config, batch_size: int, page: tuple[int, int], seq_len: int, supervised: int, num_crops: int,
               device, seed: int = 0) -> dict:
    """A DocVQA-shaped batch: per sample [BOS, prompt..., -1 x image tokens, BOS, prompt..., answer...]."""
    width, height = page
    rows, cols = crop_grid(width, height, num_crops)
    image_tokens = num_image_tokens(width, height, num_crops)
    text = seq_len - image_tokens
    if text < supervised + 4:
        raise ValueError(f"--seq_len {seq_len} leaves {text} text tokens next to the {image_tokens} image tokens")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 32000, (batch_size, seq_len), generator=generator)
    ids[:, 0] = ids[:, 3 + image_tokens] = 1  # BOS, and the BOS the processor puts after each image block
    ids[:, 3:3 + image_tokens] = -1  # image 1's placeholders
    labels = torch.full_like(ids, -100)
    labels[:, -supervised:] = ids[:, -supervised:]  # the answer (and its <|end|>) at the end
    pixel_values = torch.zeros(batch_size, num_crops + 1, 3, CROP, CROP)
    pixel_values[:, :1 + rows * cols] = torch.randn(batch_size, 1 + rows * cols, 3, CROP, CROP, generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": pixel_values, "image_sizes": torch.tensor([[rows * CROP, cols * CROP]] * batch_size)}
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------- FLOPs


def linear_flops(scope: nn.Module, tokens: int, backward: bool) -> float:
    """Forward (+ backward) FLOPs of every nn.Linear in `scope` (LoRA A/B and 4-bit layers included) at `tokens`."""
    total = 0.0
    for module in scope.modules():
        if isinstance(module, nn.Linear):
            flops = 2.0 * module.in_features * module.out_features * tokens
            total += flops
            if backward:
                total += flops * (2 if module.weight.requires_grad else 1)  # input grad (+ weight grad)
    return total


def training_flops(model: nn.Module, batch: dict, num_crops_used: int) -> dict[str, float]:
    """Model FLOPs of one training step on `batch`, split by part (see the module docstring for the rules)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    config = base.config
    batch_size, seq_len = batch["input_ids"].shape
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    image_tokens = int((batch["input_ids"] < 0).sum())
    embedding = base.model.vision_embed_tokens
    clip = embedding.img_processor.vision_model
    vision_backward = any(p.requires_grad for p in embedding.parameters())
    vision = clip.config
    crops = batch_size * num_crops_used

    decoder_attention = 2.0 * seq_len**2 * config.hidden_size * config.num_hidden_layers * batch_size
    clip_attention = 4.0 * CLIP_TOKENS**2 * vision.hidden_size * embedding.num_layers_used * crops
    return {
        "decoder": linear_flops(base.model.layers, batch_size * seq_len, backward=True) + 3 * decoder_attention,
        "lm_head": linear_flops(base.lm_head, supervised, backward=True),
        "clip": sum(linear_flops(layer, crops * CLIP_TOKENS, vision_backward)
                    for layer in clip.encoder.layers[:embedding.num_layers_used])
        + (3 if vision_backward else 1) * clip_attention,
        "projector": linear_flops(embedding.img_projection, image_tokens, vision_backward),
    }


def peak_tflops(override: float | None, name: str | None = None) -> float | None:
    """--peak_tflops, else the dense bf16 peak of the GPU called `name` (default: this one), else None."""
    if override:
        return override
    if name is None and not torch.cuda.is_available():
        return None
    name = name or torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# ------------------------------------------------------------------------------------------------- one configuration


def build_random_checkpoint(directory: Path, dry_run: bool) -> Path:
    """Random-weight checkpoint in the official layout: full size in bf16, built on the GPU (a CPU init of 4.2B
    parameters takes minutes), or the tiny config in fp32 for --dry_run."""
    from phi3v.models.phi3_v.configuration import Phi3VConfig
    from phi3v.models.phi3_v.modeling import Phi3VForCausalLM
    from phi3v.models.phi3_v.tiny import tiny_config

    if (directory / "config.json").is_file():
        return directory
    config = tiny_config() if dry_run else Phi3VConfig.official()
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3VForCausalLM._from_config(config, dtype=torch.float32 if dry_run else torch.bfloat16)
    model.save_pretrained(directory)
    del model
    return directory


def train_configuration(checkpoint: Path, mode: str, checkpointing: bool, args, output_dir: str) -> dict:
    """Load the model for `mode` as the recipes do, run warm-up + timed steps, return the measurements."""
    from phi3v.train.arguments import ModelArguments
    from phi3v.train.loading import load_model
    from phi3v.train.reporting import count_parameters
    from phi3v.train.training_arguments import RecipeTrainingArguments

    on_gpu = torch.cuda.is_available() and not args.dry_run
    # The recipes' settings: --torch_dtype auto (fp32 master weights for full/frozen_vision without DeepSpeed and for
    # LoRA with sdpa; bf16 base weights for LoRA with flash attention; 4-bit for QLoRA), bf16 autocast, and the
    # Trainer's AdamW (betas 0.9/0.95, eps 1e-7, weight decay 0.01, clipping 1.0). ZeRO-2, the recipes' default for
    # full fine-tuning on GPUs, keeps bf16 weights + fp32 master copies: bench/gpu_check.py runs it.
    model_args = ModelArguments(model_name_or_path=str(checkpoint), tuning_mode=mode, attn_implementation=args.attn,
                                torch_dtype="auto", lora_rank=args.lora_rank, num_crops=args.num_crops)
    training_args = RecipeTrainingArguments(
        output_dir=output_dir, report_to="none", bf16=on_gpu, fp32=not on_gpu, batch_size=args.batch_size,
        batch_size_per_gpu=args.batch_size, activation_checkpointing=checkpointing,
        learning_rate=args.learning_rate, deepspeed="none",
    )
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = load_model(model_args, training_args)
    if not model_args.use_qlora:  # 4-bit weights were placed by bitsandbytes while loading
        model.to("cuda" if on_gpu else "cpu")
    if checkpointing:  # as Trainer does with --activation_checkpointing (the recipes' default)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    device = next(model.parameters()).device
    trainable, total = count_parameters(model)

    width, height = args.page
    rows, cols = crop_grid(width, height, args.num_crops)
    batch = make_batch(model.config, args.batch_size, args.page, args.seq_len, args.supervised, args.num_crops,
                       device)
    flops = training_flops(model, batch, 1 + rows * cols)
    parameters = [p for p in model.parameters() if p.requires_grad]
    weights_dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")
    optimizer = torch.optim.AdamW(parameters, lr=training_args.learning_rate, betas=(training_args.adam_beta1,
                                  training_args.adam_beta2), eps=training_args.adam_epsilon,
                                  weight_decay=training_args.weight_decay)
    losses = []
    for step in range(args.warmup_steps + args.steps):
        if step == args.warmup_steps:
            if on_gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, training_args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also synchronizes
    seconds = (time.perf_counter() - start) / args.steps
    memory = {}
    if on_gpu:
        memory = {"peak_allocated": torch.cuda.max_memory_allocated(),
                  "peak_reserved": torch.cuda.max_memory_reserved()}
    return {"seconds_per_step": seconds, "images_per_second": args.batch_size / seconds,
            "tokens_per_second": args.batch_size * args.seq_len / seconds, "flops_per_step": sum(flops.values()),
            "flops_by_part": flops, "trainable_parameters": trainable, "total_parameters": total,
            "weights_dtype": weights_dtype, "losses": losses, **memory}


def run_configuration(checkpoint: Path, mode: str, checkpointing: bool, args, output_dir: str) -> dict:
    """`train_configuration`, with an out-of-memory error recorded instead of raised; memory freed afterwards."""
    result = {"mode": mode, "checkpointing": checkpointing}
    try:
        result.update(train_configuration(checkpoint, mode, checkpointing, args, output_dir))
    except torch.OutOfMemoryError as error:
        result["error"] = "OOM"
        result["message"] = str(error).splitlines()[0]
    gc.collect()  # the model and optimizer of this configuration are unreachable now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------- report


def report(results: list[dict], args, peak: float | None) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "CPU (dry run)"
    rows = []
    for r in results:
        published = PUBLISHED[r["mode"]]
        cells = [r["mode"], "on" if r["checkpointing"] else "off", r.get("weights_dtype", "-")]
        if "error" in r:
            rows.append(cells + [r["error"]] + ["-"] * 6 + [f"{published[0] / 8:.2f} img/s, ~{published[1]} GB"])
            continue
        mfu = r["flops_per_step"] / r["seconds_per_step"] / (peak * 1e12) if peak else None
        rows.append(cells + [
            f"{r['images_per_second']:.2f}", f"{r['tokens_per_second']:,.0f}", f"{r['seconds_per_step']:.2f} s",
            f"{mfu:.1%}" if mfu is not None else "-", gib(r.get("peak_allocated")), gib(r.get("peak_reserved")),
            f"{r['trainable_parameters'] / 1e6:,.1f} M", f"{published[0] / 8:.2f} img/s, ~{published[1]} GB",
        ])
        r["mfu"] = mfu
    width, height = args.page
    grid_rows, grid_cols = crop_grid(width, height, args.num_crops)
    against = f"{peak:,.0f} TFLOP/s" if peak else "an unknown peak (pass --peak_tflops)"
    title = (f"**Training on {device}: per-GPU batch {args.batch_size} x {args.seq_len:,} tokens (page "
             f"{width}x{height}: {1 + grid_rows * grid_cols} CLIP crops, {args.supervised} supervised tokens), "
             f"{args.attn}, {'fp32' if args.dry_run else 'bf16 autocast'}, the recipes' AdamW; mean of {args.steps} "
             f"step(s) after {args.warmup_steps} warm-up; MFU against {against}**")
    header = ["mode", "checkpointing", "weights", "img/s", "tokens/s", "step", "MFU", "peak allocated",
              "peak reserved", "trainable", "published per GPU (8x A100, ZeRO-2 for full)"]
    return "\n\n".join([title, markdown_table(header, rows)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings, with the defaults that depend on --dry_run filled in."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both",
                        help="gradient checkpointing (the recipes default to on)")
    parser.add_argument("--batch_size", type=int, default=None, help="per-GPU batch (default 8; 1 with --dry_run)")
    parser.add_argument("--seq_len", type=int, default=None,
                        help=f"tokens per sample (default: the page's image tokens + {TEXT_TOKENS}; 2,443 by default)")
    parser.add_argument("--page", default="1200x2040", help="page size WxH (default: a 5x3 grid, 16 crops)")
    parser.add_argument("--supervised", type=int, default=10, help="answer tokens with a label")
    parser.add_argument("--num_crops", type=int, default=None, help="default 16 (4 with --dry_run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 1 with --dry_run)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="untimed steps first (default 2; 1 dry)")
    parser.add_argument("--attn", default="sdpa", help="sdpa or flash_attention_2")
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=4e-5)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--checkpoint_dir", type=Path, default=None,
                        help="keep the random checkpoint here (reused if it exists) instead of a temporary folder")
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny config, fp32: the same code path, fast")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    args.page = tuple(int(v) for v in args.page.lower().split("x"))
    args.num_crops = args.num_crops or (4 if args.dry_run else 16)
    args.seq_len = args.seq_len or num_image_tokens(*args.page, args.num_crops) + TEXT_TOKENS
    args.batch_size = args.batch_size or (1 if args.dry_run else 8)
    args.steps = args.steps or (1 if args.dry_run else 5)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if args.dry_run else 2)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; use --dry_run to run the same code path on CPU with the tiny config")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("phi3v").setLevel(logging.INFO)  # trainable-parameter counts per mode

    peak = None if args.dry_run else peak_tflops(args.peak_tflops)
    settings = ["on", "off"] if args.checkpointing == "both" else [args.checkpointing]
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = build_random_checkpoint(args.checkpoint_dir or Path(scratch) / "random", args.dry_run)
        results = [run_configuration(checkpoint, mode, setting == "on", args, str(Path(scratch) / "out"))
                   for mode in args.modes for setting in settings]
    markdown = report(results, args, peak)
    print(markdown)
    write_json(args.json, "gpu_train", {"settings": {k: v for k, v in vars(args).items() if k != "json"} | {
        "checkpoint_dir": str(args.checkpoint_dir), "peak_tflops": peak}, "configurations": results}, markdown)
    return results


if __name__ == "__main__":
    main()
