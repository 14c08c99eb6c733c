"""Console commands of the installed package (`pip install .`): thin doors to the scripts, which keep working as
`python finetune_hf_trainer_<task>.py ...` from a checkout.

    phi3v-train --task docvqa [flags or config.yaml]   = python finetune_hf_trainer_docvqa.py [...]
    phi3v-predict OUTPUT_DIR --image x.png --question "..."   = python predict.py [...]
    phi3v-export OUTPUT_DIR MERGED_DIR                 = python -m phi3v.export [...]
    phi3v-convert-ucf101 --src DIR --out_dir DIR       = python convert_ucf101.py [...]
"""

from __future__ import annotations

import importlib
import sys

from phi3v.errors import UserError, run_main

TASKS = ("docvqa", "nlvr2", "hateful_memes", "ucf101")
USAGE = (f"usage: phi3v-train --task {{{','.join(TASKS)}}} [flags | CONFIG.yaml]\n"
         "Fine-tune Phi-3.5-vision with one of the four recipes; `phi3v-train --task docvqa --help` lists its flags.")


def task_and_rest(argv: list[str]) -> tuple[str | None, list[str]]:
    """(`--task` value, the other arguments); `--task X` and `--task=X` anywhere."""
    for i, arg in enumerate(argv):
        if arg == "--task":
            return (argv[i + 1] if i + 1 < len(argv) else None), argv[:i] + argv[i + 2:]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def train(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    task, rest = task_and_rest(argv)
    if task is None and {"-h", "--help"} & set(rest):
        print(USAGE)
        return None
    if task not in TASKS:
        def refuse(_argv):
            raise UserError(f"--task must be one of {', '.join(TASKS)}" + (f", got {task!r}" if task else "")
                            + "\n" + USAGE)
        return run_main(refuse, rest)
    return run_main(importlib.import_module(f"finetune_hf_trainer_{task}").main, rest)


def predict(argv: list[str] | None = None):
    return run_main(importlib.import_module("predict").main, argv)


def export(argv: list[str] | None = None):
    return run_main(importlib.import_module("phi3v.export").main, argv)


def convert_ucf101(argv: list[str] | None = None):
    return run_main(importlib.import_module("convert_ucf101").main, argv)
