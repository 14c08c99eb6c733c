"""The loss on the evaluation set: the cheap signal every trainer logs, next to the generated-answer metric.

Each evaluation conversation is taken whole with its first reference as the last answer, labelled as in training,
one forward pass per batch. The result is the mean over all answer tokens of the set, the same on every process.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist

from phi3v.common.distributed import world
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.dataset import ConversationDataset
from phi3v.eval.generation import autocast


def with_first_reference(item, to_conversation) -> Conversation:
    """An evaluation conversation with its last answer set to the (first) reference."""
    conversation = to_conversation(item)
    last = conversation.turns[-1]
    answer = last.assistant[0] if isinstance(last.assistant, (list, tuple)) and last.assistant else last.assistant
    return dataclasses.replace(conversation, turns=[*conversation.turns[:-1], Turn(last.user, answer, last.images)])


class LossShard(torch.utils.data.Dataset):
    """This process's share of the training-format examples of an evaluation dataset, padded by repeats (labels all
    -100: not in the loss) to the same length on every process; an example without a usable reference is None."""

    def __init__(self, dataset: ConversationDataset, rank: int, size: int):
        reader = functools.partial(with_first_reference, to_conversation=dataset.to_conversation)
        self.examples = ConversationDataset(dataset.items, reader, dataset.processor, dataset.names,
                                            for_generation=False, max_image_pixels=dataset.max_image_pixels)
        real = list(range(rank, len(dataset), size))
        per_rank = -(-len(dataset) // size)
        self.order = real + (real[-1:] or [0]) * (per_rank - len(real))
        self.real = len(real)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> dict | None:
        try:
            example = self.examples[self.order[position]]
        except (ValueError, OSError):
            return None
        if position >= self.real:
            example["labels"] = torch.full_like(example["labels"], -100)
        return example


def collate_present(collate, examples: list[dict | None]) -> dict | None:
    """`collate` (the processor's collator) over the examples that are there."""
    examples = [e for e in examples if e is not None]
    return collate(examples) if examples else None


@torch.no_grad()
def evaluation_loss(model, dataset: ConversationDataset, batch_size: int, num_workers: int = 0,
                    autocast_dtype: torch.dtype | None = None) -> float | None:
    """Mean next-token loss over every supervised token of `dataset` (built with for_generation=True), sharded
    across processes; None if no example has a usable reference."""
    rank, size = world()
    collate = functools.partial(collate_present, dataset.processor.collator())
    loader = torch.utils.data.DataLoader(LossShard(dataset, rank, size), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, supervised tokens)
    for batch in loader:
        if batch is None:
            continue
        labels = batch["labels"]
        inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(device, autocast_dtype):
            loss_sum = model(**inputs, num_items_in_batch=1).loss  # the sum over the batch's supervised tokens
        tokens = (torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:] != -100).sum()
        total += torch.stack([loss_sum.double(), tokens.to(device, torch.float64)])
    model.train(was_training)
    if size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else None
