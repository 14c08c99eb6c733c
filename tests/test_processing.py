"""Phi3VProcessor: placeholders, BOS after every image, tag checks, tokenizer ids and chat template."""

from __future__ import annotations

import json

import pytest
import torch

from phi3v import Phi3VProcessor
from tests.conftest import make_image

BOS = 1


def tokens(processor, text):
    return processor.tokenizer(text)["input_ids"]  # with its BOS, like every chunk in the processor


def test_official_special_token_ids(processor):
    tok = processor.tokenizer
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006,
                "<|end|>": 32007, "<|user|>": 32010, "<|placeholder1|>": 32002, "<|placeholder6|>": 32009}
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 32000, 32000)
    assert processor.end_token_ids() == [32007, 32000]


def test_chat_template(processor):
    messages = [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
    )
    messages += [{"role": "assistant", "content": "A cat."}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True).endswith(
        "<|assistant|>\nA cat.<|end|>\n"
    )


def test_one_image(processor):
    prompt = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    out = processor(prompt, [make_image(640, 480)])
    expected = (tokens(processor, "<|user|>\n") + [-1] * 757
                + tokens(processor, "\nWhat is shown?<|end|>\n<|assistant|>\n"))
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert out["pixel_values"].shape == (1, 5, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[672, 672]]
    first = expected.index(-1)
    assert expected[first + 757] == BOS  # a BOS right after the image block


def test_two_images_and_image_at_the_ends(processor):
    prompt = "<|image_1|><|image_2|>\nSame?"
    out = processor(prompt, [make_image(2000, 500), make_image(336, 336)])
    ids = out["input_ids"][0].tolist()
    # empty chunks before, between the tags: each is a lone BOS
    assert ids == [BOS] + [-1] * 745 + [BOS] + [-2] * 757 + tokens(processor, "\nSame?")
    assert out["image_sizes"].tolist() == [[336, 1344], [672, 672]]
    ids = processor("<|image_1|>", [make_image(100, 100)])["input_ids"][0].tolist()
    assert ids == [BOS] + [-1] * 757 + [BOS]


def test_text_only(processor):
    out = processor("<|user|>\nHello<|end|>\n<|assistant|>\n")
    assert out["input_ids"].tolist() == [tokens(processor, "<|user|>\nHello<|end|>\n<|assistant|>\n")]
    assert set(out) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("prompt,num_images,message", [
    ("<|image_1|>", 0, "no images were given"),
    ("hello", 1, "no image tags but 1 image"),
    ("<|image_1|>", 2, "<|image_1|> but 2 image"),
    ("<|image_2|><|image_1|>", 2, "increasing order"),
    ("<|image_1|><|image_1|>", 1, "exactly once"),
    ("<|image_1|><|image_3|>", 2, "<|image_1|>, <|image_3|>"),
])
def test_mismatched_tags_raise(processor, prompt, num_images, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|")):
        processor(prompt, [make_image(50, 50)] * num_images)


def test_num_tokens_without_pixels(processor):
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    images = [make_image(1920, 1080), make_image(500, 2000)]
    assert processor.num_tokens(prompt, [im.size for im in images]) == processor(prompt, images)["input_ids"].shape[1]


def test_offsets_cover_the_text(processor):
    prompt = "<|user|>\n<|image_1|>\nName it.<|end|>\n<|assistant|>\nA dog<|end|>"
    out = processor(prompt, [make_image(336, 336)], return_offsets_mapping=True)
    spans = out["offset_mapping"][0].tolist()
    ids = out["input_ids"][0].tolist()
    assert len(spans) == len(ids)
    tag = prompt.index("<|image_1|>")
    assert {tuple(s) for s, i in zip(spans, ids) if i < 0} == {(tag, tag + len("<|image_1|>"))}
    answer = prompt.index("A dog")
    answer_ids = [i for s, i in zip(spans, ids) if s[0] >= answer and s[1] <= answer + len("A dog")]
    assert processor.decode(answer_ids) == "A dog"


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # no config.json here: a name transformers 5 reads as tokenizer.json as it is (tests/test_saved_tokenizers.py)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|assistant|>" in config["chat_template"]
    assert not (tmp_path / "processor_config.json").exists()  # without auto_map it misleads 4.x (layout.py)
    loaded = Phi3VProcessor.from_pretrained(tmp_path, num_crops=16)
    assert loaded.num_crops == 16
    prompt = "<|image_1|>\nHi"
    assert torch.equal(loaded("Hi")["input_ids"], processor("Hi")["input_ids"])
    assert loaded(prompt, [make_image(640, 480)])["pixel_values"].shape == (1, 17, 3, 336, 336)


def test_hub_id_offline_says_pass_a_local_directory():
    with pytest.raises(OSError, match="pass the local directory"):
        Phi3VProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct")
