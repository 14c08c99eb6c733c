"""Phi4MMProcessor: the seam's processor contract (phi3v.models.family) over transformers' Phi4MultimodalProcessor.

    "<|user|><|image_1|>\\nWhat is this?<|end|><|assistant|>", [448x448 image]
      split at the tags, each chunk tokenized, image k's tag replaced by its run of the image token (id 200010):
      input_ids = [<|user|>, 200010 x 545, \\n, What, is, this, ?, <|end|>, <|assistant|>]

which is exactly what Phi4MultimodalProcessor gives for the text with the tokenizer's image token in place of each
tag. Pixels come from transformers' own image processor: crop 0 is the global 448x448 view, crops 1..h*w the HD
tiles; per image 273 + rows * (cols + 1) tokens for the (rows, cols) grid of 2x2-pooled patches actually covered.
`num_crops` is the image processor's `dynamic_hd` (the largest number of HD tiles per image).
"""

from __future__ import annotations

import math
import os

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from transformers import BatchFeature, Phi4MultimodalImageProcessor, Phi4MultimodalProcessor

from phi3v.models.collate import Collator
from phi3v.models.family import Processor, encode_with_images, load_pretrained

CROP, PATCH = 448, 14  # the image processor's crop and patch sizes; the model's vision config must match them


def image_grid(width: int, height: int, max_crops: int) -> tuple[int, int, int, int]:
    """(cols, rows) of 448-pixel HD tiles and the image's (width, height) once resized into them, as
    Phi4MultimodalImageProcessor.dynamic_preprocess picks them (the rest of the tiles is white padding).

    >>> image_grid(640, 480, 36)
    (2, 2, 896, 672)
    """
    cols, rows = math.ceil(width / CROP), math.ceil(height / CROP)
    if cols * rows > max_crops:  # the tile grid closest in aspect ratio among those of at most max_crops tiles
        sides = range(1, max_crops + 1)
        grids = sorted({(i, j) for i in sides for j in sides if i * j <= max_crops}, key=lambda g: g[0] * g[1])
        # transformers' own choice; the method reads nothing of its instance
        cols, rows = Phi4MultimodalImageProcessor.find_closest_aspect_ratio(None, width / height, grids, width, height,
                                                                             CROP)
    scale_w, scale_h = cols * CROP / width, rows * CROP / height
    if scale_w < scale_h:
        return cols, rows, cols * CROP, int(height * scale_w)
    return cols, rows, int(width * scale_h), rows * CROP


def num_image_tokens(width: int, height: int, max_crops: int) -> int:
    """Image tokens of a width x height image: 256 global + 16 row ends + 1 separator + rows * (cols + 1) for the
    covered patches pooled 2x2 (padding of a whole patch or more is not covered).

    >>> num_image_tokens(448, 448, 36), num_image_tokens(640, 480, 36)
    (545, 1065)
    """
    cols, rows, new_width, new_height = image_grid(width, height, max_crops)
    patches_w = cols * CROP // PATCH - (cols * CROP - new_width) // PATCH
    patches_h = rows * CROP // PATCH - (rows * CROP - new_height) // PATCH
    pooled_w, pooled_h = math.ceil(patches_w / 2), math.ceil(patches_h / 2)
    return 256 + 16 + 1 + pooled_h * (pooled_w + 1)


class Phi4MMCollator(Collator):
    """Examples -> one batch, as Phi4MultimodalProcessor batches them: the text as phi3v.models.collate pads it;
    image_pixel_values (N, crops, 3, 448, 448), image_attention_mask (N, crops, 32, 32), image_sizes (N, 2) of every
    image in order, crops padded to the batch's largest image with pixels 0 / mask 1."""

    def images(self, examples: list[dict]) -> dict:
        with_images = [e for e in examples if e.get("image_pixel_values") is not None]
        if not with_images:
            return {}
        pixels = [image for e in with_images for image in e["image_pixel_values"]]
        masks = [image for e in with_images for image in e["image_attention_mask"]]
        return {"image_pixel_values": pad_sequence(pixels, batch_first=True),
                "image_attention_mask": pad_sequence(masks, batch_first=True, padding_value=1),
                "image_sizes": torch.cat([e["image_sizes"] for e in with_images])}


class Phi4MMProcessor(Processor):
    """Phi4MultimodalProcessor (image processor + tokenizer, loaded from and saved to the native layout) speaking
    the seam's language: `<|image_k|>` tags, token spans for labels, the length without pixels."""

    collator_class = Phi4MMCollator
    crops_setting = "dynamic_hd"

    def __init__(self, native: Phi4MultimodalProcessor):
        self.native = native
        self.tokenizer = native.tokenizer
        self.image_processor = native.image_processor
        self.image_token_id = native.image_token_id

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_crops: int | None = None, **kwargs) -> Phi4MMProcessor:
        """Load the processor files of a native checkpoint; `num_crops` overrides the saved `dynamic_hd`."""
        processor = cls(load_pretrained(Phi4MultimodalProcessor.from_pretrained, path, **kwargs))
        if num_crops is not None:
            processor.num_crops = num_crops
        return processor

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.native.save_pretrained(directory)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render messages ({"role", "content"} with string content). Phi-4's template ends a conversation with
        <|endoftext|>; that is left out here, since phi3v.data ends every document with it (supervised)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        eos = self.tokenizer.eos_token
        return text[: -len(eos)] if not add_generation_prompt and text.endswith(eos) else text

    def encode(self, text: str, image_tokens: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character spans of `text`, image tag k expanded to image_tokens[k-1] image tokens."""
        return encode_with_images(self.tokenizer, text, image_tokens, lambda k: self.image_token_id,
                                  add_special_tokens=False)

    def num_tokens(self, text: str, image_sizes: list[tuple[int, int]]) -> int:
        """Sequence length of `text` with images of these (width, height) sizes, without decoding any pixels."""
        return len(self.encode(text, [num_image_tokens(w, h, self.num_crops) for w, h in image_sizes])[0])

    def __call__(self, text: str, images: list[Image.Image] | None = None, return_tensors: str | None = "pt",
                 return_offsets_mapping: bool = False) -> BatchFeature:
        """Process one prompt. Returns input_ids (1, L), attention_mask (1, L) and, with images,
        image_pixel_values (N, max crops, 3, 448, 448), image_attention_mask (N, max crops, 32, 32) and
        image_sizes (N, 2) (the resized image's padded [height, width])."""
        if not isinstance(text, str):
            raise TypeError("Phi4MMProcessor takes one prompt string; batch prompts with its collator")
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        data = dict(self.image_processor(images, return_tensors="pt")) if images else {"num_img_tokens": []}
        ids, spans = self.encode(text, list(data.pop("num_img_tokens")))
        out = {"input_ids": torch.tensor([ids], dtype=torch.long),
               "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **data}
        if return_offsets_mapping:
            out["offset_mapping"] = torch.tensor([spans], dtype=torch.long).view(1, -1, 2)
        return BatchFeature(out)
