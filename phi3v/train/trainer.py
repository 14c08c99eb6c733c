"""The Trainer the four recipes share: length-grouped batches, one learning rate per part, and a stop (or skip) on
NaN/inf with the culprits named. Its collaborators, one module each: evaluation (generation-based `evaluate`),
checkpoints (complete-or-ignored checkpoints, resume), publishing (serving layout, model card, Hub upload).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from transformers import Trainer, TrainerCallback

from phi3v.common.errors import UserError
from phi3v.train.checkpoints import CheckpointsMixin, checkpoints, is_complete
from phi3v.train.evaluation import EvaluationMixin
from phi3v.train.loading import model_family
from phi3v.train.publishing import PublishingMixin
from phi3v.train.sampler import LengthGroupedSampler

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


class CarryEarlierLogs(TrainerCallback):
    """Keep what was logged before train() (the evaluation before training) in the fresh TrainerState's history;
    under FSDP, run that evaluation now, on the sharded model (see Phi3VTrainer.evaluate)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        state.log_history[:0] = [entry for entry in self.trainer._earlier_logs if entry not in state.log_history]
        self.trainer._training_started = True
        deferred, self.trainer._deferred_evaluations = self.trainer._deferred_evaluations, []
        for dataset, prefix in deferred:
            self.trainer.deferred_metrics.update(self.trainer.evaluate(dataset, metric_key_prefix=prefix))


class LogFirstAndLastStep(TrainerCallback):
    """Loss and learning rate logged at the first and the last step too: a short run still gets its curves."""

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


class Phi3VTrainer(EvaluationMixin, CheckpointsMixin, PublishingMixin, Trainer):
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
            part_of = model_family(opt_model).part_of
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
            raise NonFiniteError(f"non-finite {what} {where}. Last good checkpoint: "
                                 f"{last[-1] if last else 'none yet'}. Check those samples, lower --learning_rate, "
                                 "prefer --bf16 to fp16, or pass --skip_nonfinite_steps to skip such steps and go on.")
        self.skipped_steps += 1
        logger.warning(f"skipping non-finite {what} {where} ({self.skipped_steps} skipped so far)")
        # a zero that still reaches every trainable parameter, so DDP sees the usual gradients
        return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0

    def planned_steps(self) -> int:
        """Optimizer steps this run will make in total (as Trainer computes them)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        per_epoch = max(math.ceil(len(self.get_train_dataloader()) / self.args.gradient_accumulation_steps), 1)
        return math.ceil(self.args.num_train_epochs * per_epoch)
