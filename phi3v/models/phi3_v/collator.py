"""Batch examples of any length and any number of images (zero included).

Input: ConversationDataset items (`input_ids` (L,), `labels`?, `pixel_values` (n, crops, 3, 336, 336) or None,
`image_sizes` (n, 2) or None, `sample_id`, `reference`?). Output: `input_ids` and `labels` (-100) padded to (B, max L),
right for training and left for generation; `attention_mask` from the true lengths (the pad id is also the supervised
<|endoftext|>); every image of the batch in example order, as the model fills the placeholders; `sample_ids`,
`references`.
"""

from __future__ import annotations

import torch

from phi3v.models.collate import Collator
from phi3v.models.phi3_v.image_processing import CROP


class Phi3VCollator(Collator):
    def images(self, examples: list[dict]) -> dict:
        with_images = [e for e in examples if e.get("pixel_values") is not None]
        if not with_images:
            return {}
        sizes = torch.cat([e["image_sizes"] for e in with_images])
        # crops beyond the largest real grid in the batch are zero padding the model never reads: drop them
        crops = 1 + int(((sizes[:, 0] // CROP) * (sizes[:, 1] // CROP)).max())
        return {"pixel_values": torch.cat([e["pixel_values"][:, :crops] for e in with_images]), "image_sizes": sizes}
