"""The model seam: everything the recipes, the trainer, validation, predict and export know about a model family.

A family is one `ModelFamily` value in phi3v/models/<family>/family.py, listed in phi3v.models.registry, which picks
it by the checkpoint's config.json `model_type`. Code outside phi3v/models/ reaches a family only through it:

- `processor_class.from_pretrained(path, num_crops=None)` gives the processor, which turns a rendered conversation
  (chat-template text with <|image_1|>..<|image_n|> tags, and the images) into model inputs:
  `processor(text, images, return_offsets_mapping=True)` -> input_ids, attention_mask, the image tensors and the
  tokens' character spans (labels are cut from those spans by phi3v.data). It also has `apply_chat_template`,
  `num_tokens(text, image_sizes)` (the length without decoding pixels), `end_token_ids()` (where generation
  stops), `collator(padding_side)` (batches its examples), `tokenizer`, `num_crops` and `save_pretrained`.
- `model_class.from_pretrained(path, dtype=, attn_implementation=, quantization_config=, device_map=, ...)`.
- `part_of(path)` names the part a parameter or module belongs to ("vision", "projector", "language"), which the
  freeze flags, per-part learning rates and parameter counts use; `lora_targets(model)` the default LoRA targets
  (full module paths, every part); `unused_parameters(model)` the weights in the checkpoint that never compute;
  `vision_modules` the module prefixes kept unquantized by --no_quantize_vision.
- `complete_layout(out_dir, base, remote_code_files)` writes what serving needs beside saved weights;
  `remote_code_dir(base)` fetches the base's remote code files (None where it has none), so an export fails early;
  `shard_size()` is the largest weights file its checkpoints are saved in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")  # image k of a conversation in rendered text, k = 1, 2, ...
IGNORE_INDEX = -100  # the label of every token the loss skips: prompts, image placeholders, padding


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    model_class: type
    processor_class: type
    part_of: Callable[[str], str]
    lora_targets: Callable[[object], list[str]]
    unused_parameters: Callable[[object], Iterable]
    vision_modules: tuple[str, ...]
    complete_layout: Callable[..., list[str]]
    remote_code_dir: Callable[[str], object]
    shard_size: Callable[[], str]
