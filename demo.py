"""The main job on an embedded default: fine-tune a tiny Phi-3.5-vision on a video dataset made here, offline, on CPU.

    python demo.py                  # or: make demo   (writes ./demo_output, a few minutes on 2 CPU cores)
    python demo.py --like phi-4-multimodal-instruct    # the same, tiny Phi-4-multimodal (~18 min on 2 busy cores)

Each step is the same as with real data, through the same code paths:
  1. a tiny random checkpoint in the official layout       python -m phi3v.tiny demo_output/tiny-model [--like ...]
     (--real_vocab: with the real Phi-3 vocabulary instead of the small tokenizer trained here)
  2. 220 short synthetic videos (10 UCF-101 class names, AVI, MPEG-4 written with PyAV): one colour and stripe
     texture per class, a moving square, noise
  3. convert them                                         python convert_ucf101.py --src ... --num_frames 2
  4. fine-tune (full), evaluating before and after        python finetune_hf_trainer_ucf101.py --data_dir ...
and prints the accuracy before and after training (chance: 10%).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import convert_ucf101
import finetune_hf_trainer_ucf101
from phi3v.common.errors import Parser, parse_checked, run_main
from phi3v.data.synthetic import make_video_dataset
from phi3v.tiny import PHI4_MM
from phi3v.tiny import main as build_tiny


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="demo_output", help="everything goes here (replaced if it exists)")
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--like", default="phi-3.5-vision-instruct", choices=["phi-3.5-vision-instruct", PHI4_MM],
                        help="the model the tiny one is a miniature of")
    parser.add_argument("--real_vocab", action="store_true",
                        help="the tiny Phi-3.5-vision gets the real Phi-3 vocabulary (tests/assets/phi3-vocab; needs "
                             "gguf)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_checked(build_parser(), argv)

    started = time.time()
    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    model_dir = out / "tiny-model"
    build_tiny([str(model_dir), "--seed", str(args.seed), "--like", args.like, *["--real_vocab"] * args.real_vocab])
    make_video_dataset(out / "videos", videos_per_split={"train": 16, "val": 3, "test": 3}, seed=args.seed)
    convert_ucf101.main(["--src", str(out / "videos"), "--out_dir", str(out / "data"), "--num_frames", "2"])
    metrics = finetune_hf_trainer_ucf101.main([
        "--model_name_or_path", str(model_dir), "--data_dir", str(out / "data"), "--output_dir", str(out / "run"),
        "--num_crops", "1", "--batch_size", "8", "--batch_size_per_gpu", "8", "--learning_rate", "5e-3",
        "--warmup_steps", "10", "--num_train_epochs", str(args.epochs), "--logging_steps", "5",
        "--save_steps", "100", "--dataloader_num_workers", "2", "--no_activation_checkpointing",
        "--max_new_tokens", "16", "--seed", str(args.seed), "--report_to", "none",
    ])
    summary = {"accuracy_before": metrics["eval_before_accuracy"], "accuracy_after": metrics["eval_after_accuracy"],
               "test_accuracy": metrics["test_accuracy"], "chance": 0.1, "wall_time_s": round(time.time() - started)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nval accuracy before fine-tuning {summary['accuracy_before']:.0%}, after {summary['accuracy_after']:.0%}"
          f"; test accuracy {summary['test_accuracy']:.0%} (chance 10%); {summary['wall_time_s']} s. "
          f"Results, predictions and training curves are in {out / 'run'}.")
    return summary


if __name__ == "__main__":
    run_main(main)
