"""What a run tells its user: logging on rank 0, a one-screen summary at the start and at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
import warnings

import datasets
import torch
import transformers

from phi3v.common.plotting import save_training_curves

logger = logging.getLogger("phi3v")


def count_parameters(model: torch.nn.Module, predicate=lambda name: True) -> tuple[int, int]:
    """(trainable, total) parameters whose name satisfies `predicate`; 4-bit weights count unpacked, ZeRO-3
    partitioned ones at their full size."""
    trainable = total = 0
    for name, param in model.named_parameters():
        if predicate(name):
            n = getattr(param, "ds_numel", param.numel())
            n *= 2 if getattr(param, "quant_state", None) is not None else 1
            total += n
            trainable += n if param.requires_grad else 0
    return trainable, total


def setup_logging(training_args) -> None:
    """Our messages at INFO on the main process (warnings only on the others), to stdout; transformers and
    datasets at WARNING, their progress bars off under --no-tqdm and off the main process."""
    level = logging.INFO if training_args.should_log else logging.WARNING
    if not any(getattr(h, "is_phi3v", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler.is_phi3v = True
        logger.addHandler(handler)
    logger.setLevel(level)
    for library in (transformers.utils.logging, datasets.utils.logging):
        library.set_verbosity(logging.WARNING)
    if training_args.disable_tqdm or not training_args.should_log:  # --no-tqdm, and every rank but the first
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    one_line_warnings()
    if not training_args.should_log:  # said by the first process, not once per process
        warnings.filterwarnings("ignore", message="This DataLoader will create")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if training_args.should_log else logging.ERROR)


def one_line_warnings() -> None:
    """Each distinct Python warning once per process, on one line (category, first line of the message, where):
    DeepSpeed and torch.distributed repeat theirs at every step, and the "once" filter alone does not hold, since
    every `warnings.catch_warnings()` resets what it has seen."""
    if getattr(warnings.showwarning, "is_phi3v", False):
        return
    # appended, so what Python hides by default stays hidden
    warnings.simplefilter("once", append=True)
    shown: set[tuple[type, str]] = set()

    def show_once(message, category, filename, lineno, file=None, line=None):
        first = next(iter(str(message).strip().splitlines()), "")
        if (category, first) in shown:
            return
        shown.add((category, first))
        with contextlib.suppress(OSError):  # a closed stderr must not turn a warning into a crash
            (file or sys.stderr).write(f"{category.__name__}: {first} ({os.path.basename(filename)}:{lineno})\n")

    show_once.is_phi3v = True
    warnings.showwarning = show_once


_jit_load = None  # DeepSpeed's OpBuilder.jit_load, wrapped once by announce_deepspeed_compiles


def announce_deepspeed_compiles() -> None:
    """One line before DeepSpeed compiles a C++/CUDA extension (first use on a machine: minutes of silence
    otherwise), on the first process of each machine; nothing when the extension is already built and cached."""
    global _jit_load
    from deepspeed.ops.op_builder.builder import OpBuilder

    if _jit_load is not None:
        return
    _jit_load = OpBuilder.jit_load

    def jit_load(builder, verbose=True):
        if os.environ.get("LOCAL_RANK", "0") == "0" and not extension_is_built(builder.name):
            logger.warning(f"DeepSpeed is compiling its {builder.name} extension: once per machine, it can take a "
                           "few minutes (cached in ~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR)")
        return _jit_load(builder, verbose)

    OpBuilder.jit_load = jit_load


def extension_is_built(name: str) -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    folder = _get_build_directory(name, verbose=False)
    return os.path.isdir(folder) and any(f.endswith(".so") for f in os.listdir(folder))


def log_config(*argument_groups) -> None:
    """The arguments that differ from a run with no flags at all (derived fields compared alike)."""
    for args in argument_groups:
        try:
            baseline = type(args)()  # the defaults, derived fields filled the same way
        except Exception:  # a group with required fields: compare with the declared defaults (getattr's default)
            baseline = None
        changed = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init
                   and not f.name.startswith("_") and getattr(args, f.name) != getattr(baseline, f.name, f.default)}
        logger.info(f"{type(args).__name__}: {changed}")


def start_summary(model, model_args, training_args, datasets_by_split: dict) -> float:
    trainable, total = count_parameters(model)
    world = max(training_args.world_size, 1)
    lines = [
        f"model        {model_args.model_name_or_path} ({model_args.attn_implementation}, "
        f"{next(model.parameters()).dtype}, num_crops {model_args.num_crops})",
        f"mode         {model_args.tuning_mode}: {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / max(total, 1):.2f}%)",
        "data         " + ", ".join(f"{split} {len(d)}" for split, d in datasets_by_split.items()),
        f"batch        {training_args.batch_size} = {training_args.batch_size_per_gpu} per GPU x {world} process(es)"
        f" x {training_args.gradient_accumulation_steps} accumulation; precision "
        + ("bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32")
        + (f"; DeepSpeed {training_args.deepspeed}" if training_args.deepspeed else ""),
        f"schedule     {training_args.num_train_epochs:g} epoch(s), lr {training_args.learning_rate:g}, "
        f"warmup {training_args.warmup_steps:g}, checkpoints every {training_args.save_steps:g} steps",
        f"output       {training_args.output_dir}",
    ]
    logger.info("run summary\n  " + "\n  ".join(lines))
    return time.time()


def end_summary(metrics: dict, training_args, started: float) -> None:
    """Each metric before and after training, aligned; "-" where an evaluation did not run."""
    def by_name(prefix: str) -> dict:
        return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)
                and isinstance(v, (int, float)) and not k.endswith(("runtime", "samples"))}

    befores, afters, tests = by_name("eval_before_"), by_name("eval_after_"), by_name("test_")
    names = list(dict.fromkeys([*afters, *befores]))
    width = max([12, *(len(name) + 1 for name in names), *(len(f"test_{name}") + 1 for name in tests)])

    def value(table: dict, name: str) -> str:
        return f"{table[name]:.4f}" if name in table else "-"

    lines = [f"{name:<{width}} before {value(befores, name):>7}  after {value(afters, name):>7}" for name in names]
    lines += [f"{'test_' + name:<{width}} {v:.4f}" for name, v in tests.items()]
    if not afters:
        lines.append("(no evaluation after training: --no_eval_after_training)" if befores
                     else "(no evaluation: --no_eval_before_training and --no_eval_after_training, or a resume)")
    out = training_args.output_dir
    lines += [f"{'time':<{width}} {time.time() - started:.0f} s",
              f"{'results':<{width}} {out}/all_results.json, predictions {out}/eval_*.json, curves "
              f"{out}/training_curves.png"]
    logger.info("done\n  " + "\n  ".join(lines))


def finish(trainer, metrics: dict, started: float) -> None:
    """Write the evaluation metrics (eval_results.json, all_results.json), the training curves and the summary."""
    metrics = {**getattr(trainer, "deferred_metrics", {}), **metrics}  # FSDP: the evaluation before training
    if metrics:
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if trainer.args.should_save:
        save_training_curves(trainer.state.log_history, trainer.args.output_dir)
        trainer.write_run_info()  # run_info.json, and the model card of a servable output
        end_summary(metrics, trainer.args, started)
    if trainer.args.push_to_hub:
        trainer.push_to_hub()
