"""Batch examples of any length and any number of images (zero included).

Input: ConversationDataset items (`input_ids` (L,), `labels`?, `pixel_values` (n, crops, 3, 336, 336) or None,
`image_sizes` (n, 2) or None, `sample_id`, `reference`?). Output: `input_ids` and `labels` (-100) padded to (B, max L),
right for training and left for generation; `attention_mask` from the true lengths (the pad id is also the supervised
<|endoftext|>); every image of the batch in example order, as the model fills the placeholders; `sample_ids`,
`references`.
"""

from __future__ import annotations

import torch

from phi3v.models.family import IGNORE_INDEX
from phi3v.models.phi3_v.image_processing import CROP


class Phi3VCollator:
    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def pad(self, sequences: list[torch.Tensor], value: int) -> torch.Tensor:
        length = max(len(s) for s in sequences)
        batch = torch.full((len(sequences), length), value, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if self.padding_side == "right":
                batch[row, : len(sequence)] = sequence
            else:
                batch[row, length - len(sequence):] = sequence
        return batch

    def __call__(self, examples: list[dict]) -> dict:
        ids = [e["input_ids"] for e in examples]
        batch = {"input_ids": self.pad(ids, self.pad_token_id),
                 "attention_mask": self.pad([torch.ones(len(i), dtype=torch.long) for i in ids], 0)}
        if "labels" in examples[0]:
            batch["labels"] = self.pad([e["labels"] for e in examples], IGNORE_INDEX)
        with_images = [e for e in examples if e.get("pixel_values") is not None]
        if with_images:
            sizes = torch.cat([e["image_sizes"] for e in with_images])
            # crops beyond the largest real grid in the batch are zero padding the model never reads: drop them
            crops = 1 + int(((sizes[:, 0] // CROP) * (sizes[:, 1] // CROP)).max())
            batch["pixel_values"] = torch.cat([e["pixel_values"][:, :crops] for e in with_images])
            batch["image_sizes"] = sizes
        batch["sample_ids"] = [e["sample_id"] for e in examples]
        if "reference" in examples[0]:
            batch["references"] = [e["reference"] for e in examples]
        return batch
