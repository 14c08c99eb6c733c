"""Evaluation by generation: every prompt answered in batches sized by the KV-cache budget, then scored by the
task metric."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers.integrations import is_deepspeed_zero3_enabled

from phi3v.eval.generation import (
    eval_batch_size,
    gathered_per_module,
    generate_predictions,
    kv_cache_budget_bytes,
    prompt_lengths,
)
from phi3v.eval.loss import evaluation_loss
from phi3v.train.loading import precision_dtype

logger = logging.getLogger(__name__)


class EvaluationMixin:
    """Phi3VTrainer's `evaluate`: generated answers, the task metric and the evaluation loss."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Generate an answer for every prompt, score it with the task metric, log and return the metrics. Under
        FSDP, an evaluation before training runs at the start of train() instead, once the model is sharded (until then
        ranks > 0 may hold no weights); its metrics are in `deferred_metrics`."""
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
        # ZeRO-3 before training: no engine yet to gather the weights; each module's, around its forward
        gathered = gathered_per_module(model) if zero3 and self.deepspeed is None else contextlib.nullcontext()
        autocast_dtype = precision_dtype(self.args)
        batch_size = self.generation_batch_size or self.eval_batch_size_for(dataset, model, autocast_dtype)
        with gathered:
            predictions = generate_predictions(model, dataset, batch_size, self.max_new_tokens,
                                               self.args.dataloader_num_workers, self.score_token_ids,
                                               metric_key_prefix, self.args.disable_tqdm,
                                               (zero3 or self.is_fsdp_enabled) and self.args.world_size > 1,
                                               autocast_dtype)
            loss = None
            if getattr(self.args, "compute_eval_loss", False):  # teacher-forced, one forward pass per batch
                loss = evaluation_loss(model, dataset, self.args.per_device_eval_batch_size,
                                       self.args.dataloader_num_workers, autocast_dtype)
        metrics = {}
        if predictions is not None:  # rank 0
            results = {**self.task_metric(predictions), **({} if loss is None else {"loss": loss}),
                       "samples": len(predictions), "runtime": round(time.time() - start, 2)}
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in results.items()}
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
        dtype = autocast_dtype or next(model.parameters()).dtype
        budget = kv_cache_budget_bytes(self.args.device, getattr(self.args, "eval_kv_cache_gb", None))
        if dist.is_available() and dist.is_initialized():
            shared = [None] * dist.get_world_size()
            dist.all_gather_object(shared, budget)
            budget = min(shared)
        longest = max(prompt_lengths(dataset), default=1)
        size = eval_batch_size(model.config, longest, self.max_new_tokens, dtype, budget)
        logger.info(f"evaluation batch {size} prompts per process: KV cache of {longest} + {self.max_new_tokens} "
                    f"tokens in {str(dtype).removeprefix('torch.')} within {budget / 2**30:.1f} GiB "
                    "(--eval_kv_cache_gb; --eval_batch_size to override)")
        return size
