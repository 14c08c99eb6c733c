"""Batched greedy generation over an evaluation set sharded across processes (every world_size-th prompt, in
left-padded batches), gathered on rank 0 in the original order. The metric is the script's business."""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from phi3v.common.distributed import gather_to_rank_zero, world
from phi3v.data.dataset import ConversationDataset

# ------------------------------------------------------------------------------------------------- batch size

MAX_EVAL_BATCH = 64  # beyond this a larger batch buys little speed and delays the first answers
CPU_KV_BUDGET_GB = 2.0


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys + values of one token across all decoder layers: 2 x layers x kv heads x head dim x element size
    (Phi-3.5-vision in bf16: 384 KiB; ~0.94 GiB for a 2,500-token DocVQA prompt + 64 new tokens)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = config.num_key_value_heads or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def kv_cache_budget_bytes(device: torch.device, budget_gb: float | None = None) -> int:
    """`budget_gb` if given; else on a GPU 40% of its free memory now (after weights and optimizer states: the rest
    is for the prefill's activations and the allocator's slack), on CPU 2 GB."""
    if budget_gb is None and device.type == "cuda":
        return int(0.4 * torch.cuda.mem_get_info(device)[0])  # (free, total)
    return int((CPU_KV_BUDGET_GB if budget_gb is None else budget_gb) * 2**30)


def eval_batch_size(config, longest_prompt: int, max_new_tokens: int, dtype: torch.dtype, budget_bytes: int) -> int:
    """Prompts per generate() call whose KV cache (the longest prompt + max_new_tokens, padded) fits the budget;
    at least 1, at most MAX_EVAL_BATCH."""
    per_prompt = kv_cache_bytes_per_token(config, dtype) * (longest_prompt + max_new_tokens)
    return int(max(1, min(MAX_EVAL_BATCH, budget_bytes // per_prompt)))


def prompt_lengths(dataset: ConversationDataset) -> list[int]:
    """Token counts of the prompts: from validation when it ran, else from image headers and text (no decoding)."""
    if dataset.lengths is not None and len(dataset.lengths) == len(dataset):
        return list(dataset.lengths)
    return [dataset.num_tokens(i) for i in range(len(dataset))]


# ------------------------------------------------------------------------------------------------- ZeRO-3


@contextlib.contextmanager
def gathered_per_module(model: torch.nn.Module):
    """ZeRO-3 weights outside the DeepSpeed engine (the evaluation before training): each module's own parameters
    are gathered just before its forward and released after it, so at most one layer is whole at a time (the whole
    model would need its full size on every GPU). Every rank must run the same modules (synced_gpus=True)."""
    import deepspeed

    handles, open_contexts = [], {}

    def gather(module, args):  # hooked only on modules with parameters of their own
        context = deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)))
        context.__enter__()
        open_contexts.setdefault(id(module), []).append(context)

    def release(module, args, output):
        open_contexts[id(module)].pop().__exit__(None, None, None)

    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles += [module.register_forward_pre_hook(gather), module.register_forward_hook(release)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in open_contexts.values():  # an exception inside a forward: release what it left gathered
            while stack:
                stack.pop().__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------- generation


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for generation in the training precision: bf16/fp16 matmuls and a bf16/fp16 KV cache even
    when the weights are fp32 master weights (half the cache, several times the speed on GPUs)."""
    if dtype is None or dtype == torch.float32 or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class RepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """transformers' repetition penalty, which indexes the scores with every input id and fails on the image
    placeholders (negative ids): they are replaced by the row's largest id, a text token already in the row, so the
    result is that of penalizing the text tokens alone."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        text_ids = torch.where(input_ids < 0, input_ids.max(dim=1, keepdim=True).values, input_ids)
        return super().__call__(text_ids, scores)


def decoding(settings: dict | None) -> dict:
    """generate() arguments for decoding settings: greedy by default, repetition_penalty made placeholder-safe."""
    settings = {"do_sample": False, **(settings or {})}
    penalty = settings.pop("repetition_penalty", None)
    if penalty is not None and penalty != 1.0:
        settings["logits_processor"] = LogitsProcessorList([RepetitionPenalty(penalty)])
    return settings


@torch.no_grad()
def generate_predictions(model, dataset: ConversationDataset, batch_size: int = 8, max_new_tokens: int = 64,
                         num_workers: int = 0, score_token_ids: list[int] | None = None, desc: str = "evaluating",
                         disable_tqdm: bool = False, synced_gpus: bool = False,
                         autocast_dtype: torch.dtype | None = None,
                         generation_kwargs: dict | None = None) -> list[dict] | None:
    """Answers (greedy unless `generation_kwargs` say otherwise) for every prompt of `dataset` (for generation).

    Args:
        generation_kwargs: other decoding settings for `generate` (do_sample, temperature, num_beams, ...).
        score_token_ids: also return the softmax probabilities of these token ids at the first generated position.
        synced_gpus: ZeRO-3 and FSDP: every rank runs as many forward passes as the others.
        autocast_dtype: run under torch.autocast in this dtype (the training precision); None: the weights' dtype.
    Returns:
        On rank 0, a list of {"index", "id", "prediction", "reference"[, "scores"]} in dataset order; else None.
    """
    rank, size = world()
    processor = dataset.processor
    # Equal shards (the last index repeated) keep every rank in step, which ZeRO-3 generation requires.
    indices = list(range(len(dataset)))
    indices += indices[-1:] * (-len(indices) % size)
    shard = indices[rank::size]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=processor.collator(padding_side="left"))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    end_ids = processor.end_token_ids()
    results = []
    for batch in tqdm(loader, desc=desc, disable=disable_tqdm or rank != 0):
        inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(device, autocast_dtype):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True,
                                 eos_token_id=end_ids, pad_token_id=processor.tokenizer.pad_token_id,
                                 output_scores=score_token_ids is not None, return_dict_in_generate=True,
                                 synced_gpus=synced_gpus, **decoding(generation_kwargs))
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
        texts = processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        probs = out.scores[0].float().softmax(-1)[:, score_token_ids].tolist() if score_token_ids else None
        for row, text in enumerate(texts):
            item = {"index": shard[len(results)], "id": batch["sample_ids"][row], "prediction": text,
                    "reference": batch["references"][row]}
            if probs is not None:
                item["scores"] = probs[row]
            results.append(item)
    model.train(was_training)
    gathered = gather_to_rank_zero(results)
    if gathered is None:
        return None
    unique = {item["index"]: item for item in gathered}  # drop the repeated padding prompts
    return [unique[i] for i in sorted(unique)]
