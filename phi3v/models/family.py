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
  `shard_size()` is the largest weights file its checkpoints are saved in; `serving` the model card's word on how
  that layout is served.
- `built_in_lora(base)`: (adapter_config, weights) of a LoRA shipped beside the base weights that `model_class`
  merges while loading (weight keys `<module path>.lora_A.weight` / `.lora_B.weight`), else None; export adds it
  to the base tensors it streams, as the trained model had it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from phi3v.common.errors import Unavailable
from phi3v.common.hub import UNREACHABLE, hub_kwargs, offline_message

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")  # image k of a conversation in rendered text, k = 1, 2, ...
IGNORE_INDEX = -100  # the label of every token the loss skips: prompts, image placeholders, padding
END_TOKENS = ("<|end|>", "<|endoftext|>")  # a chat turn ends with <|end|>; <|endoftext|> ends the document
# LoRA targets: the decoder's fused projections, and the vision tower's attention/MLP (as CLIP and SigLIP name them)
LM_TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
VISION_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                  "mlp.fc2")


def check_image_tags(text: str, num_images: int) -> None:
    """Raises ValueError unless the image tags of `text` are numbered 1..num_images, once each, in order."""
    tags = [int(k) for k in IMAGE_TAG.findall(text)]
    if tags != list(range(1, num_images + 1)):
        shown = ", ".join(f"<|image_{k}|>" for k in tags) or "no image tags"
        if not num_images:
            raise ValueError(f"the prompt has {shown} but no images were given")
        raise ValueError(f"the prompt has {shown} but {num_images} image(s) were given: it must reference "
                         f"<|image_1|> ... <|image_{num_images}|> exactly once each, in increasing order")


def encode_with_images(tokenizer, text: str, image_tokens: list[int], placeholder: Callable[[int], int],
                       add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character spans of `text`: the chunks between image tags tokenized on their own, image tag k
    replaced by image_tokens[k-1] ids `placeholder(k)`, which carry the span of their tag."""
    check_image_tags(text, len(image_tokens))
    ids, spans, start = [], [], 0
    bounds = [(m.start(), m.end(), int(m.group(1))) for m in IMAGE_TAG.finditer(text)] + [(len(text), None, 0)]
    for tag_start, tag_end, k in bounds:
        encoding = tokenizer(text[start:tag_start], return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        ids += encoding["input_ids"]
        spans += [(start + a, start + b) for a, b in encoding["offset_mapping"]]
        if tag_end is not None:
            ids += [placeholder(k)] * image_tokens[k - 1]
            spans += [(tag_start, tag_end)] * image_tokens[k - 1]
            start = tag_end
    return ids, spans


def load_pretrained(load: Callable, path: str | os.PathLike, *args, **kwargs):
    """`load(path, ...)`, offline where the Hub is unreachable; a hub id it cannot fetch raises Unavailable."""
    offline = hub_kwargs(path)
    try:
        return load(path, *args, **{**offline, **kwargs})
    except (OSError, SafetensorError) as error:
        if Path(path).exists():  # local, as hub_kwargs sees it
            raise
        raise Unavailable(offline_message(str(path), UNREACHABLE if offline else error)) from error


class Processor:
    """What every family's processor does the same over its `tokenizer` and `image_processor`; a family sets
    `collator_class` and `crops_setting` (its image processor's name for the largest number of crops per image)."""

    collator_class: type
    crops_setting: str

    @property
    def num_crops(self) -> int:
        return getattr(self.image_processor, self.crops_setting)

    @num_crops.setter
    def num_crops(self, value: int) -> None:
        setattr(self.image_processor, self.crops_setting, value)

    def collator(self, padding_side: str = "right"):
        """Batches this processor's examples (left-padded for generation)."""
        return self.collator_class(self.tokenizer.pad_token_id, padding_side)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def end_token_ids(self) -> list[int]:
        """Ids that end a generated answer: <|end|> and <|endoftext|>."""
        return [self.tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS]


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
    serving: str  # the model card's "Serving" section: how its layout is served
    built_in_lora: Callable[[str], tuple[dict, dict] | None] = lambda base: None
