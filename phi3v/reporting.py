"""What a run tells its user: logging on rank 0, a one-screen summary at the start and at the end."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

import datasets
import transformers

from phi3v.model_loading import count_parameters
from phi3v.plotting import save_training_curves

logger = logging.getLogger("phi3v")


def setup_logging(training_args) -> None:
    """Our messages at INFO on the main process (warnings only on the others), to stdout; transformers and
    datasets at WARNING, and their progress bars off under --no-tqdm and off the main process. Handlers of the
    caller (a notebook, pytest) are left alone."""
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


def log_config(*argument_groups) -> None:
    """The resolved arguments, once, on the main process (non-default values only, to stay readable)."""
    for args in argument_groups:
        changed = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
                   if f.init and getattr(args, f.name) != f.default and not f.name.startswith("_")}
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
    befores = {k.removeprefix("eval_before_"): v for k, v in metrics.items() if k.startswith("eval_before_")}
    afters = {k.removeprefix("eval_after_"): v for k, v in metrics.items() if k.startswith("eval_after_")}
    lines = [f"{name:<12} before {befores.get(name, float('nan')):.4f}  after {value:.4f}"
             for name, value in afters.items() if not name.endswith(("runtime", "samples"))]
    lines += [f"{k:<12} {v:.4f}" for k, v in metrics.items() if k.startswith("test_") and isinstance(v, float)
              and not k.endswith("runtime")]
    out = training_args.output_dir
    lines += [f"time         {time.time() - started:.0f} s",
              f"results      {out}/all_results.json, predictions {out}/eval_*.json, curves {out}/training_curves.png"]
    logger.info("done\n  " + "\n  ".join(lines))


def finish(trainer, metrics: dict, started: float) -> None:
    """Write the evaluation metrics (eval_results.json, all_results.json), the training curves and the summary."""
    if metrics:
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if trainer.args.should_save:
        save_training_curves(trainer.state.log_history, trainer.args.output_dir)
        end_summary(metrics, trainer.args, started)
