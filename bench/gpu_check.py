"""One-shot check of everything that needs a GPU, on one CUDA GPU, in ~8 minutes: one table, exit 1 on any failure.

    python bench/gpu_check.py                  # on a machine with one CUDA GPU
    python bench/gpu_check.py --dry_run        # CPU, tiny model, a subset of the same checks (CI, ~2 min)
    python bench/gpu_check.py --only phi4      # only the Phi-4-multimodal rows (5.; ~4-5 min, estimated)
    python bench/gpu_check.py --phi4_model /models/Phi-4-multimodal-instruct   # them on the real weights

What it runs (each recipe check is `finetune_hf_trainer_ucf101.py` in its own process, on a small synthetic jsonl
dataset, through the recipes' own flags, so mixed precision, GradScaler, bitsandbytes, flash attention, DeepSpeed and
the generation-based evaluation all run as users run them):

1. every tuning mode (full, frozen_vision, lora, qlora) x precision (--bf16, --fp16) x attention (sdpa, and
   flash_attention_2 when flash-attn is installed): 2 training steps + evaluation after training, on a model of
   the official widths with 2 decoder and 4 CLIP layers (real kernels and shapes, a fraction of the load time);
   full and frozen_vision run with --deepspeed none (fp32 master weights, the fix of issue 10);
2. DeepSpeed ZeRO-2 and ZeRO-3 on one GPU, started with plain `python` (no launcher: the single-process group);
3. a 5-step recipe run with evaluation before and after training (checks that eval_before/eval_after exist);
4. `bench/gpu_train.py` on the full-size model: the MFU table with the recipes' real settings (all four modes,
   checkpointing on, batch 8 at 2,443 tokens).
5. Phi-4-multimodal-instruct at full size (`bench/phi4_gpu_train.py`): a bf16 LoRA step and a QLoRA step (on the
   checkpoint merged by `python -m phi3v.models.phi4_mm.merge_vision_lora`, timed), batch 8 of a 1200x2040 page
   at num_crops 16 (3x5 tiles + the global view, 4,259 tokens): images/s, MFU, peak memory. Random weights in
   the official config unless --phi4_model names a local copy (or the hub id, where the hub is reachable).

Time (estimated; nothing here has run on a GPU yet): 1.-4. ~8 minutes, 5. ~4-5 minutes (building and saving the
9.5 GB random checkpoint, the merge, two loads). For a 10-minute window run one part per command: `--only phi4`,
or `--skip_phi4` for the rest.

The recipe checks run 4 at a time (the reduced model needs ~2-6 GB each); gpu_train and then the Phi-4 rows run
alone first, so their timing has the GPU to itself. Reported per check: works / error (its last line), images/s
(training samples per second, from train_results.json; includes the first steps' warm-up, so it is not a speed
measurement: gpu_train's and phi4_gpu_train's are), MFU (those two only), peak GPU memory
(torch.cuda.max_memory_reserved in that process).

--dry_run: the tiny model on CPU; lora in bf16 with sdpa, full fine-tuning under ZeRO-2 without a launcher, the
5-step run, `gpu_train.py --dry_run` for full and lora, and `phi4_gpu_train.py --dry_run` (the tiny Phi-4
checkpoint: merge, LoRA and QLoRA on CPU). It proves the script and every code path it drives
work; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # `python bench/gpu_check.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from bench.common import REPO, gib, markdown_table, write_json

MODES = ("full", "frozen_vision", "lora", "qlora")
RECIPE = REPO / "finetune_hf_trainer_ucf101.py"
CLASSES = ("yes", "no")


# ------------------------------------------------------------------------------------------------- inputs


def write_dataset(root: Path, train: int = 8, val: int = 4) -> Path:
    """A two-class jsonl dataset in the recipes' schema (ucf101_{train,val}.jsonl + images/), random images of a
    few shapes so that crop grids differ within a batch."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    shapes = [(336, 336), (672, 336), (400, 900), (1000, 500)]
    for split, count in (("train", train), ("val", val)):
        lines = []
        for i in range(count):
            name = f"{split}-{i}.png"
            width, height = shapes[i % len(shapes)]
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "images" / name)
            lines.append(json.dumps({"id": f"{split}-{i}", "conversations": [
                {"images": [name], "user": "Is the picture noisy? Answer yes or no.", "assistant": CLASSES[i % 2]}]}))
        (root / f"ucf101_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def build_checkpoint(directory: Path, dry_run: bool) -> Path:
    """Random weights in the official layout: the tiny config (--dry_run), else the official widths with 2 decoder
    and 4 CLIP layers, in bf16, with the tiny builder's tokenizer (official special-token ids) and processor."""
    from phi3v.models.phi3_v.configuration import CLIP_VIT_L_336, Phi3VConfig
    from phi3v.models.phi3_v.image_processing import Phi3VImageProcessor
    from phi3v.models.phi3_v.modeling import Phi3VForCausalLM
    from phi3v.models.phi3_v.processing import Phi3VProcessor
    from phi3v.models.phi3_v.tiny import build_tokenizer, tiny_config

    if dry_run:
        config = tiny_config()
    else:
        config = Phi3VConfig.official(num_hidden_layers=2, vision_config={**CLIP_VIT_L_336, "num_hidden_layers": 4})
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3VForCausalLM._from_config(config, dtype=torch.float32 if dry_run else torch.bfloat16)
    model.save_pretrained(directory)
    Phi3VProcessor(Phi3VImageProcessor(num_crops=4), build_tokenizer()).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------------- checks


def recipe_checks(dry_run: bool, flash: bool) -> list[dict]:
    """(name, extra recipe flags, expected metric keys) for every recipe check."""
    attentions = ["sdpa"] + (["flash_attention_2"] if flash and not dry_run else [])
    precisions = ["bf16"] if dry_run else ["bf16", "fp16"]
    modes = ("lora",) if dry_run else MODES  # dry run: full fine-tuning runs in the ZeRO-2 check
    checks = []
    for mode in modes:
        for precision in precisions:
            for attention in attentions:
                flags = ["--tuning_mode", mode, f"--{precision}", "--attn_implementation", attention,
                         "--max_steps", "2", "--eval_before_training", "False"]
                if mode in ("full", "frozen_vision"):
                    flags += ["--deepspeed", "none"]
                checks.append({"name": f"{mode} {precision} {attention}", "flags": flags,
                               "expect": ["train_loss", "eval_after_accuracy"]})
    for stage in (2,) if dry_run else (2, 3):
        checks.append({"name": f"ZeRO-{stage}, no launcher", "flags": [
            "--tuning_mode", "full", "--bf16", "--deepspeed", str(REPO / f"ds_configs/zero{stage}.json"),
            "--max_steps", "2", "--eval_before_training", "False"], "expect": ["train_loss", "eval_after_accuracy"]})
    checks.append({"name": "5 steps, eval before/after", "flags": [
        "--tuning_mode", "lora", "--bf16", "--max_steps", "5"],
        "expect": ["train_loss", "eval_before_accuracy", "eval_after_accuracy"]})
    return checks


def run_recipe_check(check: dict, checkpoint: Path, data: Path, out: Path, timeout: int) -> dict:
    """Run one recipe check in its own process (plain python: no launcher); works / error, images/s, peak."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps({
        "argv": ["--model_name_or_path", str(checkpoint), "--data_dir", str(data), "--output_dir", str(out),
                 "--num_crops", "4", "--batch_size", "2", "--batch_size_per_gpu", "2", "--dataloader_num_workers",
                 "0", "--learning_rate", "1e-4", "--warmup_steps", "0", "--logging_steps", "1", "--no-tqdm",
                 "--report_to", "none", "--max_new_tokens", "4", "--save_strategy", "no", *check["flags"]],
        "peak_file": str(out / "peak_memory.json")})]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    started = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**env, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return {"name": check["name"], "ok": False, "error": f"timed out after {timeout} s"}
    result = {"name": check["name"], "seconds": round(time.time() - started, 1)}
    results_file = out / "all_results.json"
    metrics = json.loads(results_file.read_text()) if results_file.is_file() else {}
    missing = [key for key in check["expect"] if key not in metrics]
    if done.returncode != 0 or missing:
        lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
        result.update(ok=False, error=(lines[-1][:160] if lines else f"exit {done.returncode}")
                      if done.returncode != 0 else f"missing {', '.join(missing)}")
        return result
    peak = out / "peak_memory.json"
    result.update(ok=True, images_per_second=metrics.get("train_samples_per_second"),
                  peak_memory=json.loads(peak.read_text())["peak_reserved"] if peak.is_file() else None)
    return result


def child(payload: str) -> None:
    """Inside a check's process: the recipe's main, then the process's peak GPU memory to a file."""
    spec = json.loads(payload)
    sys.path.insert(0, str(REPO))
    import finetune_hf_trainer_ucf101 as recipe

    recipe.main(spec["argv"])
    peak = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else None
    Path(spec["peak_file"]).write_text(json.dumps({"peak_reserved": peak}))


def run_gpu_train(dry_run: bool, flash: bool, out: Path, timeout: int) -> list[dict]:
    """bench/gpu_train.py in its own process; one row per configuration (MFU included)."""
    flags = ["--dry_run", "--modes", "full", "lora"] if dry_run else ["--steps", "3", "--warmup_steps", "1"]
    flags += ["--attn", "flash_attention_2"] if flash and not dry_run else []
    command = [sys.executable, str(REPO / "bench" / "gpu_train.py"), "--checkpointing", "on", *flags,
               "--json", str(out / "gpu_train.json")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return [{"name": "gpu_train", "ok": False, "error": f"timed out after {timeout} s"}]
    if done.returncode != 0 or not (out / "gpu_train.json").is_file():
        lines = (done.stderr + done.stdout).strip().splitlines()
        return [{"name": "gpu_train", "ok": False, "error": lines[-1][:160] if lines else f"exit {done.returncode}"}]
    rows = []
    for r in json.loads((out / "gpu_train.json").read_text())["results"]["configurations"]:
        size = "tiny" if dry_run else "full size"
        name = f"gpu_train {r['mode']} ({size}, {'flash' if flash and not dry_run else 'sdpa'})"
        if "error" in r:
            rows.append({"name": name, "ok": False, "error": r["error"]})
        else:
            rows.append({"name": name, "ok": True, "images_per_second": r["images_per_second"], "mfu": r.get("mfu"),
                         "peak_memory": r.get("peak_reserved")})
    return rows


def run_phi4_train(dry_run: bool, flash: bool, model: str | None, out: Path, timeout: int) -> list[dict]:
    """bench/phi4_gpu_train.py in its own process; one row per mode (MFU included), or one row for its failure."""
    flags = ["--dry_run"] if dry_run else []
    flags += ["--attn", "flash_attention_2"] if flash and not dry_run else []
    flags += ["--model", model] if model else []
    command = [sys.executable, str(REPO / "bench" / "phi4_gpu_train.py"), *flags, "--work_dir", str(out / "phi4"),
               "--json", str(out / "phi4_gpu_train.json")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return [{"name": "phi4_gpu_train", "ok": False, "error": f"timed out after {timeout} s"}]
    if done.returncode != 0 or not (out / "phi4_gpu_train.json").is_file():
        lines = (done.stderr + done.stdout).strip().splitlines()
        return [{"name": "phi4_gpu_train", "ok": False,
                 "error": lines[-1][:160] if lines else f"exit {done.returncode}"}]
    results = json.loads((out / "phi4_gpu_train.json").read_text())["results"]
    size = "tiny" if dry_run else "full size"
    merge = results["settings"].get("merge_seconds")
    rows = []
    for r in results["configurations"]:
        name = f"phi4 {r['mode']} ({size}, {'flash' if flash and not dry_run else 'sdpa'})"
        if r["mode"] == "qlora" and merge is not None:
            name += f", merged in {merge:.0f} s"
        if "error" in r:
            rows.append({"name": name, "ok": False, "error": r["error"]})
        else:
            rows.append({"name": name, "ok": True, "images_per_second": r["images_per_second"], "mfu": r.get("mfu"),
                         "peak_memory": r.get("peak_reserved")})
    return rows


# ------------------------------------------------------------------------------------------------- report


def table(rows: list[dict], device: str) -> str:
    cells = [[r["name"], "works" if r["ok"] else f"error: {r['error']}",
              f"{r['images_per_second']:.2f}" if r.get("images_per_second") else "-",
              f"{r['mfu']:.1%}" if r.get("mfu") else "-", gib(r.get("peak_memory"))] for r in rows]
    failed = sum(not r["ok"] for r in rows)
    title = f"**GPU check on {device}: {len(rows) - failed} of {len(rows)} checks work**"
    return "\n\n".join([title, markdown_table(["check", "result", "images/s", "MFU", "peak memory"], cells)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny model, a subset: the code path, fast")
    parser.add_argument("--parallel", type=int, default=None, help="recipe checks at a time (default 4; 2 dry)")
    parser.add_argument("--timeout", type=int, default=420, help="seconds per check before it counts as failed")
    parser.add_argument("--skip_gpu_train", action="store_true", help="leave out the full-size MFU table")
    parser.add_argument("--skip_phi4", action="store_true", help="leave out the Phi-4-multimodal rows")
    parser.add_argument("--only", choices=("phi4",), default=None, help="phi4: only the Phi-4-multimodal rows")
    parser.add_argument("--phi4_model", default=None,
                        help="Phi-4-multimodal checkpoint (local dir or hub id); default: random weights")
    parser.add_argument("--phi4_timeout", type=int, default=540, help="seconds for the Phi-4 rows")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.parallel = args.parallel or (2 if args.dry_run else 4)
    if args.only == "phi4" and args.skip_phi4:
        parser.error("--only phi4 and --skip_phi4 leave nothing to run")
    if not args.dry_run and not args._child and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; --dry_run runs the same checks' code path on CPU with the tiny model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        child(args._child)
        return 0
    from transformers.utils import is_flash_attn_2_available

    flash = torch.cuda.is_available() and is_flash_attn_2_available()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "CPU (dry run)"
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        phi3 = args.only is None
        rows = [] if args.skip_gpu_train or not phi3 else run_gpu_train(args.dry_run, flash, scratch, args.timeout)
        if not args.skip_phi4:
            rows += run_phi4_train(args.dry_run, flash, args.phi4_model, scratch, args.phi4_timeout)
        if phi3:
            checkpoint = build_checkpoint(scratch / "model", args.dry_run)
            data = write_dataset(scratch / "data")
            checks = recipe_checks(args.dry_run, flash)
            with ThreadPoolExecutor(args.parallel) as pool:
                rows += list(pool.map(lambda ic: run_recipe_check(ic[1], checkpoint, data, scratch / f"run{ic[0]}",
                                                                  args.timeout), enumerate(checks)))
    markdown = table(rows, device) + f"\n\n{time.time() - started:.0f} s in all"
    print(markdown)
    write_json(args.json, "gpu_check", {"device": device, "checks": rows}, markdown)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
