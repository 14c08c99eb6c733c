"""Every folder the project writes tokenizes exactly as its base (issue 22), with the real Phi-3 vocabulary: the
output and checkpoint-1 of a 1-step run of each tuning mode, and the merged model (--save_merged_model and
`python -m phi3v.export`), read by our Phi3VProcessor and by plain transformers AutoTokenizer, as users, vLLM and
transformers 5's AutoProcessor (which loads its tokenizer with AutoTokenizer) read them.

Expected ids come from PROVENANCE.md of tests/assets/phi3-vocab (the original tokenizer's) and from the base's
tokenizer.json read by the `tokenizers` library, never from the folder under test."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from phi3v import Phi3VProcessor
from tests.conftest import ucf_args

pytest.importorskip("gguf", reason="the real vocabulary is read from its GGUF file (requirements-dev.txt)")

CHAT = "<|user|>\nWhat is shown?<|end|>\n<|assistant|>\n"
# the original tokenizer's ids (PROVENANCE.md): "▁" (29871) before each "\n" that follows a special token
CHAT_IDS = [1, 32010, 29871, 13, 5618, 338, 4318, 29973, 32007, 29871, 13, 32001, 29871, 13]
# a system turn, an image tag, and text that starts with spaces after a special token and after the tag
MULTI_TURN = ("<|system|>\nAnswer briefly.<|end|>\n<|user|>\n<|image_1|>\n What is shown?<|end|>\n<|assistant|>\n"
              "A  cat.<|end|>\n<|user|>\n And its colour?<|end|>\n<|assistant|>\n")
IMAGE_TOKENS = 7  # any count: the tokenizer is under test here, not the image arithmetic
TOKENIZER_JSON_PARTS = ("normalizer", "pre_tokenizer", "model", "decoder", "post_processor", "added_tokens")
# mode -> (flags, tokenizer_class of its output): the official name where config.json (model_type phi3_v) makes
# transformers 5 read tokenizer.json as it is and the official processor code of 4.x / vLLM expects it; else the
# name both 4.x and 5.x read as tokenizer.json as it is (phi3v.models.phi3_v.processing.tokenizer_class)
MODES = {"full": ([], "LlamaTokenizer"),
         "frozen_vision": (["--freeze_vision_model"], "LlamaTokenizer"),
         "lora": (["--use_lora", "--lora_rank", "4", "--save_merged_model"], "PreTrainedTokenizerFast"),
         "qlora": (["--use_lora", "--use_qlora", "--lora_rank", "4"], "PreTrainedTokenizerFast")}


@pytest.fixture(scope="module")
def base(real_vocab_dir):
    """Laid out as the official repo (config.json, "LlamaTokenizer")."""
    return real_vocab_dir


@pytest.fixture(scope="module")
def reference(base):
    """The base's tokenizer.json, read by the tokenizers library alone (adds the BOS, as the base does)."""
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    assert tokenizer.encode(CHAT).ids == CHAT_IDS
    return tokenizer


@pytest.fixture(scope="module")
def trained(base, ucf_data, tmp_path_factory):
    """mode -> its output folder: one 1-step run per mode (checkpoint-1 saved), shared by this module's tests."""
    import finetune_hf_trainer_ucf101 as ucf101

    outputs = {}

    def train(mode: str):
        if mode not in outputs:
            out = tmp_path_factory.mktemp(mode) / "out"
            ucf101.main(ucf_args(base, ucf_data, out, *MODES[mode][0], "--max_steps", "1", "--save_steps", "1",
                                 "--batch_size", "1", "--batch_size_per_gpu", "1", "--no_eval_before_training",
                                 "--no_eval_after_training"))
            outputs[mode] = out
        return outputs[mode]

    return train


def assert_tokenizes_as_the_base(folder, base, reference):
    ours = Phi3VProcessor.from_pretrained(folder)
    auto = AutoTokenizer.from_pretrained(folder)
    assert ours(CHAT)["input_ids"][0].tolist() == CHAT_IDS
    assert auto(CHAT)["input_ids"] == CHAT_IDS
    assert auto(MULTI_TURN)["input_ids"] == reference.encode(MULTI_TURN).ids
    before, after = MULTI_TURN.split("<|image_1|>")
    expected = reference.encode(before).ids + [-1] * IMAGE_TOKENS + reference.encode(after).ids
    assert expected[:4] == [1, 32006, 29871, 13] and expected[-3:] == [32001, 29871, 13]  # <|system|> ▁ \n ...
    assert ours.encode(MULTI_TURN, [IMAGE_TOKENS])[0] == expected
    saved, original = (json.loads((f / "tokenizer.json").read_text()) for f in (folder, base))
    for part in TOKENIZER_JSON_PARTS:
        assert saved[part] == original[part], part


@pytest.mark.parametrize("folder", ["", "checkpoint-1"])
@pytest.mark.parametrize("mode", list(MODES))
def test_training_outputs_tokenize_as_the_base(trained, mode, folder, base, reference):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    output = trained(mode) / folder
    assert_tokenizes_as_the_base(output, base, reference)
    assert json.loads((output / "tokenizer_config.json").read_text())["tokenizer_class"] == MODES[mode][1]


def test_merged_models_tokenize_as_the_base(trained, base, reference, tmp_path):
    """--save_merged_model and `python -m phi3v.export`: both read the processor from the LoRA folder."""
    from phi3v.serve.export import main as export_main

    lora = trained("lora")
    for merged in (lora / "merged", export_main([str(lora), str(tmp_path / "merged"), "--dtype", "float32"])):
        assert_tokenizes_as_the_base(merged, base, reference)
        assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"


def test_a_lora_folder_written_before_the_fix_loads_as_the_base(base, reference, tmp_path):
    """Such a folder holds the base's tokenizer.json but names "LlamaTokenizer" and has no config.json; our loader
    reads tokenizer.json as it is (plain AutoTokenizer on it still rebuilds: see phi3v.processing)."""
    folder = tmp_path / "old-lora"
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("config.json", "model.safetensors"))
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    processor = Phi3VProcessor.from_pretrained(folder)
    assert processor(CHAT)["input_ids"][0].tolist() == CHAT_IDS
    before, after = MULTI_TURN.split("<|image_1|>")
    assert processor.encode(MULTI_TURN, [IMAGE_TOKENS])[0] == \
        reference.encode(before).ids + [-1] * IMAGE_TOKENS + reference.encode(after).ids
