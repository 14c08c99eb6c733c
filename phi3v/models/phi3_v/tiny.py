"""Write a tiny random Phi-3.5-vision checkpoint in the official layout, offline, in about a second.

    python -m phi3v.tiny OUT_DIR [--seed 0] [--like phi-3-vision-128k-instruct] [--real_vocab]   (phi3v/tiny.py)

Same file set and tensor names as microsoft/Phi-3.5-vision-instruct (config.json, model.safetensors,
preprocessor_config.json, tokenizer files with the Phi-3.5 chat template, generation_config.json), with tiny
dimensions: text hidden 64 x 2 layers, CLIP hidden 32 x 2 layers at the real 336/14 geometry, so image token counts
are the real ones. The tokenizer is a real byte-fallback BPE trained here on a small built-in corpus, with the
official special tokens at the official ids (<s> 1, <|endoftext|> 32000, <|assistant|> 32001, <|end|> 32007, ...).
Tests, the demo and the benchmarks use it. `--like phi-3-vision-128k-instruct` writes the predecessor's layout (its
config.json keys and LongRoPE factors, num_crops 16); `--real_vocab` uses the real Phi-3 vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from phi3v.common.errors import UserError
from phi3v.models.phi3_v.configuration import CLIP_VIT_L_336, Phi3VConfig
from phi3v.models.phi3_v.image_processing import Phi3VImageProcessor
from phi3v.models.phi3_v.modeling import Phi3VForCausalLM
from phi3v.models.phi3_v.processing import Phi3VProcessor

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
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")  # for training only
    tokenizer.train_from_iterator(
        CORPUS.splitlines(), trainers.BpeTrainer(vocab_size=1000, show_progress=False, special_tokens=[])
    )
    learned = json.loads(tokenizer.to_str())["model"]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in pieces]
    pieces += [f"<reserved_{i}>" for i in range(BASE_VOCAB - len(pieces))]  # never produced: no merge reaches them

    merges = list(map(tuple, learned["merges"]))
    tokenizer.model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True,
                                 unk_token="<unk>", fuse_unk=True)
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>"]])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return phi3_tokenizer(tokenizer)


def phi3_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """`tokenizer` with the flags of the official Phi-3.5-vision tokenizer_config.json: BOS added, no EOS,
    <|endoftext|> as eos and pad, the chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>", additional_special_tokens=["<|system|>", "<|end|>", "<|user|>"], add_bos_token=True,
        add_eos_token=False, chat_template=CHAT_TEMPLATE, model_max_length=131072, padding_side="right",
        clean_up_tokenization_spaces=False, legacy=False,
    )


# The real Phi-3 vocabulary (32,000 SentencePiece pieces + the Phi-3 special tokens), as the vocabulary-only GGUF file
# of llama.cpp; see tests/assets/phi3-vocab/PROVENANCE.md. Loading it needs the `gguf` package.
REAL_VOCAB = Path(__file__).resolve().parents[3] / "tests" / "assets" / "phi3-vocab" / "ggml-vocab-phi-3.gguf"


def real_tokenizer(gguf_file: str | Path = REAL_VOCAB) -> PreTrainedTokenizerFast:
    """The real Phi-3 tokenizer from its GGUF vocabulary, with the flags the GGUF does not carry (`phi3_tokenizer`).
    Added tokens keep lstrip/rstrip off, so a newline after a special token stays `▁` + `\n` (29871, 13)."""
    from transformers import AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise UserError(f"--real_vocab: no GGUF vocabulary at {gguf_file}")
    try:
        loaded = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    except ImportError as error:
        raise UserError(f"--real_vocab needs the gguf package: pip install gguf ({error})") from error
    return phi3_tokenizer(loaded.backend_tokenizer)


# num_crops of each official preprocessor_config.json
DEFAULT_NUM_CROPS = {"phi-3.5-vision-instruct": 4, "phi-3-vision-128k-instruct": 16}


def tiny_config(variant: str = "phi-3.5-vision-instruct", **overrides) -> Phi3VConfig:
    """An official config (`variant`) with tiny dimensions; 8 LongRoPE factors taken from the official 48."""
    official = json.loads(Phi3VConfig.official(variant).to_json_string(use_diff=False))
    rope = official["rope_scaling"]
    fields = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        rope_scaling={"type": "su", "short_factor": rope["short_factor"][::6],
                      "long_factor": rope["long_factor"][::6]},
        img_processor={**official["img_processor"], "image_dim_out": 32},
        vision_config={**CLIP_VIT_L_336, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "projection_dim": 32},
        dtype="float32",
    )
    return Phi3VConfig.official(variant, **{**fields, **overrides})


def build_tiny_checkpoint(directory: str | Path, seed: int = 0, num_crops: int | None = None,
                          real_vocab: str | Path | None = None, variant: str = "phi-3.5-vision-instruct",
                          **config_overrides) -> Path:
    """Write a random tiny checkpoint + processor files to `directory` and return it; with `real_vocab` (a GGUF
    vocabulary file) the tokenizer is the real Phi-3 one instead of the small one trained here. `variant` picks the
    official config it is a miniature of; num_crops defaults to that checkpoint's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    num_crops = DEFAULT_NUM_CROPS[variant] if num_crops is None else num_crops
    model = Phi3VForCausalLM(tiny_config(variant, **config_overrides))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=32000)
    model.save_pretrained(directory)
    tokenizer = real_tokenizer(real_vocab) if real_vocab else build_tokenizer()
    Phi3VProcessor(Phi3VImageProcessor(num_crops=num_crops), tokenizer).save_pretrained(directory)
    return directory
