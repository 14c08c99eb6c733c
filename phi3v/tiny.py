"""Write a tiny random Phi-3.5-vision checkpoint in the official layout, offline, in about a second.

    python -m phi3v.tiny OUT_DIR [--seed 0]

Same file set and tensor names as microsoft/Phi-3.5-vision-instruct (config.json, model.safetensors,
preprocessor_config.json, tokenizer files with the Phi-3.5 chat template, generation_config.json), with tiny
dimensions: text hidden 64 x 2 layers, CLIP hidden 32 x 2 layers at the real 336/14 geometry, so image token counts
are the real ones. The tokenizer is a real byte-fallback BPE trained here on a small built-in corpus, with the
official special tokens at the official ids (<s> 1, <|endoftext|> 32000, <|assistant|> 32001, <|end|> 32007, ...).
Tests, the demo and the benchmarks use it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from phi3v.errors import run_main
from phi3v.image_processing import Phi3VImageProcessor
from phi3v.modeling import Phi3VConfig, Phi3VForCausalLM
from phi3v.processing import Phi3VProcessor

BASE_VOCAB = 32000  # regular pieces; the special tokens follow at their official ids
SPECIAL_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                  "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|assistant|>' + '\n' }}{% endif %}"
)
CORPUS = """\
Classify the video into one of the following classes: ApplyEyeMakeup, ApplyLipstick, Archery, BabyCrawling,
BalanceBeam, BandMarching, BaseballPitch, Basketball, BasketballDunk, BenchPress.
What is shown in this image? Answer briefly. Is this meme hateful? yes no. Is the statement true? True False.
The left image shows two dogs and the right image shows one cat. What is the date on the invoice? What is the total?
A photo of a red car parked on a street next to a green tree, under a blue sky with white clouds.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. 0 1 2 3 4 5 6 7 8 9 10 100 2024
In the beginning of the document there is a title, a table with numbers, and a signature at the bottom of the page.
Describe the picture in detail. How many people are there? Where was this taken? Which object is larger?
""" * 4 + "Answers: (ApplyEyeMakeup) (ApplyLipstick) (Archery) (BabyCrawling) (BalanceBeam) (BandMarching) " \
    "(BaseballPitch) (Basketball) (BasketballDunk) (BenchPress) (yes) (no) (True) (False)\n" * 40


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a Llama-style byte-fallback BPE on CORPUS, with the official special tokens and chat template."""
    trainer_tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    trainer_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer_tokenizer.train_from_iterator(
        CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=1000, show_progress=False, special_tokens=[])
    )
    learned = json.loads(trainer_tokenizer.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in pieces]
    pieces += [f"<reserved_{i}>" for i in range(BASE_VOCAB - len(pieces))]  # never produced: no merge reaches them
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True,
                                     unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>", additional_special_tokens=["<|system|>", "<|end|>", "<|user|>"], add_bos_token=True,
        add_eos_token=False, chat_template=CHAT_TEMPLATE, model_max_length=131072, padding_side="right",
        clean_up_tokenization_spaces=False, legacy=False,
    )


def tiny_config(**overrides) -> Phi3VConfig:
    """Official config with tiny dimensions; 8 LongRoPE factors taken from the official 48."""
    official = json.loads(Phi3VConfig.official().to_json_string(use_diff=False))
    rope = official["rope_scaling"]
    fields = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        rope_scaling={"type": "su", "short_factor": rope["short_factor"][::6],
                      "long_factor": rope["long_factor"][::6]},
        img_processor={**official["img_processor"], "image_dim_out": 32},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           projection_dim=32),
        dtype="float32",
    )
    fields.update(overrides)
    return Phi3VConfig.official(**fields)


def build_tiny_checkpoint(directory: str | Path, seed: int = 0, num_crops: int = 4, **config_overrides) -> Path:
    """Write a random tiny checkpoint + processor files to `directory` and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(tiny_config(**config_overrides))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=32000)
    model.save_pretrained(directory)
    Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), build_tokenizer()).save_pretrained(directory)
    return directory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_crops", type=int, default=4, help="num_crops saved in preprocessor_config.json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    directory = build_tiny_checkpoint(args.out_dir, args.seed, args.num_crops)
    print(f"tiny Phi-3.5-vision checkpoint written to {directory}")


if __name__ == "__main__":
    run_main(main)
