"""Console commands of the installed package (`pip install .`): thin doors to the scripts (a top-level module, like
them: the phi3v package never imports a script), which keep working as
`python finetune_hf_trainer_<task>.py ...` from a checkout.

    phi3v-train --task docvqa [flags or config.yaml]   = python finetune_hf_trainer_docvqa.py [...]
    phi3v-predict OUTPUT_DIR --image x.png --question "..."   = python predict.py [...]
    phi3v-export OUTPUT_DIR MERGED_DIR                 = python -m phi3v.export [...]
    phi3v-convert-ucf101 --src DIR --out_dir DIR       = python convert_ucf101.py [...]
"""

from __future__ import annotations

import importlib
import sys

from phi3v.common.errors import UserError, run_main

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


def command(module: str, argv: list[str] | None) -> None:
    """Run `module`'s main under run_main, its import included (Ctrl-C while it loads is one line too). Returns
    nothing: the wrapper pip writes exits with what a command returns, so a result would be an error exit."""
    run_main(lambda argv: importlib.import_module(module).main(argv), argv)


def train(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    task, rest = task_and_rest(argv)
    if task is None and {"-h", "--help"} & set(rest):
        print(USAGE)
        return
    if task not in TASKS:
        def refuse(_argv):
            raise UserError(f"--task must be one of {', '.join(TASKS)}" + (f", got {task!r}" if task else "")
                            + "\n" + USAGE)
        run_main(refuse, rest)  # exits with status 2
    command(f"finetune_hf_trainer_{task}", rest)


def predict(argv: list[str] | None = None) -> None:
    command("predict", argv)


def export(argv: list[str] | None = None) -> None:
    command("phi3v.export", argv)


def convert_ucf101(argv: list[str] | None = None) -> None:
    command("convert_ucf101", argv)
