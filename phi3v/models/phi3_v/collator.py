"""Phi3VCollator: the text as phi3v.models.collate pads it, and every image of the batch in example order, as the
model fills the placeholders: `pixel_values` (n, crops, 3, 336, 336) and `image_sizes` (n, 2) of each example (None
without images), concatenated.
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
