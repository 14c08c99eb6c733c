"""The validation loss: the token-weighted mean next-token loss over the evaluation set's answers, computed by hand
here from full logits (F.cross_entropy on every position whose next token is an answer token)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phi3v.data.conversation import Conversation, Turn
from phi3v.data.dataset import ConversationDataset
from phi3v.eval.loss import evaluation_loss
from tests.conftest import make_image

CONVERSATIONS = [
    Conversation("a", [Turn("Colour?", ["red", "Red"], [make_image(400, 300)])]),  # several references: the first
    Conversation("b", [Turn("Two?", "yes", [make_image(336, 336, seed=1), make_image(200, 500)])]),
    Conversation("c", [Turn("First?", "one"), Turn("And the text only one?", "a longer answer here")]),
    Conversation("s", [Turn("Colour?", "blue", [make_image(300, 200, seed=2)])], system="Answer in one word."),
]


def by_hand(model, processor) -> float:
    """Sum of -log p(answer token) over every answer token of every conversation, divided by their number."""
    total, count = 0.0, 0
    for conversation in CONVERSATIONS:
        last = conversation.turns[-1]
        answer = last.assistant[0] if isinstance(last.assistant, list) else last.assistant
        whole = Conversation(conversation.id, [*conversation.turns[:-1], Turn(last.user, answer, last.images)],
                             conversation.system)  # as training renders it: the system prompt included
        example = ConversationDataset([whole], lambda c: c, processor)[0]
        with torch.no_grad():
            logits = model(input_ids=example["input_ids"][None], pixel_values=example.get("pixel_values"),
                           image_sizes=example.get("image_sizes"), logits_to_keep=0).logits[0]
        targets = example["labels"][1:]
        keep = targets != -100
        total += F.cross_entropy(logits[:-1][keep].double(), targets[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_evaluation_loss_is_the_token_weighted_mean(batch_size, tiny_model, processor):
    dataset = ConversationDataset(CONVERSATIONS, lambda c: c, processor, for_generation=True)
    got = evaluation_loss(tiny_model, dataset, batch_size=batch_size)
    assert got == pytest.approx(by_hand(tiny_model, processor), rel=1e-5)


def test_examples_without_a_usable_reference_are_left_out(tiny_model, processor):
    broken = Conversation("d", [Turn("Who?", None)])
    dataset = ConversationDataset([*CONVERSATIONS, broken], lambda c: c, processor, for_generation=True)
    assert evaluation_loss(tiny_model, dataset, batch_size=2) == pytest.approx(by_hand(tiny_model, processor),
                                                                               rel=1e-5)
    assert evaluation_loss(tiny_model, ConversationDataset([broken], lambda c: c, processor, for_generation=True),
                           batch_size=2) is None


def test_the_loss_runs_in_the_training_precision(tiny_model, processor):
    """With bf16 training the forward passes run under bf16 autocast (fp32 master weights stay fp32), and the
    result is close to the fp32 loss."""
    dataset = ConversationDataset(CONVERSATIONS, lambda c: c, processor, for_generation=True)
    seen = []
    hook = tiny_model.register_forward_pre_hook(lambda *args: seen.append(torch.get_autocast_dtype("cpu")
                                                                          if torch.is_autocast_enabled("cpu")
                                                                          else None))
    try:
        got = evaluation_loss(tiny_model, dataset, batch_size=3, autocast_dtype=torch.bfloat16)
    finally:
        hook.remove()
    assert seen == [torch.bfloat16, torch.bfloat16]  # batches of 3 and 1
    assert next(tiny_model.parameters()).dtype == torch.float32
    assert got == pytest.approx(by_hand(tiny_model, processor), rel=0.05)


def test_the_loss_examples_are_the_training_examples(processor):
    """Each evaluation example enters the loss as training renders it, its system prompt included (the random tiny
    model's loss is near ln(vocabulary) whatever the context, so this is checked on the tokens, not the value)."""
    from phi3v.eval.loss import LossShard

    shard = LossShard(ConversationDataset(CONVERSATIONS, lambda c: c, processor, for_generation=True), 0, 1)
    for position, conversation in enumerate(CONVERSATIONS):
        last = conversation.turns[-1]
        answer = last.assistant[0] if isinstance(last.assistant, list) else last.assistant
        whole = Conversation(conversation.id, [*conversation.turns[:-1], Turn(last.user, answer, last.images)],
                             conversation.system)
        expected = ConversationDataset([whole], lambda c: c, processor)[0]
        assert torch.equal(shard[position]["input_ids"], expected["input_ids"]), conversation.id
        assert torch.equal(shard[position]["labels"], expected["labels"]), conversation.id
    assert processor.decode(shard[3]["input_ids"][:2]) == "<s><|system|>"
