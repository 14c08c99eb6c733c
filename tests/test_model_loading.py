"""Each tuning mode trains exactly the parameters it should: they change, and the rest stays bit-identical."""

from __future__ import annotations

import pytest
import torch

from phi3v.data.conversation import Conversation, Turn
from phi3v.data.dataset import ConversationDataset
from phi3v.models.phi3_v.collator import Phi3VCollator
from phi3v.models.phi3_v.family import lora_target_modules
from phi3v.train.arguments import ModelArguments
from phi3v.train.loading import model_dtype
from phi3v.train.training_arguments import RecipeTrainingArguments
from tests.conftest import make_image

MODES = {  # mode -> ModelArguments flags, as the original scripts take them
    "full": [],
    "frozen_vision": ["--freeze_vision_model"],
    "lora": ["--use_lora", "--freeze_vision_model"],  # LoRA on the language model only
    "lora_vision": ["--use_lora"],  # the original --use_lora: LM, CLIP and projector
    "qlora": ["--use_lora", "--use_qlora"],
}


def parse(tiny_dir, tmp_path, flags):
    from transformers import HfArgumentParser

    return HfArgumentParser((ModelArguments, RecipeTrainingArguments)).parse_args_into_dataclasses(
        args=["--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path), "--lora_rank", "4", *flags]
    )


def batch(processor):
    conversations = [Conversation("a", [Turn("Colour?", "red", [make_image(400, 300)])]),
                     Conversation("b", [Turn("Two?", "yes", [make_image(336, 336, seed=1), make_image(200, 500)])]),
                     Conversation("c", [Turn("Text only", "ok")])]
    dataset = ConversationDataset(conversations, lambda c: c, processor)
    out = Phi3VCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    out.pop("sample_ids")
    return out


def trainable_and_moved(model, inputs) -> tuple[set[str], set[str]]:
    """(names of trainable parameters, names of the parameters two AdamW steps changed). Two steps, so that LoRA A,
    whose gradient is zero while B is still zero, gets a gradient too."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return trainable, {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def group(name: str) -> str:
    if ".lora_" in name:
        return "lora-vision" if ".vision_embed_tokens." in name else "lora-language"
    if ".img_processor." in name:
        layer = name.split("encoder.layers.")[1].split(".")[0] if "encoder.layers." in name else None
        return "clip-unused" if "post_layernorm" in name or layer == "1" else "clip"  # tiny CLIP: layer 1 unused
    if ".vision_embed_tokens." in name:
        return "projector"
    return "embed_tokens" if "embed_tokens" in name else "language"


# group -> trainable in this mode?
EXPECTED = {
    "full": {"clip": True, "clip-unused": False, "projector": True, "embed_tokens": True, "language": True},
    "frozen_vision": {"clip": False, "clip-unused": False, "projector": False, "embed_tokens": True, "language": True},
    "lora": {"clip": False, "clip-unused": False, "projector": False, "embed_tokens": False, "language": False,
             "lora-language": True},
    "lora_vision": {"clip": False, "clip-unused": False, "projector": False, "embed_tokens": False,
                    "language": False, "lora-language": True, "lora-vision": True},
    "qlora": {"clip": False, "clip-unused": False, "projector": False, "embed_tokens": False, "language": False,
              "lora-language": True, "lora-vision": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_trains_what_it_should(mode, tiny_dir, processor, tmp_path):
    from phi3v.train.loading import load_model

    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    model_args, training_args = parse(tiny_dir, tmp_path, MODES[mode])
    assert model_args.tuning_mode == ("lora" if mode == "lora_vision" else mode)
    torch.manual_seed(0)
    model = load_model(model_args, training_args).train()
    trainable, changed = trainable_and_moved(model, batch(processor))
    assert changed == trainable  # every trainable parameter got a gradient and moved; nothing else did
    names = [name for name, _ in model.named_parameters()]
    for name in names:
        assert (name in trainable) == EXPECTED[mode][group(name)], name
    assert set(EXPECTED[mode]) == {group(n) for n in names}


def test_lora_targets_are_full_paths(tiny_model):
    targets = lora_target_modules(tiny_model, include_vision=True)
    assert "lm_head" in targets and "model.layers.0.self_attn.qkv_proj" in targets
    assert "model.vision_embed_tokens.img_projection.0" in targets
    clip = [t for t in targets if ".img_processor." in t]
    assert clip and all(".encoder.layers.0." in t for t in clip)  # only the layers that feed the features
    assert all(".img_processor." not in t for t in lora_target_modules(tiny_model, include_vision=False))


def test_lora_targets_every_linear_layer_the_original_targets(tiny_model):
    """The original recipe targets qkv_proj, o_proj, gate_up_proj, down_proj and lm_head, and with the vision tower
    CLIP's q/k/v/out_proj, fc1, fc2 and the projector: that is every nn.Linear of the model, except in the CLIP
    layers after the feature layer (which never run). Enumerated here from the module tree, not from the code."""
    linear = {name for name, module in tiny_model.named_modules() if isinstance(module, torch.nn.Linear)}
    used = tiny_model.model.vision_embed_tokens.num_layers_used
    unused = {n for n in linear
              if ".encoder.layers." in n and int(n.split(".encoder.layers.")[1].split(".")[0]) >= used}
    language = {n for n in linear if n.startswith("model.layers.")} | {"lm_head"}
    assert {n.rsplit(".", 1)[-1] for n in language} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"}
    assert set(lora_target_modules(tiny_model, include_vision=False)) == language
    assert set(lora_target_modules(tiny_model, include_vision=True)) == linear - unused
    assert len(lora_target_modules(tiny_model, include_vision=True)) == len(linear - unused)  # no duplicates


def test_weight_dtype_follows_the_original_rule(tiny_dir, tmp_path):
    flash, _ = parse(tiny_dir, tmp_path, ["--attn_implementation", "flash_attention_2"])
    plain, _ = parse(tiny_dir, tmp_path, [])
    explicit, _ = parse(tiny_dir, tmp_path, ["--torch_dtype", "bfloat16"])
    assert (model_dtype(flash), model_dtype(plain), model_dtype(explicit)) == (
        torch.bfloat16, torch.float32, torch.bfloat16)
