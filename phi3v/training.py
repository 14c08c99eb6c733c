"""The Trainer the four recipes share: length-grouped batches, generation-based evaluation, checkpoints that are
either complete or ignored, resume that says what it does, and a stop (or skip) on NaN/inf with the culprits named.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel
from transformers import Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from phi3v.errors import BadValue, MissingFile, UserError
from phi3v.eval_loss import evaluation_loss
from phi3v.generation import (
    eval_batch_size,
    gathered_per_module,
    generate_predictions,
    kv_cache_budget_bytes,
    prompt_lengths,
)
from phi3v.model_loading import part_of
from phi3v.plotting import save_training_curves
from phi3v.serving import RUN_INFO, complete_layout, hub_api, model_card, push_folder, read_run

logger = logging.getLogger(__name__)
COMPLETE_MARKER = "checkpoint_complete.json"


class NonFiniteError(RuntimeError):
    pass


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, read-only); the earlier ones are intact."""


# ------------------------------------------------------------------------------------------------- sampling


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Random order, except that within each group of `batch_size * group_batches` indices, items are arranged by
    length (longest first) so that consecutive batches need little padding.

    Lengths within `tolerance` of each other count as equal and stay in random order: where the length follows
    the label (a class name's token count), an exact sort would give batches of a single class.
    The order depends only on (seed, epoch), so resuming replays it exactly.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_batches: int = 50,
                 tolerance: float = 0.04):
        self.lengths = lengths
        self.group = batch_size * group_batches
        self.seed = seed
        self.tolerance = tolerance
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.group):
            yield from self.arrange(order[start:start + self.group], generator)

    def arrange(self, indices: list[int], generator: torch.Generator) -> list[int]:
        """Longest first, in runs whose lengths are within `tolerance`; each run shuffled."""
        runs, run = [], []
        for i in sorted(indices, key=lambda i: -self.lengths[i]):
            if run and self.lengths[run[0]] > self.lengths[i] * (1 + self.tolerance):
                runs.append(run)
                run = []
            run.append(i)
        runs.append(run)
        return [r[j] for r in runs for j in torch.randperm(len(r), generator=generator).tolist()]


# ------------------------------------------------------------------------------------------------- checkpoints
#
# A checkpoint is written under OUTPUT_DIR/.saving/checkpoint-N, marked complete there (every file flushed, then a
# marker listing each file's size and modification time), and only then renamed to OUTPUT_DIR/checkpoint-N. So a
# checkpoint-N folder is either complete or not ours: a crash leaves its debris in .saving, which the next run
# clears. A checkpoint-N without our marker (the stock Trainer's, the original recipe's) is foreign: it is never
# deleted, rotated or overwritten, and is resumed only when it is readable. A checkpoint whose files differ from its
# marker (changed after it was written) is never resumed.

STAGING = ".saving"


def file_stamps(checkpoint: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime in ns]} of every file but the marker."""
    return {str(p.relative_to(checkpoint)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(checkpoint.rglob("*")) if p.is_file() and not p.name.startswith(COMPLETE_MARKER)}


def is_ours(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def is_complete(checkpoint: str | Path) -> bool:
    """True if our marker exists and every file it lists is there with the recorded size and modification time (an
    in-place rewrite of any file, even to the same size, changes the time)."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    stamps = file_stamps(Path(checkpoint))
    return all(isinstance(stamp, list) and stamps.get(name) == stamp for name, stamp in files.items())


def is_readable_foreign(checkpoint: str | Path) -> bool:
    """A checkpoint without our marker that has a trainer state and weights (stock Trainer layout)."""
    checkpoint = Path(checkpoint)
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return any((checkpoint / name).is_file() for name in (
        "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"))


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
    if target.exists():
        if is_ours(target):
            old = target.with_name(f"{STAGING}-replaced-{target.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staged, target)
            shutil.rmtree(old, ignore_errors=True)
            return
        kept = target.with_name(f"kept-{target.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        logger.warning(f"{target} was not written by this recipe: renamed to {kept.name} (kept, not deleted)")
        os.replace(target, kept)
    os.replace(staged, target)


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
            if is_complete(checkpoint):
                usable.append(checkpoint)
            elif is_ours(checkpoint):
                logger.warning(f"ignoring {checkpoint}: its files changed after it was written (overwritten or "
                               "damaged)")
            elif is_readable_foreign(checkpoint):
                usable.append(checkpoint)
            else:
                logger.warning(f"ignoring {checkpoint}: not written by this recipe and not a readable checkpoint")
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


# ------------------------------------------------------------------------------------------------- trainer


class CarryEarlierLogs(TrainerCallback):
    """train() starts a fresh TrainerState; keep what was logged before it (the evaluation before training) in
    its log history, so trainer_state.json and the training curves have it. Under FSDP, run the evaluation that
    was asked for before training now, on the sharded model (see Phi3VTrainer.evaluate)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        earlier = [entry for entry in self.trainer._earlier_logs if entry not in state.log_history]
        state.log_history[:0] = earlier
        self.trainer._training_started = True
        deferred, self.trainer._deferred_evaluations = self.trainer._deferred_evaluations, []
        for dataset, prefix in deferred:
            self.trainer.deferred_metrics.update(self.trainer.evaluate(dataset, metric_key_prefix=prefix))


def precision_dtype(args) -> torch.dtype | None:
    """The training precision, for autocast in evaluation: bf16, fp16, or None (fp32)."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None


class LogFirstAndLastStep(TrainerCallback):
    """Loss and learning rate logged at the first and the last optimizer step too, whatever --logging_steps: a
    short run still gets its curves (a run of fewer than --logging_steps steps would otherwise log none)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (1, state.max_steps):
            control.should_log = True


def warn_if_warmup_outlasts_the_run(args, planned: int) -> None:
    warmup = args.get_warmup_steps(planned)
    if warmup >= planned:
        logger.warning(f"the linear warm-up lasts {warmup} steps and the run {planned}: the learning rate never "
                       f"reaches --learning_rate {args.learning_rate:g} (it ends at "
                       f"{args.learning_rate * planned / max(warmup, 1):.3g}). Lower --warmup_steps, or pass a "
                       "fraction of the run (--warmup_steps 0.1 = 10%).")


class Phi3VTrainer(Trainer):
    """Trainer + generation-based `evaluate`, deterministic length grouping, atomic-by-marker checkpoints and
    non-finite loss/gradient handling.

    Args:
        task_metric: predictions ([{"id", "prediction", "reference"[, "scores"]}]) -> {name: value}.
        score_token_ids: token ids whose first-step probabilities evaluation records (e.g. for ROC AUC).
        max_new_tokens / eval_batch_size: generation settings for evaluation.
    """

    def __init__(self, *args, task_metric: Callable[[list[dict]], dict] | None = None,
                 score_token_ids: list[int] | None = None, max_new_tokens: int = 64,
                 eval_batch_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_metric = task_metric
        self.score_token_ids = score_token_ids
        self.max_new_tokens = max_new_tokens
        self.generation_batch_size = eval_batch_size  # None: sized by the KV-cache budget at each evaluation
        self.deferred_metrics: dict = {}  # FSDP: the evaluation before training, run once the model is sharded
        self._deferred_evaluations: list = []
        self._training_started = False
        self.skipped_steps = 0
        self._sample_ids = None
        self._earlier_logs: list[dict] = []
        self.add_callback(CarryEarlierLogs(self))
        self.add_callback(LogFirstAndLastStep())

    def train(self, *args, **kwargs):
        self._earlier_logs = list(self.state.log_history)  # e.g. the evaluation before training
        warn_if_warmup_outlasts_the_run(self.args, self.planned_steps())
        try:
            return super().train(*args, **kwargs)
        except Exception as error:
            resumed = kwargs.get("resume_from_checkpoint") or (args[0] if args else None)
            if resumed is None:
                raise
            # a weights-only load refused a checkpoint file that holds more than tensors: unpickling could run code
            if type(error).__name__ == "UnpicklingError":
                raise UserError(f"{resumed}: a file of this checkpoint holds pickled objects other than tensors and "
                                "was refused (unpickling can run code); resume from a checkpoint you wrote, or start "
                                "afresh") from error
            if type(error).__name__ == "SafetensorError":
                raise UserError(f"{resumed}: a weights file of this checkpoint cannot be read ({error}): it is "
                                "truncated or corrupt; resume from another checkpoint") from error
            raise

    # --- data
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and getattr(dataset, "lengths", None):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(dataset.lengths, self.args.per_device_train_batch_size, seed)
        return super()._get_train_sampler(train_dataset)

    # --- optimizer: one learning rate per part
    def create_optimizer(self, model=None):
        """The Trainer's AdamW (decay / no-decay groups), with the vision tower's and the projector's parameters in
        groups of their own when --vision_lr / --projector_lr is set. The schedule scales every group alike."""
        rates = {part: getattr(self.args, f"{part}_lr", None) for part in ("vision", "projector")}
        if self.optimizer is None and any(rate is not None for rate in rates.values()):
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[float, float], list] = {}
            for name, param in opt_model.named_parameters():
                if param.requires_grad:
                    rate = rates.get(part_of(name))
                    key = (self.args.learning_rate if rate is None else rate,
                           self.args.weight_decay if name in decay else 0.0)
                    groups.setdefault(key, []).append(param)
            for part, rate in rates.items():
                if rate is not None and not any(p.requires_grad and part_of(n) == part
                                                for n, p in opt_model.named_parameters()):
                    raise UserError(f"--{part}_lr {rate:g} applies to no parameter: the {part} part does not train")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls([{"params": params, "lr": lr, "weight_decay": wd}
                                            for (lr, wd), params in groups.items()], **optimizer_kwargs)
        return super().create_optimizer(model)

    # --- loss with health checks
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._sample_ids = inputs.pop("sample_ids", None)
        inputs.pop("references", None)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if not torch.isfinite(loss).all():
            loss = self._non_finite(f"loss {loss.item()}", model)
            result = (loss, *result[1:]) if return_outputs else loss
        return result

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        scaler_handles_it = self.args.fp16 and not self.is_deepspeed_enabled  # GradScaler skips inf steps itself
        if grad_norm is not None and not math.isfinite(float(grad_norm)) and not scaler_handles_it:
            # under DeepSpeed the gradients live inside its engine, out of our reach: stop instead of skipping
            self._non_finite(f"gradient norm {float(grad_norm)}", model, may_skip=not self.is_deepspeed_enabled)
            model.zero_grad(set_to_none=True)  # skipped: AdamW leaves parameters without gradients untouched
        return grad_norm

    def _non_finite(self, what: str, model, may_skip: bool = True) -> torch.Tensor:
        """Stop with the step, the samples and the last good checkpoint; or, with --skip_nonfinite_steps, count
        and log it and return a zero loss."""
        step = self.state.global_step + 1
        last = [str(p) for p in checkpoints(self.args.output_dir) if is_complete(p)]
        where = f"at step {step} (samples {self._sample_ids})"
        if not (may_skip and getattr(self.args, "skip_nonfinite_steps", False)):
            raise NonFiniteError(
                f"non-finite {what} {where}. Last good checkpoint: {last[-1] if last else 'none yet'}. "
                "Check those samples, lower --learning_rate, prefer --bf16 to fp16, or pass --skip_nonfinite_steps "
                "to skip such steps and go on."
            )
        self.skipped_steps += 1
        logger.warning(f"skipping non-finite {what} {where} ({self.skipped_steps} skipped so far)")
        # a zero that still reaches every trainable parameter, so DDP sees the usual gradients
        return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0

    # --- evaluation by generation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Generate an answer for every prompt, score it with the task metric, log and return the metrics.

        Runs under autocast in the training precision, with as many prompts per generate() call as the KV-cache
        budget allows (--eval_kv_cache_gb; --eval_batch_size overrides). Under FSDP, an evaluation asked for before
        training runs at the start of train() instead, once the model is sharded (until then, with
        cpu_ram_efficient_loading, ranks > 0 hold no weights); its metrics are in `deferred_metrics`.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.is_fsdp_enabled and not self._training_started:
            logger.info(f"FSDP: {metric_key_prefix} runs at the start of training, once the model is sharded")
            self._deferred_evaluations.append((dataset, metric_key_prefix))
            return {}
        start = time.time()
        model = self.model
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and \
                next(model.parameters()).device != self.args.device:
            model.to(self.args.device)
        zero3 = is_deepspeed_zero3_enabled()
        gathered = contextlib.nullcontext()
        if zero3 and self.deepspeed is None:
            # ZeRO-3 before training: the weights are partitioned and DeepSpeed's gathering hooks come with the
            # engine, which train() builds; gather each module's weights around its forward instead.
            gathered = gathered_per_module(model)
        autocast_dtype = precision_dtype(self.args)
        batch_size = self.generation_batch_size or self.eval_batch_size_for(dataset, model, autocast_dtype)
        with gathered:
            predictions = generate_predictions(
                model, dataset, batch_size=batch_size, max_new_tokens=self.max_new_tokens,
                num_workers=self.args.dataloader_num_workers, score_token_ids=self.score_token_ids,
                desc=metric_key_prefix, disable_tqdm=self.args.disable_tqdm,
                synced_gpus=(zero3 or self.is_fsdp_enabled) and self.args.world_size > 1,
                autocast_dtype=autocast_dtype,
            )
            loss = None
            if getattr(self.args, "compute_eval_loss", False):  # teacher-forced, one forward pass per batch
                loss = evaluation_loss(model, dataset, self.args.per_device_eval_batch_size,
                                       self.args.dataloader_num_workers, autocast_dtype)
        metrics = {}
        if predictions is not None:  # rank 0
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.task_metric(predictions).items()}
            if loss is not None:
                metrics[f"{metric_key_prefix}_loss"] = loss
            metrics[f"{metric_key_prefix}_samples"] = len(predictions)
            metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 2)
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.args.output_dir) / f"{metric_key_prefix}.json", "w") as f:
                json.dump({"metrics": metrics, "predictions": predictions}, f, indent=1, ensure_ascii=False)
        if dist.is_available() and dist.is_initialized():
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def eval_batch_size_for(self, dataset, model, autocast_dtype: torch.dtype | None) -> int:
        """Prompts per generate() call: the longest prompt's KV cache (+ max_new_tokens) times the batch fits the
        budget (the same on every rank: the lengths are the whole dataset's, the budget the smallest rank's)."""
        config = getattr(model, "config", None) or self.model.config
        dtype = autocast_dtype or next(model.parameters()).dtype
        budget = kv_cache_budget_bytes(self.args.device, getattr(self.args, "eval_kv_cache_gb", None))
        if dist.is_available() and dist.is_initialized():
            shared = [None] * dist.get_world_size()
            dist.all_gather_object(shared, budget)
            budget = min(shared)
        longest = max(prompt_lengths(dataset), default=1)
        size = eval_batch_size(config, longest, self.max_new_tokens, dtype, budget)
        logger.info(f"evaluation batch {size} prompts per process: KV cache of {longest} + {self.max_new_tokens} "
                    f"tokens in {str(dtype).removeprefix('torch.')} within {budget / 2**30:.1f} GiB "
                    "(--eval_kv_cache_gb; --eval_batch_size to override)")
        return size

    # --- checkpoints
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
            self.save_run_record(staged)  # its mode and frozen parts, which a resume must match (phi3v.args)
            mark_complete(staged, self.state.global_step)
            move_into_place(staged, run_dir / name)
            with contextlib.suppress(OSError):  # only when empty: other ranks' parts would be in it
                (run_dir / STAGING).rmdir()
            if self.state.best_global_step and (run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
                                                ).is_dir():
                self.state.best_model_checkpoint = str(run_dir / f"{PREFIX_CHECKPOINT_DIR}-"
                                                                 f"{self.state.best_global_step}")
            rotate(run_dir, limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()  # no rank goes on before the checkpoint is in place

    # --- outputs in the official layout, and the Hub
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """save_pretrained, plus what vLLM and transformers 4.x need (phi3v.serving) in every model directory:
        the final output and each checkpoint of the full modes (a LoRA output is an adapter; its merge is)."""
        super()._save(output_dir, state_dict)
        if self.args.should_save and not isinstance(self.model, PeftModel):
            base = self.model.config._name_or_path
            try:
                complete_layout(output_dir or self.args.output_dir, base)
            except UserError as error:  # never lose a run over it: point auto_map at the hub's code instead
                logger.warning(f"{error} Writing auto_map references to the code on the Hub instead.")
                complete_layout(output_dir or self.args.output_dir, base, remote_code_files=False)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # --push_to_hub uploads once, at the end of the run (reporting.finish), with the evaluation in the card
        super().save_model(output_dir, _internal_call=True)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """--push_to_hub: create the repo now, so that a missing login fails before training, not after it."""
        self.hub_model_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.push_in_progress = None
        if self.is_world_process_zero():
            url = hub_api(token or self.args.hub_token).create_repo(
                self.hub_model_id, private=self.args.hub_private_repo if private is None else private, exist_ok=True)
            self.hub_model_id = getattr(url, "repo_id", self.hub_model_id)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        pass  # checkpoints stay local: the repo gets the final model in the serving layout

    def save_run_record(self, folder: Path) -> dict:
        """run_info.json: base model, mode, frozen parts, data flags and command line (phi3v.args.run_record)."""
        record = dict(getattr(self.args, "run_record", None) or {})
        (folder / RUN_INFO).write_text(json.dumps(record, indent=1, default=str) + "\n")
        return record

    def write_run_info(self) -> Path | None:
        """run_info.json in the output directory, and the model card (README.md) of the run's servable model:
        the output directory (full modes) or OUTPUT_DIR/merged (LoRA, once merged). Returns that directory."""
        out = Path(self.args.output_dir)
        record = self.save_run_record(out)
        lora = isinstance(self.model, PeftModel)
        model_dir = out / "merged" if lora else out
        if not (model_dir / "config.json").is_file():
            return None
        _, metrics = read_run(out)
        data = {**record.get("data", {}), "train examples": len(self.train_dataset or [])}
        if self.eval_dataset is not None:
            data["evaluation examples"] = len(self.eval_dataset)
        mode = record.get("mode", "?") + (", adapter merged into the base" if lora else "")
        base = record.get("base_model") or self.model.config._name_or_path
        (model_dir / "README.md").write_text(model_card(base, mode, data, metrics, [record.get("command", "")]))
        if lora and (out / "all_results.json").is_file():
            shutil.copy2(out / "all_results.json", model_dir / "all_results.json")
        return model_dir

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Upload the run's model in the layout of `python -m phi3v.export` (LoRA: the adapter merged into the base,
        in bf16, as OUTPUT_DIR/merged), with its model card. Only the model files go up (phi3v.serving.push_folder)."""
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:
            self.init_hf_repo(token, private)
        model_dir = self.write_run_info()
        if model_dir is None:  # LoRA without --save_merged_model
            from phi3v.export import export_merged

            export_merged(self.args.output_dir, Path(self.args.output_dir) / "merged")
            model_dir = self.write_run_info()
        private = self.args.hub_private_repo if private is None else private
        return push_folder(model_dir, self.hub_model_id, private, token or self.args.hub_token,
                           commit_message or "End of training")

    def planned_steps(self) -> int:
        """Optimizer steps this run will make in total (as Trainer computes them)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        batches = len(self.get_train_dataloader())
        per_epoch = max(batches // self.args.gradient_accumulation_steps
                        + int(batches % self.args.gradient_accumulation_steps > 0), 1)
        return math.ceil(self.args.num_train_epochs * per_epoch)


def prepare_resume(trainer: Phi3VTrainer, requested: str | None) -> str | None:
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
        raise BadValue(
            f"{checkpoint} is step {state['global_step']} of a run of {planned} steps: that run is finished and "
            "there is nothing to resume. Start a new run (another --output_dir, or no --resume_from_checkpoint), "
            "or raise --num_train_epochs / --max_steps to train further."
        )
    logger.warning(f"resuming from {checkpoint}: step {state['global_step']} of {planned} "
                   f"(epoch {state.get('epoch', 0):.2f}); optimizer, scheduler, RNG and data order are restored")
    return checkpoint


def clear_staging(output_dir: str | Path) -> None:
    """Remove what an interrupted save left in OUTPUT_DIR/.saving (only ever written by this recipe)."""
    staging = Path(output_dir) / STAGING
    if staging.is_dir():
        for leftover in sorted(staging.iterdir()):
            logger.warning(f"removing {leftover}: left incomplete by an interrupted save")
        shutil.rmtree(staging, ignore_errors=True)
    for leftover in Path(output_dir).glob(f"{STAGING}-replaced-*"):
        shutil.rmtree(leftover, ignore_errors=True)
