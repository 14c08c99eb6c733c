"""ConversationDataset: items of any source turned into model inputs on access, in DataLoader workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from phi3v.data.conversation import Conversation, Problem, labels_from_spans, render
from phi3v.data.images import image_size, open_image

TEXT_KEYS = ("input_ids", "attention_mask", "offset_mapping")


class ConversationDataset(torch.utils.data.Dataset):
    """Items (jsonl records, hub rows, ...) made model inputs on access, decoded and processed in DataLoader workers.

    Args:
        items: any sequence; `to_conversation(item)` makes a Conversation of it (and raises ValueError on bad data).
            Both must pickle (module-level functions, functools.partial) where DataLoader workers are spawned.
        where: names of the items for messages, e.g. "ucf101_train.jsonl:12" (default "item 0", "item 1", ...).
        for_generation: examples are prompts (last answer removed) with a `reference` answer, for evaluation.
        load_problems: problems found while reading the source (e.g. malformed jsonl lines), reported by validation.
        sources: the files the items come from (they key the validation cache).
    """

    def __init__(self, items: Sequence, to_conversation: Callable[[object], Conversation], processor,
                 where: list[str] | None = None, for_generation: bool = False, max_image_pixels: int | None = None,
                 load_problems: list[Problem] | None = None, sources: Sequence[str] = ()):
        self.items = items
        self.to_conversation = to_conversation
        self.processor = processor
        self.names = where if where is not None else [f"item {i}" for i in range(len(items))]
        self.for_generation = for_generation
        self.max_image_pixels = max_image_pixels
        self.load_problems = load_problems or []
        self.lengths: list[int] | None = None  # token counts, set by validation
        self.sources = list(sources)

    def __len__(self) -> int:
        return len(self.items)

    def where(self, index: int) -> str:
        return self.names[index]

    def conversation(self, index: int) -> Conversation:
        return self.to_conversation(self.items[index])

    def subset(self, indices: Sequence[int]) -> ConversationDataset:
        return ConversationDataset([self.items[i] for i in indices], self.to_conversation, self.processor,
                                   [self.names[i] for i in indices], self.for_generation, self.max_image_pixels)

    def num_tokens(self, index: int) -> int:
        """Sequence length of item `index` from image headers and text alone (no pixels decoded)."""
        text, images, _ = render(self.processor, self.conversation(index), self.for_generation)
        return self.processor.num_tokens(text, [image_size(ref) for ref in images])

    def __getitem__(self, index: int) -> dict:
        conversation = self.conversation(index)
        text, refs, spans = render(self.processor, conversation, self.for_generation)
        images = [open_image(ref, self.max_image_pixels) for ref in refs]
        encoded = self.processor(text, images or None, return_offsets_mapping=True)
        example = {"input_ids": encoded["input_ids"][0], "sample_id": conversation.id}
        example.update((key, value) for key, value in encoded.items() if key not in TEXT_KEYS)  # the image tensors
        if self.for_generation:
            example["reference"] = conversation.turns[-1].assistant
        else:
            labels = labels_from_spans(encoded["input_ids"][0].tolist(), encoded["offset_mapping"][0].tolist(), spans)
            example["labels"] = torch.tensor(labels, dtype=torch.long)
        return example
