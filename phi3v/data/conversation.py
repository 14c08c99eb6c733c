"""Conversations -> training sequences: one chat template, one processor call, every assistant turn supervised.

A conversation is a list of turns (user text, its images, an answer); image tags are numbered across it:

    <|user|>\\n<|image_1|><|image_2|>\\nSame animal?<|end|>\\n<|assistant|>\\nyes<|end|>\\n<|user|>\\n<|image_3|>\\n
    And here?<|end|>\\n<|assistant|>\\nno<|end|>\\n<|endoftext|>
                                               ^^^^^^^^^^^^^^                            ^^^^^^^^^^^^^^^^^^^^^^^^^^

Labels are the token ids under the marked spans and -100 elsewhere; spans are found on the rendered text and mapped
to tokens through the tokenizer's offsets, so this holds for any tokenizer and chat template.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field

from phi3v.data.images import ImageRef
from phi3v.models.family import IGNORE_INDEX, IMAGE_TAG

logger = logging.getLogger(__name__)
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>")  # never inside message text
ANY_CASE_IMAGE_TAG = re.compile(IMAGE_TAG.pattern, re.IGNORECASE)


@dataclass
class Problem:
    """A reason a sample cannot be used, with where it is: "ucf101_train.jsonl:12" or "train row 41"."""

    where: str
    sample_id: str | None
    message: str

    def __str__(self) -> str:
        sample = f" (id {self.sample_id})" if self.sample_id is not None else ""
        return f"{self.where}{sample}: {self.message}"


@dataclass
class Turn:
    user: str
    assistant: str | None
    images: list[ImageRef] = field(default_factory=list)


@dataclass
class Conversation:
    id: str
    turns: list[Turn]
    system: str | None = None  # rendered first, as the chat template renders a "system" message; never supervised


# ------------------------------------------------------------------------------------------------- rendering


def user_content(turn: Turn, first_image: int) -> str:
    """The user message with image tags numbered from `first_image`: the turn's own tags <|image_1|>..<|image_m|>
    renumbered, or, when the text has none, all of them in front as the original scripts do ("<|image_1|>\\n...")."""
    local = [int(k) for k in IMAGE_TAG.findall(turn.user)]
    if not local:
        return "".join(f"<|image_{first_image + k}|>" for k in range(len(turn.images))) + "\n" + turn.user \
            if turn.images else turn.user
    if not turn.images:
        raise ValueError(f"the user text has image tags {local} but the turn has no images: remove the tags "
                         "or list the images")
    if local != list(range(1, len(turn.images) + 1)):
        raise ValueError(f"the user text has image tags {local} but the turn has {len(turn.images)} image(s): "
                         f"tags must be <|image_1|> ... <|image_{len(turn.images)}|>, once each, in order")
    return IMAGE_TAG.sub(lambda m: f"<|image_{first_image + int(m.group(1)) - 1}|>", turn.user)


@functools.lru_cache(maxsize=8)
def special_tokens(tokenizer) -> tuple[str, ...]:
    """Every special token of the tokenizer (<s>, </s>, <unk>, <|end|>, <|placeholder1|>, ...): in message text each
    would become a control id instead of text."""
    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return tuple(sorted({*CHAT_TOKENS, *tokenizer.all_special_tokens, *added}, key=lambda t: (-len(t), t)))


def check_text(tokenizer, turn: int, role: str, text: str) -> None:
    """Refuse message text that would not mean what it says: special tokens, an image tag in an answer, text that
    is not valid Unicode, an empty answer."""
    found = [token for token in special_tokens(tokenizer) if token in text]
    if found:
        raise ValueError(f"turn {turn}: the {role} text contains {', '.join(found)}, which would break the chat "
                         "format; remove it from the data")
    if role == "assistant" and IMAGE_TAG.search(text):
        raise ValueError(f"turn {turn}: the assistant text contains {IMAGE_TAG.search(text).group(0)}: image tags "
                         "belong in the user text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"turn {turn}: the {role} text holds a lone surrogate {text[error.start]!r} at character "
                         f"{error.start} (not valid Unicode); fix the text's encoding") from None
    if role == "assistant" and not text.strip():
        raise ValueError(f"turn {turn}: the assistant answer is empty")


def tag_warnings(conversation: Conversation) -> list[str]:
    """Image tags in another case (<|Image_1|>): not tags, so they stay plain text; worth a warning."""
    return [f"turn {i}: {m.group(0)} is plain text, not an image tag (tags are lower case: <|image_{m.group(1)}|>)"
            for i, turn in enumerate(conversation.turns, start=1) if isinstance(turn.user, str)
            for m in ANY_CASE_IMAGE_TAG.finditer(turn.user) if not IMAGE_TAG.fullmatch(m.group(0))]


def render(processor, conversation: Conversation, for_generation: bool = False, by_prefixes: bool = False):
    """(text, images, supervised character spans). For generation, the last answer is left for the model.

    Turns are rendered one by one and joined (linear in the turns), confirmed by one render of the whole; a template
    that does not render message by message is applied to each prefix instead (`by_prefixes`)."""
    messages, images, spans, pieces = [], [], [], []
    turns, template = conversation.turns, processor.apply_chat_template
    if not turns:
        raise ValueError("the conversation has no turns")
    if conversation.system is not None:
        if not isinstance(conversation.system, str):
            raise ValueError(f"the system message must be a string, got {type(conversation.system).__name__}")
        found = [t for t in special_tokens(processor.tokenizer) if t in conversation.system]
        if found:
            raise ValueError(f"the system message contains {', '.join(found)}, which would break the chat format; "
                             "remove it from the data")
        messages.append({"role": "system", "content": conversation.system})
        pieces.append(template(messages))
    for i, turn in enumerate(turns):
        for role, text in (("user", turn.user), ("assistant", turn.assistant)):
            if isinstance(text, str):
                check_text(processor.tokenizer, i + 1, role, text)
        user = {"role": "user", "content": user_content(turn, len(images) + 1)}
        messages.append(user)
        images += turn.images
        if by_prefixes:  # each piece is the whole conversation so far
            pieces = []
        prompt = template(messages if by_prefixes else [user], add_generation_prompt=True)
        if for_generation and i == len(turns) - 1:
            pieces.append(prompt)
            break
        if not isinstance(turn.assistant, str):
            raise ValueError(f"turn {i + 1} has no assistant answer")
        messages.append({"role": "assistant", "content": turn.assistant})
        pair = template(messages if by_prefixes else messages[-2:])
        if not pair.startswith(prompt):
            raise ValueError("the chat template does not render the answer after the generation prompt")
        start = sum(map(len, pieces))  # a sum of numbers per turn: cheap next to rendering
        spans.append((start + len(prompt), start + len(pair)))
        pieces.append(pair)
    text = "".join(pieces)
    if not by_prefixes and text != template(messages, add_generation_prompt=for_generation):
        return render(processor, conversation, for_generation, by_prefixes=True)
    if for_generation:
        return text, images, []
    text += processor.tokenizer.eos_token  # <|endoftext|> ends the document, as in the original targets
    spans[-1] = (spans[-1][0], len(text))
    return text, images, spans


def labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token id where the token lies inside a supervised span, else -100 (placeholders and BOS never count)."""
    return [token if token >= 0 and end > start and any(a <= start and end <= b for a, b in spans) else IGNORE_INDEX
            for token, (start, end) in zip(ids, offsets)]
