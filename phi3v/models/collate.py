"""The half of every family's collator that is the same: ConversationDataset items of any length -> padded text.

`input_ids` and `labels` (-100) padded to (B, max L), right for training and left for generation; `attention_mask`
from the true lengths (never from `ids != pad`: the pad id is also the supervised <|endoftext|>); `sample_ids`,
`references`. A family's collator adds its image tensors in `images(examples)`.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from phi3v.models.family import IGNORE_INDEX


class Collator:
    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def pad(self, sequences: list[torch.Tensor], value: int) -> torch.Tensor:
        return pad_sequence(sequences, batch_first=True, padding_value=value, padding_side=self.padding_side)

    def images(self, examples: list[dict]) -> dict:
        """The image tensors of the batch, every image in example order (the family's model input names)."""
        raise NotImplementedError

    def __call__(self, examples: list[dict]) -> dict:
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": self.pad(ids, self.pad_token_id),
            "attention_mask": self.pad([torch.ones(len(i), dtype=torch.long) for i in ids], 0),
        }
        if "labels" in examples[0]:
            batch["labels"] = self.pad([e["labels"] for e in examples], IGNORE_INDEX)
        batch.update(self.images(examples))
        batch["sample_ids"] = [e["sample_id"] for e in examples]
        if "reference" in examples[0]:
            batch["references"] = [e["reference"] for e in examples]
        return batch
