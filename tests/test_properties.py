"""Property-based tests: random image sizes, modes, tag layouts and conversation shapes never give misaligned
placeholders or labels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from phi3v.data.conversation import Conversation, Turn
from phi3v.data.dataset import ConversationDataset
from phi3v.models.phi3_v.collator import Phi3VCollator
from phi3v.models.phi3_v.image_processing import CROP, hd_sizes, num_image_tokens

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])
MODES = ["RGB", "L", "RGBA", "P", "CMYK", "LA", "1"]
TEXT = st.text(alphabet=st.sampled_from(list("abc XYZ?.\n,é0123456789")), max_size=30)
ANSWER = TEXT.filter(str.strip)  # an empty answer is refused (nothing to learn)


@st.composite
def images(draw):
    width, height = draw(st.integers(1, 2400)), draw(st.integers(1, 2400))
    colour = draw(st.integers(0, 255))
    return Image.new("L", (width, height), colour).convert(draw(st.sampled_from(MODES)))


@st.composite
def prompts(draw):
    """Text with <|image_1|> ... <|image_n|> at random places (including the very start and end)."""
    count = draw(st.integers(0, 3))
    pieces = [draw(TEXT) for _ in range(count + 1)]
    text = pieces[0] + "".join(f"<|image_{k + 1}|>{pieces[k + 1]}" for k in range(count))
    return text, [draw(images()) for _ in range(count)]


@st.composite
def conversations(draw):
    turns = [Turn(draw(TEXT), draw(ANSWER), draw(st.lists(images(), max_size=2)))
             for _ in range(draw(st.integers(1, 3)))]
    return Conversation(draw(st.text(alphabet="abc123", min_size=1, max_size=5)), turns)


@SETTINGS
@given(prompt=prompts(), num_crops=st.sampled_from([1, 4, 16]))
def test_processor_placeholders_match_the_images(processor, prompt, num_crops):
    text, image_list = prompt
    processor.image_processor.num_crops = num_crops
    try:
        out = processor(text, image_list)
    finally:
        processor.image_processor.num_crops = 4
    ids = out["input_ids"][0].tolist()
    for k, image in enumerate(image_list, start=1):
        positions = [i for i, token in enumerate(ids) if token == -k]
        assert len(positions) == num_image_tokens(*image.size, num_crops)
        assert positions == list(range(positions[0], positions[0] + len(positions)))  # one contiguous block
        assert ids[positions[-1] + 1] == 1  # followed by a BOS
        padded_w, padded_h = hd_sizes(*image.size, num_crops)[1]
        assert out["image_sizes"][k - 1].tolist() == [padded_h, padded_w]
        rows, cols = padded_h // CROP, padded_w // CROP
        assert (out["pixel_values"][k - 1, 1 + rows * cols:] == 0).all()
    assert min(ids) >= -len(image_list)
    assert ids.count(1) == 1 + len(image_list)  # the leading BOS and one after every image block


@SETTINGS
@given(conversation=conversations())
def test_labels_never_cover_prompts_or_images(processor, conversation):
    example = ConversationDataset([conversation], lambda c: c, processor)[0]
    ids, labels = example["input_ids"], example["labels"]
    assert ids.shape == labels.shape
    supervised = labels != -100
    assert torch.equal(labels[supervised], ids[supervised])
    assert (ids[supervised] >= 0).all() and not (ids[supervised] == 1).any()
    all_images = [image for turn in conversation.turns for image in turn.images]
    assert int((ids < 0).sum()) == sum(num_image_tokens(*image.size, 4) for image in all_images)
    # one supervised run per answer (the last one runs to <|endoftext|>), each ending in <|end|> + newline
    starts = [i for i in range(len(labels)) if supervised[i] and (i == 0 or not supervised[i - 1])]
    assert len(starts) == len(conversation.turns)
    assert labels[-1].item() == processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (ids == processor.tokenizer.convert_tokens_to_ids("<|end|>"))[supervised].sum() == len(conversation.turns)


@SETTINGS
@given(batch=st.lists(conversations(), min_size=1, max_size=4))
def test_collated_batches_keep_every_example_aligned(processor, batch):
    dataset = ConversationDataset(batch, lambda c: c, processor)
    examples = [dataset[i] for i in range(len(batch))]
    collated = Phi3VCollator(processor.tokenizer.pad_token_id)(examples)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        assert torch.equal(collated["input_ids"][row, :length], example["input_ids"])
        assert torch.equal(collated["labels"][row, :length], example["labels"])
        assert (collated["labels"][row, length:] == -100).all()
        assert collated["attention_mask"][row].sum() == length
    sizes = [e["image_sizes"] for e in examples if "image_sizes" in e]
    if sizes:
        assert torch.equal(collated["image_sizes"], torch.cat(sizes))
        assert collated["pixel_values"].shape[0] == sum(len(s) for s in sizes)
        grids = (collated["image_sizes"][:, 0] // CROP) * (collated["image_sizes"][:, 1] // CROP)
        assert collated["pixel_values"].shape[1] == 1 + int(grids.max())
    else:
        assert "pixel_values" not in collated
    assert int((collated["input_ids"] < 0).sum()) == sum(int((e["input_ids"] < 0).sum()) for e in examples)


# 10x10 images at num_crops 4 are upscaled to a 2x2 grid: 757 tokens each (spec section 4, the 100x100 row).
# The spec's rule: every text chunk around the tags is tokenized with its own BOS, even an empty one (section 5).
@pytest.mark.parametrize("text,chunks", [("", [""]), ("<|image_1|>", ["", ""]),
                                         ("a<|image_1|>b<|image_2|>", ["a", "b", ""])])
def test_edge_prompts(processor, text, chunks):
    count = text.count("<|image_")
    out = processor(text, [Image.new("RGB", (10, 10))] * count)
    expected = []
    for k, chunk in enumerate(chunks):
        expected += processor.tokenizer(chunk)["input_ids"] + ([-(k + 1)] * 757 if k < count else [])
    assert processor.tokenizer("")["input_ids"] == [1]
    assert out["input_ids"][0].tolist() == expected
    assert out["attention_mask"][0].tolist() == [1] * len(expected)
