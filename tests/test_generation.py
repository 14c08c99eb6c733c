"""Batched evaluation generation against a plain greedy loop, one prompt at a time, without a cache."""

from __future__ import annotations

import torch

from phi3v.data.conversation import Conversation, Turn
from phi3v.data.dataset import ConversationDataset
from phi3v.eval.generation import generate_predictions
from tests.conftest import make_image


def prompts(processor) -> ConversationDataset:
    """Prompts of very different lengths (text only, one image, two images) so that a batch needs padding."""
    conversations = [Conversation("short", [Turn("Hi?", "yes")]),
                     Conversation("image", [Turn("Which class is this video?", "Archery", [make_image(400, 300)])]),
                     Conversation("two", [Turn("Same?", "no", [make_image(336, 336, seed=1), make_image(200, 500)])]),
                     Conversation("long", [Turn("Describe the picture in detail, " * 6, "ok")])]
    return ConversationDataset(conversations, lambda c: c, processor, for_generation=True)


@torch.no_grad()
def greedy_alone(model, processor, example, max_new_tokens):
    ids = example["input_ids"][None]
    images = {} if example.get("pixel_values") is None else {
        "pixel_values": example["pixel_values"], "image_sizes": example["image_sizes"]}
    new = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=ids, **images).logits[0, -1].argmax())
        if token in processor.end_token_ids():
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return processor.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_batched_predictions_equal_one_prompt_at_a_time(tiny_model, processor):
    dataset = prompts(processor)
    batched = generate_predictions(tiny_model, dataset, batch_size=4, max_new_tokens=6, disable_tqdm=True)
    expected = [greedy_alone(tiny_model, processor, dataset[i], 6) for i in range(len(dataset))]
    assert [r["prediction"] for r in batched] == expected
    assert [r["id"] for r in batched] == ["short", "image", "two", "long"]
    assert [r["reference"] for r in batched] == ["yes", "Archery", "no", "ok"]
    assert any(expected)  # something was generated for the comparison to mean anything
