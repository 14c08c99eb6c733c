"""Write a tiny random Phi-4-multimodal-instruct checkpoint in transformers' native layout, offline, in seconds.

    python -m phi3v.tiny OUT_DIR --like phi-4-multimodal-instruct [--seed 0]

The official config.json (configs/phi-4-multimodal-instruct.json: longrope, partial rotary 0.75, tied embeddings, the
200,064-token vocabulary) with tiny dimensions: text hidden 64 x 2 layers, SigLIP hidden 32 x 2 layers at the real
448/14 geometry (so image token counts are the real ones), a one-block audio encoder (always built by transformers,
never run here). Beside the weights: the processor files (the image processor, the audio feature extractor, a
byte-level BPE trained here on a small corpus with the real special tokens at their real ids and Phi-4's chat
template), generation_config.json, and a built-in `vision-lora/` adapter in the converted checkpoint's format, so
that loading merges it as it merges the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Phi4MultimodalConfig,
    Phi4MultimodalFeatureExtractor,
    Phi4MultimodalImageProcessor,
    Phi4MultimodalProcessor,
    PreTrainedTokenizerFast,
)

from phi3v.models.family import LM_TARGETS
from phi3v.models.phi3_v.tiny import CORPUS
from phi3v.models.phi4_mm.modeling import VISION_LORA, Phi4MultimodalForCausalLM

OFFICIAL_CONFIG = Path(__file__).parent / "configs" / "phi-4-multimodal-instruct.json"
SPECIAL_TOKENS = {"<|endoftext|>": 199999, "<|image|>": 200010, "<|audio|>": 200011, "<|assistant|>": 200019,
                  "<|end|>": 200020, "<|user|>": 200021, "<|system|>": 200022, "<|tool|>": 200023,
                  "<|/tool|>": 200024}
CHAT_TEMPLATE = (  # Phi-4-mini's: no newlines, <|endoftext|> after a conversation that is not a generation prompt
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' "
    "+ '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
LORA_TARGETS = r"model.layers.\d+.((self_attn.(qkv|o)_proj)|(mlp.(gate_up|down)_proj))"  # the official adapter's


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the small corpus, with Phi-4's special tokens at their real ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(
        vocab_size=1000, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    learned = json.loads(tokenizer.to_str())["model"]
    tokenizer.model = models.BPE(vocab={**learned["vocab"], **SPECIAL_TOKENS},
                                 merges=list(map(tuple, learned["merges"])))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"}, chat_template=CHAT_TEMPLATE,
        model_max_length=131072, padding_side="right",
    )


def tiny_config(**overrides) -> Phi4MultimodalConfig:
    """The official config with tiny dimensions; 6 of the 48 longrope factors per list (rotary dim 12)."""
    official = json.loads(OFFICIAL_CONFIG.read_text())
    rope = official["rope_parameters"]
    fields = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={**rope, "short_factor": rope["short_factor"][::8], "long_factor": rope["long_factor"][::8]},
        vision_config={**official["vision_config"], "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        audio_config={**official["audio_config"], "hidden_size": 32, "intermediate_size": 32, "num_blocks": 1,
                      "num_attention_heads": 2, "ext_pw_out_channel": 32, "depthwise_separable_out_channel": 32,
                      "depthwise_seperable_out_channel": 32, "nemo_conv_channels": 16},
        dtype="float32",
    )
    return Phi4MultimodalConfig(**{**official, **fields, **overrides})


def write_vision_lora(directory: Path, model: torch.nn.Module, rank: int = 4) -> None:
    """A random built-in vision adapter in the converted checkpoint's format (keys without `base_model.model.`)."""
    weights = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path.startswith("model.layers.") and path.endswith(LM_TARGETS):
            weights[f"{path}.lora_A.weight"] = torch.randn(rank, module.in_features) * 0.02
            weights[f"{path}.lora_B.weight"] = torch.randn(module.out_features, rank) * 0.02
    (directory / VISION_LORA).mkdir(exist_ok=True)
    save_file(weights, directory / VISION_LORA / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
              "target_modules": LORA_TARGETS, "bias": "none"}
    (directory / VISION_LORA / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_tiny_checkpoint(directory: str | Path, seed: int = 0, num_crops: int | None = None,
                          **config_overrides) -> Path:
    """Write a random tiny checkpoint, its processor files and its vision LoRA to `directory`; return it.
    `num_crops` is the processor's dynamic_hd (default: the official 36)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(tiny_config(**config_overrides))
    model.generation_config = GenerationConfig(bos_token_id=199999, eos_token_id=[199999, 200020],
                                               pad_token_id=199999)
    model.save_pretrained(directory)
    write_vision_lora(directory, model)
    image_processor = Phi4MultimodalImageProcessor(dynamic_hd=36 if num_crops is None else num_crops)
    Phi4MultimodalProcessor(image_processor, Phi4MultimodalFeatureExtractor(), build_tokenizer(),
                            chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return directory
