"""Checkpoints that are either complete or ignored, and a resume that says what it does.

A checkpoint is written under OUTPUT_DIR/.saving/checkpoint-N, marked complete there (every file flushed, then a
marker listing each file's size and mtime), and only then renamed to OUTPUT_DIR/checkpoint-N: a crash leaves debris
in .saving, which the next run clears. A checkpoint-N without our marker is foreign: never deleted, rotated or
overwritten, resumed only when readable. One whose files differ from its marker is never resumed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from phi3v.common.errors import BadValue, MissingFile, UserError
from phi3v.common.plotting import save_training_curves
from phi3v.serve.publish import RUN_INFO
from phi3v.train.arguments import ModelArguments

logger = logging.getLogger(__name__)


COMPLETE_MARKER = "checkpoint_complete.json"
STAGING = ".saving"


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, read-only); the earlier ones are intact."""


def file_stamps(checkpoint: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime in ns]} of every file but the marker."""
    return {str(p.relative_to(checkpoint)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(checkpoint.rglob("*")) if p.is_file() and not p.name.startswith(COMPLETE_MARKER)}


def is_ours(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def is_complete(checkpoint: str | Path) -> bool:
    """True if our marker exists and every file it lists is there with the recorded size and modification time (an
    in-place rewrite of any file, even to the same size, changes the time)."""
    files = recorded(Path(checkpoint) / COMPLETE_MARKER).get("files")
    if not isinstance(files, dict):
        return False
    stamps = file_stamps(Path(checkpoint))
    return all(isinstance(stamp, list) and stamps.get(name) == stamp for name, stamp in files.items())


def is_readable_foreign(checkpoint: str | Path) -> bool:
    """A checkpoint without our marker that has a trainer state and weights (stock Trainer layout)."""
    checkpoint = Path(checkpoint)
    return "global_step" in recorded(checkpoint / "trainer_state.json") and any(
        (checkpoint / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                                   "adapter_model.safetensors"))


def mark_complete(checkpoint: str | Path, step: int) -> None:
    """Flush every file of the checkpoint to disk, then write the marker atomically (temp file + rename)."""
    checkpoint = Path(checkpoint)
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    files = file_stamps(checkpoint)
    temporary = checkpoint / (COMPLETE_MARKER + ".tmp")
    with open(temporary, "w") as f:
        json.dump({"global_step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, checkpoint / COMPLETE_MARKER)


def move_into_place(staged: Path, target: Path) -> None:
    """Rename a complete staged checkpoint to `target`. An earlier checkpoint of ours there is replaced (the run was
    told it would be); a foreign one is renamed aside to kept-<name>-<time>, never deleted."""
    old = target.with_name(f"{STAGING}-replaced-{target.name}")
    if is_ours(target):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    elif target.exists():
        kept = target.with_name(f"kept-{target.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        logger.warning(f"{target} was not written by this recipe: renamed to {kept.name} (kept, not deleted)")
        os.replace(target, kept)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders of `output_dir`, oldest step first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_checkpoint(requested: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from: None, an explicit path (which must be complete), or `last`."""
    if not requested:
        return None
    if requested.lower() in ("last", "latest", "true"):
        usable = []
        for checkpoint in checkpoints(output_dir):
            if is_complete(checkpoint) or (not is_ours(checkpoint) and is_readable_foreign(checkpoint)):
                usable.append(checkpoint)
            else:
                why = ("its files changed after it was written (overwritten or damaged)" if is_ours(checkpoint)
                       else "not written by this recipe and not a readable checkpoint")
                logger.warning(f"ignoring {checkpoint}: {why}")
        if not usable:
            found = [p.name for p in checkpoints(output_dir)]
            raise MissingFile(f"--resume_from_checkpoint last: no complete checkpoint in {output_dir}"
                              + (f" (unusable: {', '.join(found)})" if found else ""))
        return str(usable[-1])
    if not Path(requested).is_dir():
        raise MissingFile(f"--resume_from_checkpoint {requested}: no such directory")
    if is_ours(requested) and not is_complete(requested):
        raise BadValue(f"{requested} is not a complete checkpoint: its files differ from {COMPLETE_MARKER} "
                       "(changed or damaged after it was written). Resume from an earlier one, or pass 'last'.")
    if not is_ours(requested) and not is_readable_foreign(requested):
        raise BadValue(f"{requested} is not a complete checkpoint (no {COMPLETE_MARKER}, and no trainer_state.json "
                       "with weights). Resume from an earlier one, or pass 'last'.")
    return requested


def rotate(output_dir: str | Path, limit: int | None, keep: str | None = None) -> None:
    """Delete our oldest complete checkpoints beyond `limit` (never a foreign one, never `keep`, the best)."""
    if not limit:
        return
    ours = [p for p in checkpoints(output_dir) if is_complete(p) and str(p) != str(keep)]
    for old in ours[: max(0, len(ours) - max(limit - (keep is not None), 1))]:
        logger.info(f"deleting older checkpoint {old} (--save_total_limit {limit})")
        shutil.rmtree(old, ignore_errors=True)


class CheckpointsMixin:
    """Phi3VTrainer's checkpoint writing: staged under .saving/, marked complete, renamed into place."""

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if getattr(self, "_staging", False) else run_dir

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint under .saving/, mark it complete, then rename it into place and rotate."""
        from safetensors import SafetensorError

        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = Path(super()._get_output_dir(trial))
        staged = run_dir / STAGING / name
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotation is ours: only complete checkpoints of this recipe
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, SafetensorError) as error:
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
                with contextlib.suppress(OSError):
                    (run_dir / STAGING).rmdir()
            earlier = [p for p in checkpoints(run_dir) if is_complete(p)]
            raise CheckpointWriteError(
                f"could not write {run_dir / name} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "is the disk full or read-only? "
                + (f"The earlier checkpoint {earlier[-1]} is intact: free space and continue with "
                   "--resume_from_checkpoint last." if earlier else "No earlier checkpoint exists.")
            ) from error
        finally:
            self._staging = False
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank has written its part (optimizer shards, RNG state)
        if self.args.should_save:
            save_training_curves(self.state.log_history, staged)
            self.save_run_record(staged)  # its mode and frozen parts, which a resume must match (check_resume_setup)
            mark_complete(staged, self.state.global_step)
            move_into_place(staged, run_dir / name)
            with contextlib.suppress(OSError):  # only when empty: other ranks' parts would be in it
                (run_dir / STAGING).rmdir()
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            if self.state.best_global_step and best.is_dir():
                self.state.best_model_checkpoint = str(best)
            rotate(run_dir, limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()  # no rank goes on before the checkpoint is in place


def prepare_resume(trainer: Trainer, requested: str | None) -> str | None:
    """Resolve --resume_from_checkpoint, say what will happen, and refuse to 'resume' a finished run."""
    output_dir = trainer.args.output_dir
    checkpoint = resolve_checkpoint(requested, output_dir)
    if trainer.args.should_save:
        clear_staging(output_dir)
    if checkpoint is None:
        ours = [p.name for p in checkpoints(output_dir) if is_ours(p)]
        foreign = [p.name for p in checkpoints(output_dir) if not is_ours(p)]
        if ours:
            logger.warning(f"{output_dir} already holds {', '.join(ours)}; this run starts from scratch and replaces "
                           "each when it saves the same step. To continue the earlier run instead, pass "
                           "--resume_from_checkpoint last.")
        if foreign:
            logger.warning(f"{output_dir} holds {', '.join(foreign)}, not written by this recipe: left as they are "
                           "(never deleted; renamed to kept-<name>-<time> if this run saves the same step)")
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    planned = trainer.planned_steps()
    if state["global_step"] >= planned:
        raise BadValue(f"{checkpoint} is step {state['global_step']} of a run of {planned} steps: that run is "
                       "finished and there is nothing to resume. Start a new run (another --output_dir, or no "
                       "--resume_from_checkpoint), or raise --num_train_epochs / --max_steps to train further.")
    logger.warning(f"resuming from {checkpoint}: step {state['global_step']} of {planned} "
                   f"(epoch {state.get('epoch', 0):.2f}); optimizer, scheduler, RNG and data order are restored")
    return checkpoint


def clear_staging(output_dir: str | Path) -> None:
    """Remove what an interrupted save left in OUTPUT_DIR/.saving (only ever written by this recipe)."""
    staging = Path(output_dir) / STAGING
    for leftover in sorted(staging.glob("*")):  # none where there is no staging folder
        logger.warning(f"removing {leftover}: left incomplete by an interrupted save")
    shutil.rmtree(staging, ignore_errors=True)
    for leftover in Path(output_dir).glob(f"{STAGING}-replaced-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def recorded(path: Path) -> dict:
    """A JSON file of a checkpoint, or {} where it is missing or unreadable (then its other files tell)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


FREEZE_FLAGS = {"vision": "--freeze_vision_tower", "projector": "--freeze_projector", "language": "--freeze_llm"}


def setup_name(mode: str, frozen: set[str]) -> str:
    return f"{mode} mode" + (f" ({', '.join(sorted(frozen))} frozen)" if frozen else "")


def setup_flags(mode: str, frozen: set[str]) -> str:
    """The flags that select `mode` with the `frozen` parts."""
    flags = {"lora": ["--use_lora"], "qlora": ["--use_qlora"]}.get(mode, [])
    if {"vision", "projector"} <= frozen:
        flags.append("--freeze_vision_model")
        frozen = frozen - {"vision", "projector"}
    flags += [FREEZE_FLAGS[part] for part in sorted(frozen) if part in FREEZE_FLAGS]
    return " ".join(flags) or "no --use_lora, --use_qlora or --freeze_* flag"


def check_resume_setup(checkpoint: str, model_args: ModelArguments) -> None:
    """Refuse a checkpoint written in another tuning mode, naming the flags that resume it (the Trainer would fail
    obscurely, after loading the model). Ours record mode and frozen parts in run_info.json; for others,
    adapter_config.json tells an adapter from model weights."""
    run = recorded(Path(checkpoint) / RUN_INFO)
    if isinstance(run.get("frozen"), list):
        mode, frozen = str(run.get("mode")), set(map(str, run["frozen"]))
        if (mode in ("lora", "qlora")) == model_args.use_lora and frozen == model_args.frozen_parts:
            return  # LoRA and QLoRA adapters are the same tensors: either resumes the other
        written, flags = setup_name(mode, frozen), setup_flags(mode, frozen)
    else:
        adapter = (Path(checkpoint) / "adapter_config.json").is_file()
        if adapter == model_args.use_lora:
            return
        written = ("LoRA/QLoRA mode (it holds adapter_config.json)" if adapter
                   else "full fine-tuning mode (it holds model weights, no adapter)")
        flags = "--use_lora (or --use_qlora)" if adapter else "no --use_lora/--use_qlora"
    raise BadValue(f"--resume_from_checkpoint {checkpoint} was written in {written}, this run is "
                   f"{setup_name(model_args.tuning_mode, model_args.frozen_parts)}: resume it with {flags}")
