"""Phi-4-multimodal-instruct, full size, on one CUDA GPU: a bf16 LoRA step and a QLoRA step (images/s, MFU, memory).

    python bench/phi4_gpu_train.py                                   # random weights, the official config
    python bench/phi4_gpu_train.py --model /models/Phi-4-multimodal-instruct   # a local copy (or the hub id)
    python bench/phi4_gpu_train.py --dry_run                         # CPU, tiny checkpoint, same path (~1-2 min)

What: the model is loaded per mode by the recipes' own `phi3v.train.loading.load_model` (the family seam picks
phi3v.models.phi4_mm), as the recipes train it:
  - lora: `--use_lora --torch_dtype bfloat16` (bf16 base with the built-in vision LoRA merged while loading, the
    recipes' LoRA on the decoder's qkv/o/gate_up/down, SigLIP's layers in use and the projector, in fp32);
  - qlora: the same on a 4-bit NF4 base. A 4-bit base cannot take the built-in vision LoRA, so the checkpoint is
    first merged once by `python -m phi3v.models.phi4_mm.merge_vision_lora BASE MERGED` (timed, reported) and
    QLoRA loads MERGED, as the error message of the loader tells users to.
Without --model the checkpoint is random weights in the official native config
(phi3v/models/phi4_mm/configs/phi-4-multimodal-instruct.json: 4.74B parameters with the audio tower), built on the
GPU in bf16 with a random rank-16 vision-lora/ folder in the converted format (so the merge path runs) and the tiny
builder's processor files; the speed and memory are those of the real model (the GPU has no hub access).

One step = forward + backward + clipping (1.0) + the recipes' AdamW, under bf16 autocast, gradient checkpointing on
(the recipes' default), on a fixed batch of `--batch_size` samples: a random `--page` (default 1200x2040) through
transformers' image processor at num_crops 16 (3x5 HD tiles + the global view: 16 SigLIP crops, 4,193 image
tokens) plus 56 prompt and 10 answer tokens: 4,259 tokens per sample. Reported: images/s, tokens/s, step, MFU
(model FLOPs as bench/gpu_train.py counts them: linear layers as used, decoder and SigLIP attention, the LM head on
the supervised tokens only; against the GPU's dense bf16 peak), peak allocated/reserved memory, trainable
parameters, load time.

Time on one H100/H200 (estimated, not yet measured): ~1 min to build and save the random checkpoint (9.5 GB), ~1 min
for the merge, ~1 min per mode; `--dry_run` ~1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/phi4_gpu_train.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import transformers

from bench.common import REPO, add_json_argument, gib, markdown_table, write_json
from bench.gpu_train import linear_flops, peak_tflops

MODES = ("lora", "qlora")
IMAGE_TOKEN, PROMPT, PATCHES = 200010, 56, 1024  # SigLIP: 32 x 32 patches of 14 px per 448-pixel crop


def build_random_checkpoint(directory: Path, dry_run: bool) -> Path:
    """Random weights: the tiny checkpoint (--dry_run) or the official config in bf16 on the GPU, with a random
    vision-lora/ and the tiny builder's processor files (real special-token ids, real image geometry)."""
    from transformers import Phi4MultimodalConfig

    from phi3v.models.phi4_mm.modeling import Phi4MultimodalForCausalLM
    from phi3v.models.phi4_mm.tiny import OFFICIAL_CONFIG, build_tiny_checkpoint, write_vision_lora

    if (directory / "config.json").is_file():
        return directory
    if dry_run:
        return build_tiny_checkpoint(directory, num_crops=4)
    build_tiny_checkpoint(directory / "_tiny")  # its processor files
    config = Phi4MultimodalConfig(**json.loads(OFFICIAL_CONFIG.read_text()))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Phi4MultimodalForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="5GB")
    write_vision_lora(directory, model, rank=16)
    del model
    for file in (directory / "_tiny").iterdir():
        if file.is_file() and not (file.name.startswith("model") or file.name in ("config.json",
                                                                                     "generation_config.json")):
            (directory / file.name).write_bytes(file.read_bytes())
    return directory


def merge(checkpoint: Path, out: Path) -> float:
    """`python -m phi3v.models.phi4_mm.merge_vision_lora` in its own process; returns its seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "phi3v.models.phi4_mm.merge_vision_lora", str(checkpoint),
                           str(out)], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"merge_vision_lora failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    return time.perf_counter() - started


def make_batch(checkpoint: Path, batch_size: int, page: tuple[int, int], num_crops: int, supervised: int,
               device) -> dict:
    """`batch_size` copies of one sample: [prompt, image tokens, answer] with a random page's pixels."""
    from transformers import Phi4MultimodalImageProcessor

    width, height = page
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = dict(Phi4MultimodalImageProcessor(dynamic_hd=num_crops)([pixels], return_tensors="pt"))
    image_tokens = int(image.pop("num_img_tokens")[0])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 199999, (batch_size, PROMPT + image_tokens + supervised), generator=generator)
    ids[:, 4:4 + image_tokens] = IMAGE_TOKEN
    labels = torch.full_like(ids, -100)
    labels[:, -supervised:] = ids[:, -supervised:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             **{k: torch.cat([v] * batch_size) for k, v in image.items()}}
    return {k: v.to(device) for k, v in batch.items()}


def training_flops(model, batch: dict) -> dict[str, float]:
    """Model FLOPs of one step, by part, counted as bench/gpu_train.py counts them (see its docstring)."""
    from phi3v.models.phi4_mm.family import used_siglip_layers
    from phi3v.models.phi4_mm.modeling import real_crops

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config, embed = base.config, base.model.embed_tokens_extend.image_embed
    batch_size, seq_len = batch["input_ids"].shape
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    image_tokens = int((batch["input_ids"] == IMAGE_TOKEN).sum())
    crops = int(real_crops(batch["image_sizes"], batch["image_pixel_values"].shape[1], embed.crop_size).sum())
    layers = used_siglip_layers(base)
    vision_backward = any(p.requires_grad for p in embed.parameters())
    siglip_attention = 4.0 * PATCHES**2 * config.vision_config.hidden_size * layers * crops
    return {
        "decoder": linear_flops(base.model.layers, batch_size * seq_len, backward=True)
        + 3 * 2.0 * seq_len**2 * config.hidden_size * config.num_hidden_layers * batch_size,
        "lm_head": linear_flops(base.lm_head, supervised, backward=True),
        "siglip": sum(linear_flops(layer, crops * PATCHES, vision_backward)
                      for layer in embed.img_processor.encoder.layers[:layers])
        + (3 if vision_backward else 1) * siglip_attention,
        "projector": linear_flops(embed.img_projection_up, image_tokens, vision_backward)
        + linear_flops(embed.img_projection_down, image_tokens, vision_backward),
    }


def train_mode(checkpoint: Path, mode: str, args, output_dir: str) -> dict:
    """Load as the recipes load for `mode`, warm-up + timed steps; the measurements."""
    from phi3v.train.arguments import ModelArguments
    from phi3v.train.loading import load_model
    from phi3v.train.reporting import count_parameters
    from phi3v.train.training_arguments import RecipeTrainingArguments

    on_gpu = not args.dry_run
    model_args = ModelArguments(model_name_or_path=str(checkpoint), tuning_mode=mode, attn_implementation=args.attn,
                                torch_dtype="bfloat16" if on_gpu else "float32", lora_rank=args.lora_rank)
    training_args = RecipeTrainingArguments(
        output_dir=output_dir, report_to="none", bf16=on_gpu, fp32=not on_gpu, batch_size=args.batch_size,
        batch_size_per_gpu=args.batch_size, activation_checkpointing=True, learning_rate=args.learning_rate,
        deepspeed="none")
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = load_model(model_args, training_args)
    if mode != "qlora":
        model.to("cuda" if on_gpu else "cpu")
    load_seconds = time.perf_counter() - started
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    device = next(model.parameters()).device
    trainable, total = count_parameters(model)
    batch = make_batch(checkpoint, args.batch_size, args.page, args.num_crops, args.supervised, device)
    flops = training_flops(model, batch)
    parameters = [p for p in model.parameters() if p.requires_grad]
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
        losses.append(loss.item())
    seconds = (time.perf_counter() - start) / args.steps
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss: {losses}")
    memory = {"peak_allocated": torch.cuda.max_memory_allocated(),
              "peak_reserved": torch.cuda.max_memory_reserved()} if on_gpu else {}
    seq_len = batch["input_ids"].shape[1]
    return {"load_seconds": load_seconds, "seconds_per_step": seconds, "images_per_second": args.batch_size / seconds,
            "tokens_per_second": args.batch_size * seq_len / seconds, "seq_len": seq_len,
            "flops_per_step": sum(flops.values()), "flops_by_part": flops, "trainable_parameters": trainable,
            "total_parameters": total, "losses": losses, **memory}


def run_mode(checkpoint: Path, mode: str, args, output_dir: str) -> dict:
    result = {"mode": mode}
    try:
        result.update(train_mode(checkpoint, mode, args, output_dir))
    except torch.OutOfMemoryError as error:
        result.update(error="OOM", message=str(error).splitlines()[0])
    except Exception as error:  # noqa: BLE001 - one row per mode: the other mode still runs and is reported
        result["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:150] if str(error) else ''}"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def report(results: list[dict], args, peak: float | None, merge_seconds: float | None) -> str:
    device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["mode"], r["error"]] + ["-"] * 7)
            continue
        r["mfu"] = mfu = r["flops_per_step"] / r["seconds_per_step"] / (peak * 1e12) if peak else None
        rows.append([r["mode"], f"{r['images_per_second']:.2f}", f"{r['tokens_per_second']:,.0f}",
                     f"{r['seconds_per_step']:.2f} s", f"{mfu:.1%}" if mfu is not None else "-",
                     gib(r.get("peak_allocated")), gib(r.get("peak_reserved")),
                     f"{r['trainable_parameters'] / 1e6:,.1f} M", f"{r['load_seconds']:.0f} s"])
    seq_len = next((r["seq_len"] for r in results if "seq_len" in r), "?")
    against = f"{peak:,.0f} TFLOP/s" if peak else "an unknown peak (pass --peak_tflops)"
    merged = f"; merge_vision_lora for QLoRA took {merge_seconds:.0f} s" if merge_seconds is not None else ""
    weights = args.model or ("tiny random checkpoint" if args.dry_run else "random weights, official config")
    title = (f"**Phi-4-multimodal ({weights}) on {device}: per-GPU batch "
             f"{args.batch_size} x {seq_len} tokens (page {args.page[0]}x{args.page[1]} at num_crops "
             f"{args.num_crops}), {args.attn}, checkpointing on, {'fp32' if args.dry_run else 'bf16 autocast'}; "
             f"mean of {args.steps} step(s) after {args.warmup_steps} warm-up; MFU against {against}{merged}**")
    header = ["mode", "img/s", "tokens/s", "step", "MFU", "peak allocated", "peak reserved", "trainable", "load"]
    return "\n\n".join([title, markdown_table(header, rows)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Phi-4-multimodal checkpoint (local dir or hub id); "
                        "default: random weights in the official config")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch_size", type=int, default=None, help="per-GPU batch (default 8; 1 with --dry_run)")
    parser.add_argument("--page", default=None, help="page size WxH (default 1200x2040; 448x448 with --dry_run)")
    parser.add_argument("--num_crops", type=int, default=None, help="default 16 (1 with --dry_run)")
    parser.add_argument("--supervised", type=int, default=10, help="answer tokens with a label")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3; 1 with --dry_run)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="untimed steps first (default 1)")
    parser.add_argument("--attn", default="sdpa", help="sdpa or flash_attention_2")
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=4e-5)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--work_dir", type=Path, default=None, help="keep the checkpoints here (default: temporary)")
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny checkpoint, fp32: the same code path")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    args.page = tuple(int(v) for v in (args.page or ("448x448" if args.dry_run else "1200x2040")).lower().split("x"))
    args.num_crops = args.num_crops or (1 if args.dry_run else 16)
    args.batch_size = args.batch_size or (1 if args.dry_run else 8)
    args.steps = args.steps or (1 if args.dry_run else 3)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else 1
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; --dry_run runs the same code path on CPU with the tiny checkpoint")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.utils.logging.disable_progress_bar()
    from phi3v.models.phi4_mm.modeling import vision_lora

    peak = None if args.dry_run else peak_tflops(args.peak_tflops)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        base = Path(args.model) if args.model else build_random_checkpoint(work / "random", args.dry_run)
        results, merge_seconds = [], None
        for mode in args.modes:
            checkpoint = base
            if mode == "qlora" and vision_lora(str(base)) is not None:
                checkpoint = work / "merged"
                if not (checkpoint / "config.json").is_file():
                    try:
                        merge_seconds = merge(base, checkpoint)
                    except RuntimeError as error:
                        results.append({"mode": mode, "error": str(error)[:160]})
                        continue
            results.append(run_mode(checkpoint, mode, args, str(work / "out")))
    markdown = report(results, args, peak, merge_seconds)
    print(markdown)
    write_json(args.json, "phi4_gpu_train", {"settings": {k: str(v) for k, v in vars(args).items() if k != "json"}
                                             | {"peak_tflops": peak, "merge_seconds": merge_seconds},
                                             "configurations": results}, markdown)
    return results


if __name__ == "__main__":
    main()
