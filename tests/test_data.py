"""Conversations -> input_ids / labels, checked against sequences assembled by hand; collator padding contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v.data.conversation import Conversation, Turn, render, user_content
from phi3v.data.dataset import ConversationDataset
from phi3v.data.images import image_size, open_image
from phi3v.data.jsonl import jsonl_dataset
from phi3v.models.phi3_v.collator import Phi3VCollator
from tests.conftest import make_image


def identity(conversation):
    return conversation


def dataset_of(processor, conversations, for_generation=False):
    return ConversationDataset(conversations, identity, processor, for_generation=for_generation)


def segment(processor, text):
    """Tokens of text between special tokens (the tokenizer normalizes each such segment on its own)."""
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def special(processor, token):
    return [processor.tokenizer.convert_tokens_to_ids(token)]


def test_multi_turn_multi_image_labels_by_hand(processor):
    images = [make_image(640, 480), make_image(336, 336, seed=1), make_image(2000, 500, seed=2)]
    conversation = Conversation("c1", [Turn("Same animal?", "yes", images[:2]), Turn("And here?", "no", images[2:])])
    example = dataset_of(processor, [conversation])[0]
    s = lambda t: special(processor, t)  # noqa: E731
    seg = lambda t: segment(processor, t)  # noqa: E731
    bos = [1]
    answer_yes, answer_no = seg("\nyes")[len(seg("\n")):], seg("\nno")[len(seg("\n")):]
    assert seg("\nyes") == seg("\n") + answer_yes  # the answer's tokens do not merge with the newline before it
    n1, n2, n3 = 757, 757, 745
    # "<|user|>\n<|image_1|><|image_2|>\nSame animal?<|end|>\n<|assistant|>\nyes<|end|>\n<|user|>\n<|image_3|>\n..."
    parts = [  # (tokens, supervised?)
        (bos + s("<|user|>") + seg("\n"), False), ([-1] * n1, False), (bos, False), ([-2] * n2, False),
        (bos + seg("\nSame animal?") + s("<|end|>") + seg("\n") + s("<|assistant|>") + seg("\n"), False),
        (answer_yes + s("<|end|>") + seg("\n"), True),
        (s("<|user|>") + seg("\n"), False), ([-3] * n3, False),
        (bos + seg("\nAnd here?") + s("<|end|>") + seg("\n") + s("<|assistant|>") + seg("\n"), False),
        (answer_no + s("<|end|>") + seg("\n") + s("<|endoftext|>"), True),
    ]
    expected_ids = [t for tokens, _ in parts for t in tokens]
    expected_labels = [t if supervised else -100 for tokens, supervised in parts for t in tokens]
    assert example["input_ids"].tolist() == expected_ids
    assert example["labels"].tolist() == expected_labels
    assert example["pixel_values"].shape == (3, 5, 3, 336, 336)
    assert example["image_sizes"].tolist() == [[672, 672], [672, 672], [336, 1344]]


def test_image_tags_number_across_the_conversation():
    turns = [Turn("a", "x", ["i1", "i2"]), Turn("<|image_1|> vs before", "y", ["i3"]), Turn("text only", "z")]
    assert user_content(turns[0], 1) == "<|image_1|><|image_2|>\na"
    assert user_content(turns[1], 3) == "<|image_3|> vs before"
    assert user_content(turns[2], 4) == "text only"
    with pytest.raises(ValueError, match="tags must be"):
        user_content(Turn("<|image_2|>", "x", ["i1"]), 1)


def test_prompt_for_generation_matches_training_prefix(processor):
    images = [make_image(300, 200)]
    conversation = Conversation("c", [Turn("What?", "A dog", images)])
    train = dataset_of(processor, [conversation])[0]
    prompt = dataset_of(processor, [conversation], for_generation=True)[0]
    length = len(prompt["input_ids"])
    assert torch.equal(train["input_ids"][:length], prompt["input_ids"])  # what is trained is what is asked
    assert (train["labels"][:length] == -100).all() and (train["labels"][length:] != -100).all()
    assert prompt["reference"] == "A dog"
    text, _, spans = render(processor, conversation, for_generation=True)
    assert text.endswith("<|assistant|>\n") and spans == []


def test_text_only_conversation(processor):
    example = dataset_of(processor, [Conversation("t", [Turn("Say hi.", "hi")])])[0]
    assert "pixel_values" not in example and "image_sizes" not in example
    answer = segment(processor, "\nhi")[len(segment(processor, "\n")):]
    expected = answer + special(processor, "<|end|>") + segment(processor, "\n") + special(processor, "<|endoftext|>")
    assert example["labels"][example["labels"] != -100].tolist() == expected


def test_num_tokens_without_decoding(processor, tmp_path):
    path = tmp_path / "a.png"
    make_image(1920, 1080).save(path)
    dataset = dataset_of(processor, [Conversation("x", [Turn("Describe.", "ok", [path])])])
    assert dataset.num_tokens(0) == len(dataset[0]["input_ids"])


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((100, 300, 3), dtype=np.uint8)).save(path, exif=exif)
    assert Image.open(path).size == (300, 100)
    assert open_image(path).size == (100, 300)
    assert image_size(path) == (100, 300)


def test_collator_right_padding_for_training(processor):
    a = {"input_ids": torch.tensor([1, 5, 32000]), "labels": torch.tensor([-100, 5, 32000]), "sample_id": "a",
         "pixel_values": None, "image_sizes": None}
    b = {"input_ids": torch.tensor([1, -1, -1, 7, 8]), "labels": torch.tensor([-100, -100, -100, 7, 8]),
         "sample_id": "b", "pixel_values": torch.ones(1, 5, 3, 336, 336), "image_sizes": torch.tensor([[336, 672]])}
    c = {"input_ids": torch.tensor([1, -1, 9]), "labels": torch.tensor([-100, -100, 9]), "sample_id": "c",
         "pixel_values": torch.full((1, 5, 3, 336, 336), 2.0), "image_sizes": torch.tensor([[336, 336]])}
    batch = Phi3VCollator(pad_token_id=32000)([a, b, c])
    assert batch["input_ids"].tolist() == [[1, 5, 32000, 32000, 32000], [1, -1, -1, 7, 8], [1, -1, 9, 32000, 32000]]
    # the real <|endoftext|> (= pad id) at the end of `a` is attended to; the padding after it is not
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 32000, -100, -100], [-100, -100, -100, 7, 8],
                                        [-100, -100, 9, -100, -100]]
    # images in example order; crops beyond the largest real grid (1x2 -> 3 crops) are dropped
    assert batch["pixel_values"].shape == (2, 3, 3, 336, 336)
    assert batch["pixel_values"][:, 0, 0, 0, 0].tolist() == [1.0, 2.0]
    assert batch["image_sizes"].tolist() == [[336, 672], [336, 336]]
    assert batch["sample_ids"] == ["a", "b", "c"]


def test_collator_left_padding_for_generation():
    examples = [{"input_ids": torch.tensor([1, 2]), "sample_id": "a", "reference": "x", "pixel_values": None},
                {"input_ids": torch.tensor([1, 2, 3, 4]), "sample_id": "b", "reference": "y", "pixel_values": None}]
    batch = Phi3VCollator(pad_token_id=0, padding_side="left")(examples)
    assert batch["input_ids"].tolist() == [[0, 0, 1, 2], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert "labels" not in batch and "pixel_values" not in batch and batch["references"] == ["x", "y"]


def test_padded_batch_gives_the_same_loss_as_single_examples(tiny_model, processor):
    images = [make_image(500, 400), make_image(200, 600, seed=3)]
    conversations = [Conversation("a", [Turn("Colour?", "red", images[:1])]),
                     Conversation("b", [Turn("Hi", "hello there")]),
                     Conversation("c", [Turn("Both?", "yes", images)])]
    examples = [dataset_of(processor, conversations)[i] for i in range(3)]
    collate = Phi3VCollator(processor.tokenizer.pad_token_id)
    with torch.no_grad():
        batched = tiny_model(**{k: v for k, v in collate(examples).items() if k != "sample_ids"}).loss
        sums = counts = 0
        for example in examples:
            single = {k: v for k, v in collate([example]).items() if k != "sample_ids"}
            n = (single["labels"][:, 1:] != -100).sum()
            sums, counts = sums + tiny_model(**single).loss * n, counts + n
    assert torch.allclose(batched, sums / counts, atol=1e-5)


def test_jsonl_dataset_reads_our_schema(processor, tmp_path):
    (tmp_path / "images").mkdir()
    make_image(320, 240).save(tmp_path / "images" / "f0.jpg")
    record = {"id": "train-0", "source": "demo", "conversations": [
        {"images": ["f0.jpg"], "user": "Which class?", "assistant": "Archery"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n\n" + "{not json\n")
    dataset = jsonl_dataset(tmp_path / "d.jsonl", tmp_path / "images", processor)
    assert len(dataset) == 1 and dataset.where(0) == "d.jsonl:1"
    assert [str(p) for p in dataset.load_problems] == ["d.jsonl:3: malformed JSON: Expecting property name enclosed "
                                                       "in double quotes at column 2"]
    assert dataset[0]["sample_id"] == "train-0"
