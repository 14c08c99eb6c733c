"""Phi-3-vision-128k-instruct, the predecessor the original README's DocVQA and Hateful Memes rows were measured with:
its config.json (phi3v/models/phi3_v/configs/, the hub file's values) loads with its own LongRoPE
factors and the official tensor names, and a tiny checkpoint in its layout trains, generates and runs the recipes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor
from tests.conftest import make_image
from tests.test_modeling import official_keys
from tests.test_scripts_tasks import hub_dirs  # noqa: F401,F811  (the hub-schema datasets fixture)

CONFIG_128K = Path(__file__).resolve().parents[1] / "phi3v/models/phi3_v/configs/phi-3-vision-128k-instruct.json"
VARIANT = "phi-3-vision-128k-instruct"


def hub_config() -> dict:
    return json.loads(CONFIG_128K.read_text())


@pytest.fixture(scope="module")
def tiny_128k(tmp_path_factory):
    from phi3v.models.phi3_v.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-128k"), seed=1, variant=VARIANT)


def test_the_hub_config_json_loads_as_is(tmp_path):
    """config.json exactly as on the hub (rope_scaling type "su", flash_attention_2, auto_map) through AutoConfig."""
    shutil.copy(CONFIG_128K, tmp_path / "config.json")
    config = AutoConfig.from_pretrained(tmp_path)
    hub = hub_config()
    assert isinstance(config, Phi3VConfig)
    assert config._attn_implementation is None  # the hub's "flash_attention_2" is not inherited
    rope = config.rope_parameters
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 4096
    assert rope["short_factor"] == hub["rope_scaling"]["short_factor"]
    assert rope["long_factor"] == hub["rope_scaling"]["long_factor"]
    assert (config.max_position_embeddings, config.sliding_window, config.vocab_size) == (131072, 131072, 32064)
    # keys the predecessor's config.json lacks take the official defaults: no pad id, no dropout
    assert (config.pad_token_id, config.embd_pdrop, config.resid_pdrop) == (None, 0.0, 0.0)
    assert config.embd_layer == hub["embd_layer"] and config.img_processor == hub["img_processor"]
    saved = config.to_dict()
    assert saved["rope_scaling"] == hub["rope_scaling"]  # written back in the hub's own form
    # its factors really are its own, not Phi-3.5's
    assert rope["long_factor"] != Phi3VConfig.official().rope_parameters["long_factor"]


def test_official_tensor_names():
    with torch.device("meta"):
        model = Phi3VForCausalLM(Phi3VConfig.official(VARIANT))
    assert {name: list(t.shape) for name, t in model.state_dict().items()} == official_keys()
    assert model.model.embed_tokens.padding_idx is None  # pad_token_id none: <|endoftext|>'s row trains


@pytest.mark.parametrize("length,factors", [(4096, "short_factor"), (4097, "long_factor")])
def test_its_own_longrope_factors(tiny_model, length, factors):
    """cos of the last position from the spec's formula (section 6.2) with the 128k config's factors."""
    rotary = type(tiny_model.model.rotary_emb)(Phi3VConfig.official(VARIANT))
    positions = torch.arange(length)[None]
    cos, _ = rotary(torch.zeros(1), positions)
    f = torch.tensor(hub_config()["rope_scaling"][factors], dtype=torch.float64)
    inv_freq = 1.0 / (f * 10000 ** (torch.arange(0, 96, 2, dtype=torch.float64) / 96))
    angles = (length - 1) * inv_freq
    scale = math.sqrt(1 + math.log(32) / math.log(4096))
    assert torch.allclose(cos[0, -1].double(), torch.cat([angles.cos(), angles.cos()]) * scale, atol=2e-3)


def test_tiny_checkpoint_has_its_layout(tiny_128k, tiny_dir):
    config = json.loads((tiny_128k / "config.json").read_text())
    hub = hub_config()
    assert config["rope_scaling"] == {"type": "su", "short_factor": hub["rope_scaling"]["short_factor"][::6],
                                      "long_factor": hub["rope_scaling"]["long_factor"][::6]}
    assert config.get("pad_token_id") is None and config["sliding_window"] == 131072
    assert json.loads((tiny_128k / "preprocessor_config.json").read_text())["num_crops"] == 16  # its default
    assert set(load_file(tiny_128k / "model.safetensors")) == set(load_file(tiny_dir / "model.safetensors"))


def test_tiny_checkpoint_trains_and_generates(tiny_128k):
    model = AutoModelForCausalLM.from_pretrained(tiny_128k)
    processor = Phi3VProcessor.from_pretrained(tiny_128k, num_crops=1)
    assert isinstance(model, Phi3VForCausalLM) and model.generation_config.pad_token_id == 32000
    text = "<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\nA red car<|end|>\n<|endoftext|>"
    inputs = processor(text, [make_image(640, 480)])
    labels = inputs["input_ids"].clone()
    labels[:, : len(processor("<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n",
                              [make_image(640, 480)])["input_ids"][0])] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5, losses
    model.eval()
    prompt = processor("<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\n", [make_image(640, 480)])
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, eos_token_id=processor.end_token_ids())
    answer = processor.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "A red car", (answer, losses)  # it learnt the answer it was trained on, and stopped


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_recipes_accept_it(tiny_128k, hub_dirs, tmp_path):  # noqa: F811
    """The two recipes of the original README's tables, with --model_name_or_path a Phi-3-vision-128k layout."""
    import finetune_hf_trainer_docvqa as docvqa
    import finetune_hf_trainer_hateful_memes as hateful_memes
    from tests.test_scripts_tasks import read_results, run_args

    docvqa.main(run_args(tiny_128k, tmp_path / "docvqa", "--dataset_path", str(hub_dirs / "docvqa_mini"),
                         "--use_lora"))
    assert {"eval_before_anls", "eval_after_anls", "train_loss"} <= set(read_results(tmp_path / "docvqa"))
    hateful_memes.main(run_args(tiny_128k, tmp_path / "memes", "--dataset_path",
                                str(hub_dirs / "cauldron_memes_parquet"), "--eval_rows", "6"))
    assert {"eval_after_accuracy", "eval_after_roc_auc"} <= set(read_results(tmp_path / "memes"))
