"""The image embedding: CLIP features of the real crops, 2x2-merged, laid out with the separators, projected."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel

from phi3v.models.phi3_v.configuration import Phi3VConfig


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """(crops, side*side, C) patch features -> (crops, side/2, side/2, 4C), channels [(0,0),(0,1),(1,0),(1,1)]."""
    crops, patches, channels = features.shape
    side = int(patches**0.5)
    half = side // 2
    return (
        features.reshape(crops, half, 2, half, 2, channels)  # (crops, row, dy, col, dx, C)
        .permute(0, 1, 3, 2, 4, 5)  # (crops, row, col, dy, dx, C)
        .reshape(crops, half, half, 4 * channels)
    )


def with_newlines(grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """(rows, cols, D) -> (rows * (cols + 1), D): a `newline` vector after every row, flattened row-major."""
    rows = grid.shape[0]
    return torch.cat([grid, newline.reshape(1, 1, -1).expand(rows, 1, -1).to(grid.dtype)], dim=1).flatten(0, 1)


class Phi3VImageEmbedding(nn.Module):
    """CLIP features of the real crops -> separators -> projector: one row per image placeholder token."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision = config.vision_config
        self.img_processor = nn.Module()  # the CLIP tower under its official name, img_processor.vision_model
        self.img_processor.vision_model = CLIPVisionModel(vision)
        dim = 4 * config.img_processor.get("image_dim_out", vision.hidden_size)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))  # once per image, between sub grid and global view
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))  # after every row of both grids
        self.img_projection = nn.Sequential(nn.Linear(dim, config.hidden_size), nn.GELU(),
                                            nn.Linear(config.hidden_size, config.hidden_size))
        layer_idx = config.img_processor.get("layer_idx", -2)  # index into CLIP's hidden_states (0 = embeddings)
        self.num_layers_used = vision.num_hidden_layers + 1 + layer_idx if layer_idx < 0 else layer_idx
        self.crop_size = vision.image_size

    def unused_parameters(self) -> list[nn.Parameter]:
        """CLIP layers after the feature layer and post_layernorm: in the checkpoint, never in the computation."""
        clip = self.img_processor.vision_model
        return [*clip.post_layernorm.parameters(), *clip.encoder.layers[self.num_layers_used:].parameters()]

    def clip_features(self, crops: torch.Tensor) -> torch.Tensor:
        """(crops, 3, 336, 336) -> (crops, 576, C): hidden state after `num_layers_used` layers, CLS dropped."""
        clip = self.img_processor.vision_model
        hidden = clip.pre_layrnorm(clip.embeddings(crops))
        for layer in clip.encoder.layers[: self.num_layers_used]:
            hidden = layer(hidden, attention_mask=None)
        return hidden[:, 1:]

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """(N, num_crops+1, 3, 336, 336), (N, 2) padded (H, W) -> (total image tokens, hidden)."""
        grids = [(int(h) // self.crop_size, int(w) // self.crop_size) for h, w in image_sizes.tolist()]
        # CLIP runs on the global view and the real crops of each image, never on the zero padding crops.
        per_image = pixel_values.shape[1]
        index = [i * per_image + j for i, (rows, cols) in enumerate(grids) for j in range(1 + rows * cols)]
        crops = pixel_values.flatten(0, 1)[torch.tensor(index, device=pixel_values.device)]
        merged = merge_2x2(self.clip_features(crops))  # (crops, 12, 12, 4C)
        side = merged.shape[1]
        pieces, start = [], 0
        for rows, cols in grids:
            glb, sub = merged[start], merged[start + 1 : start + 1 + rows * cols]
            start += 1 + rows * cols
            # crop k sits at (k // cols, k % cols): interleave into one (12 rows, 12 cols) picture
            sub = sub.reshape(rows, cols, side, side, -1).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, -1)
            pieces += [with_newlines(sub, self.sub_GN), self.glb_GN.reshape(1, -1).to(sub.dtype),
                       with_newlines(glb, self.sub_GN)]
        features = torch.cat(pieces)
        return self.img_projection(features.to(self.glb_GN.dtype))
