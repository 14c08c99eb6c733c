"""Batched greedy generation over an evaluation set sharded across processes, gathered on rank 0.

Each process takes every world_size-th prompt, generates in left-padded batches with the KV cache, and rank 0
collects {index, id, prediction, reference[, scores]} for all prompts in the original order. Used by all four
recipes; the metric is the script's business.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from phi3v.collator import Phi3VCollator
from phi3v.data import ConversationDataset

logger = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_to_rank_zero(items: list) -> list | None:
    rank, size = world()
    if size == 1:
        return items
    gathered = [None] * size if rank == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if rank == 0 else None


@torch.no_grad()
def generate_predictions(model, dataset: ConversationDataset, batch_size: int = 8, max_new_tokens: int = 64,
                         num_workers: int = 0, score_token_ids: list[int] | None = None, desc: str = "evaluating",
                         disable_tqdm: bool = False, synced_gpus: bool = False) -> list[dict] | None:
    """Greedy answers for every prompt of `dataset` (built with for_generation=True).

    Args:
        score_token_ids: also return, per prompt, the softmax probabilities of these token ids at the first
            generated position (e.g. "yes"/"no" for ROC AUC).
        synced_gpus: DeepSpeed ZeRO-3: all ranks must run the same number of forward passes.
    Returns:
        On rank 0, a list of {"index", "id", "prediction", "reference"[, "scores"]} in dataset order; else None.
    """
    rank, size = world()
    processor = dataset.processor
    # Equal shards (the last index repeated) keep every rank in step, which ZeRO-3 generation requires.
    indices = list(range(len(dataset)))
    indices += indices[-1:] * (-len(indices) % size) if indices else []
    shard = indices[rank::size]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=batch_size, num_workers=num_workers,
        collate_fn=Phi3VCollator(processor.tokenizer.pad_token_id, padding_side="left"),
    )
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    end_ids = processor.end_token_ids()
    results, position = [], 0
    for batch in tqdm(loader, desc=desc, disable=disable_tqdm or rank != 0):
        inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             eos_token_id=end_ids, pad_token_id=processor.tokenizer.pad_token_id,
                             output_scores=score_token_ids is not None, return_dict_in_generate=True,
                             synced_gpus=synced_gpus)
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
        texts = processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        probs = out.scores[0].float().softmax(-1)[:, score_token_ids].tolist() if score_token_ids else None
        for row, text in enumerate(texts):
            item = {"index": shard[position], "id": batch["sample_ids"][row], "prediction": text,
                    "reference": batch["references"][row]}
            if probs is not None:
                item["scores"] = probs[row]
            results.append(item)
            position += 1
    model.train(was_training)
    gathered = gather_to_rank_zero(results)
    if gathered is None:
        return None
    unique = {item["index"]: item for item in gathered}  # drop the repeated padding prompts
    return [unique[i] for i in sorted(unique)]
