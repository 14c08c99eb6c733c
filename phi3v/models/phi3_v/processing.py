"""Phi3VProcessor: a prompt with `<|image_k|>` tags + PIL images -> model inputs, as the official processor does.

    "<|user|>\\n<|image_1|>\\nWhat is this?<|end|>\\n<|assistant|>\\n", [img]
      split at the tags:   ["<|user|>\\n", "\\nWhat is this?<|end|>\\n<|assistant|>\\n"]
      tokenize each chunk with its own BOS, and put [-1] * 757 where <|image_1|> was:
      input_ids = [1, <|user|>, \\n, -1 x 757, 1, \\n, What, is, this, ?, <|end|>, \\n, <|assistant|>, \\n]

So every image block is followed by a BOS (id 1), and image k's placeholders hold the value -k. The model
replaces placeholders, in order of appearance, with the features of the images in list order; this is why the
tags must be exactly <|image_1|> ... <|image_n|>, each once, in increasing order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerFast

from phi3v.models.family import Processor, encode_with_images, load_pretrained
from phi3v.models.phi3_v.collator import Phi3VCollator
from phi3v.models.phi3_v.image_processing import Phi3VImageProcessor
from phi3v.models.phi3_v.layout import read_json, write_json


def tokenizer_class(directory: Path) -> str:
    """The tokenizer_class for the tokenizer_config.json of `directory`: one that makes transformers 4.x and 5.x
    both load tokenizer.json as it is, so that the folder tokenizes exactly as its base.

    Measured with transformers 5.24 and the real vocabulary (llama.cpp's 47 test strings + 2 chat prompts): 5.x
    takes the class from config.json's model_type where there is one (phi3_v: tokenizer.json as it is), else from
    this name. Its LlamaTokenizer rebuilds the pipeline with no normalizer, so in a LoRA folder (no config.json)
    "LlamaTokenizer" loses the "▁" after each special token: 17 of 49 strings differ (15 with legacy true, 47 with
    add_prefix_space false), none under "PreTrainedTokenizerFast" (or "TokenizersBackend", which 4.x does not know).
    4.x reads tokenizer.json as it is under either name, but the official processor code (4.x remote code, vLLM)
    warns of "unexpected tokenization" unless it is a LlamaTokenizer. Hence "LlamaTokenizer" in a phi3_v model
    folder, "PreTrainedTokenizerFast" elsewhere.
    """
    model_type = read_json(Path(directory) / "config.json").get("model_type")
    return "LlamaTokenizer" if model_type == "phi3_v" else "PreTrainedTokenizerFast"


class Phi3VProcessor(Processor):
    """Image processor + tokenizer, loaded from (and saved to) an official-layout checkpoint directory."""

    model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_sizes"]
    collator_class = Phi3VCollator
    crops_setting = "num_crops"

    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_crops: int | None = None, **kwargs) -> Phi3VProcessor:
        """Load `preprocessor_config.json` and the tokenizer files; `num_crops` overrides the saved value.

        The tokenizer is tokenizer.json as it is, whatever class tokenizer_config.json names (see tokenizer_class),
        so LoRA folders written before that name was fixed load right too; no config.json is read (its auto_map made
        AutoTokenizer ask whether to run the official *.py files). A model merged by phi3v.export before that fix
        holds the rebuilt tokenizer.json itself (no normalizer): export it again, or copy the base's over it.
        """
        image_processor = Phi3VImageProcessor.from_pretrained(path, num_crops=num_crops)
        return cls(image_processor, load_pretrained(PreTrainedTokenizerFast.from_pretrained, path, **kwargs))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write preprocessor_config.json and the tokenizer files in a form transformers 4.x and 5.x both read.

        Call it after the model's save_pretrained (as the Trainer and phi3v.export do): the `tokenizer_class` written
        depends on the folder's config.json (see tokenizer_class). tokenizer_config.json also gets `chat_template`
        (transformers 5 also writes chat_template.jinja and reads either), and `additional_special_tokens` instead
        of transformers 5's list-valued `extra_special_tokens`, which 4.x releases that expect a dict there crash
        on (vLLM servers). special_tokens_map.json is written as in the official repo; processor_config.json is left
        to layout.py, which writes it with the auto_map 4.x needs.
        """
        directory = Path(directory)
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = tokenizer_class(directory)
        if self.tokenizer.chat_template:
            config["chat_template"] = self.tokenizer.chat_template
        extra = config.pop("extra_special_tokens", None) or {}
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        known = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = known + [token for token in extra if token not in known]
        write_json(config_file, config)
        special = ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")
        write_json(directory / "special_tokens_map.json", {key: config[key] for key in special if key in config})
        (directory / "processor_config.json").unlink(missing_ok=True)  # a stale one without auto_map misleads 4.x

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render messages ({"role", "content"} with string content) to the prompt string; BOS comes later."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, image_tokens: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character spans of `text`, image tag k expanded to image_tokens[k-1] placeholders -k, each
        chunk between tags with its own BOS (an empty span at the chunk start)."""
        return encode_with_images(self.tokenizer, text, image_tokens, lambda k: -k, add_special_tokens=True)

    def num_tokens(self, text: str, image_sizes: list[tuple[int, int]]) -> int:
        """Sequence length of `text` with images of these (width, height) sizes, without decoding any pixels."""
        return len(self.encode(text, [self.image_processor.num_image_tokens(w, h) for w, h in image_sizes])[0])

    def __call__(self, text: str, images: list[Image.Image] | None = None, return_tensors: str | None = "pt",
                 return_offsets_mapping: bool = False) -> BatchFeature:
        """Process one prompt. Returns input_ids (1, L), attention_mask (1, L) and, with images,
        pixel_values (N, num_crops+1, 3, 336, 336) float32 and image_sizes (N, 2)."""
        if not isinstance(text, str):
            raise TypeError("Phi3VProcessor takes one prompt string; batch prompts with phi3v.collator")
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        data = self.image_processor(images) if images else {"num_img_tokens": []}
        ids, spans = self.encode(text, data.pop("num_img_tokens"))
        out = {"input_ids": [ids], "attention_mask": [[1] * len(ids)], **data}  # data: pixel_values, image_sizes
        if return_offsets_mapping:
            out["offset_mapping"] = [spans]
        if return_tensors == "pt":
            out = {k: v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.long) for k, v in out.items()}
        return BatchFeature(out)
