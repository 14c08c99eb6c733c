"""Conversations -> training sequences: one chat template, one processor call, every assistant turn supervised.

A conversation (from a jsonl line or a hub row) is a list of turns, each with a user text, its images and an
answer. Image tags are numbered across the whole conversation, so turn 2's first image is <|image_3|> when turn 1
had two:

    <|user|>\\n<|image_1|><|image_2|>\\nSame animal?<|end|>\\n<|assistant|>\\nyes<|end|>\\n<|user|>\\n<|image_3|>\\n
    And here?<|end|>\\n<|assistant|>\\nno<|end|>\\n<|endoftext|>
                                               ^^^^^^^^^^^^^^                            ^^^^^^^^^^^^^^^^^^^^^^^^^^

Labels are the token ids under the marked spans (each answer with its <|end|>, and <|endoftext|> at the end) and
-100 everywhere else: prompts, image placeholders, BOS tokens and padding. Spans are found on the rendered text
and mapped to tokens through the tokenizer's offsets, so this holds for any tokenizer and chat template.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from phi3v.errors import Unavailable, UserError, require_regular_file
from phi3v.processing import IMAGE_TAG, Phi3VProcessor
from phi3v.video import VideoFrame, frame_size, open_frame, video_frames

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>")  # never inside message text
ANY_CASE_IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>", re.IGNORECASE)
ImageRef = str | os.PathLike | bytes | Image.Image | VideoFrame  # a file, encoded bytes (hub datasets), a decoded
# image, or one of the evenly spaced frames of a video file (decoded on access)


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


# ------------------------------------------------------------------------------------------------- images


def open_image(ref: ImageRef, max_pixels: int | None = None, decode: bool = True) -> Image.Image:
    """Open an image reference with EXIF orientation applied; `decode=False` reads only the header (for sizes)."""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, VideoFrame):
        return open_frame(ref)
    if not isinstance(ref, bytes):
        require_regular_file(ref)
    image = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ValueError(f"image of {image.width}x{image.height} pixels exceeds the limit of {max_pixels:,} pixels "
                         "(raise --max_image_pixels if it is genuine)")
    if not decode:
        return image
    image.load()  # decode now: a truncated or corrupt file fails here, not deep inside a worker
    return to_8_bit(ImageOps.exif_transpose(image))


def to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (PNG "I;16", or "I") scaled to 8 bits: `convert("RGB")` would clip it to almost all white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.round(pixels / 257).astype(np.uint8), "L")
    return image


def image_size(ref: ImageRef) -> tuple[int, int]:
    """(width, height) as the model will see it (after EXIF rotation), from the header only."""
    if isinstance(ref, VideoFrame):
        return frame_size(ref)
    image = open_image(ref, decode=False)
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def resolve_image_path(root: str | os.PathLike, relative: str) -> Path:
    """`root / relative`, refusing absolute paths and anything (`..`, symlinks) that resolves outside `root`."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"image path must be a non-empty string, got {relative!r}")
    if os.path.isabs(relative):
        raise ValueError(f"image path {relative!r} is absolute; paths must be relative to the image root")
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image path {relative!r} resolves to {path}, outside the image root {root}")
    return path


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


def render(processor: Phi3VProcessor, conversation: Conversation, for_generation: bool = False):
    """(text, images, supervised character spans). For generation, the last answer is left for the model.

    Each turn is rendered on its own and the pieces joined, which one render of the whole conversation confirms
    (linear in the number of turns); a template that does not render message by message is applied to each prefix.
    """
    messages, images, spans, pieces = [], [], [], []
    turns = conversation.turns
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
        pieces.append(processor.apply_chat_template(messages))
    template = processor.apply_chat_template
    for i, turn in enumerate(turns):
        for role, text in (("user", turn.user), ("assistant", turn.assistant)):
            if isinstance(text, str):
                check_text(processor.tokenizer, i + 1, role, text)
        user = {"role": "user", "content": user_content(turn, len(images) + 1)}
        messages.append(user)
        images += turn.images
        if for_generation and i == len(turns) - 1:
            pieces.append(template([user], add_generation_prompt=True))
            break
        if not isinstance(turn.assistant, str):
            raise ValueError(f"turn {i + 1} has no assistant answer")
        messages.append({"role": "assistant", "content": turn.assistant})
        prompt, pair = template([user], add_generation_prompt=True), template(messages[-2:])
        if not pair.startswith(prompt):
            raise ValueError("the chat template does not render the answer after the generation prompt")
        start = sum(map(len, pieces))  # a sum of numbers per turn: cheap next to rendering
        spans.append((start + len(prompt), start + len(pair)))
        pieces.append(pair)
    text = "".join(pieces)
    if text != template(messages, add_generation_prompt=for_generation):
        return render_by_prefixes(processor, conversation, for_generation)
    if for_generation:
        return text, images, []
    text += processor.tokenizer.eos_token  # <|endoftext|> ends the document, as in the original targets
    spans[-1] = (spans[-1][0], len(text))
    return text, images, spans


def render_by_prefixes(processor: Phi3VProcessor, conversation: Conversation, for_generation: bool):
    """`render` for any chat template: each answer's span is found by rendering the conversation up to it."""
    messages, images, spans = [], [], []
    if conversation.system is not None:
        messages.append({"role": "system", "content": conversation.system})
    for i, turn in enumerate(conversation.turns):
        messages.append({"role": "user", "content": user_content(turn, len(images) + 1)})
        images += turn.images
        if for_generation and i == len(conversation.turns) - 1:
            return processor.apply_chat_template(messages, add_generation_prompt=True), images, []
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": turn.assistant})
        text = processor.apply_chat_template(messages)
        if not text.startswith(prompt):
            raise ValueError("the chat template does not render the answer after the generation prompt")
        spans.append((len(prompt), len(text)))
    text += processor.tokenizer.eos_token
    spans[-1] = (spans[-1][0], len(text))  # the final <|endoftext|> is supervised too
    return text, images, spans


def labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token id where the token lies inside a supervised span, else -100 (placeholders and BOS never count)."""
    labels = []
    for token, (start, end) in zip(ids, offsets):
        inside = token >= 0 and end > start and any(a <= start and end <= b for a, b in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return labels


# ------------------------------------------------------------------------------------------------- dataset


class ConversationDataset(torch.utils.data.Dataset):
    """Items (jsonl records, hub rows, ...) turned into model inputs on access, so decoding and processing run in
    DataLoader workers.

    Args:
        items: any sequence; `to_conversation(item)` makes a Conversation of it (and raises ValueError on bad data).
            Both must pickle (module-level functions, functools.partial) where DataLoader workers are spawned.
        where: names of the items for messages, e.g. "ucf101_train.jsonl:12" (default "item 0", "item 1", ...).
        for_generation: examples are prompts (last answer removed) with a `reference` answer, for evaluation.
        load_problems: problems found while reading the source (e.g. malformed jsonl lines), reported by validation.
    """

    def __init__(self, items: Sequence, to_conversation: Callable[[object], Conversation], processor: Phi3VProcessor,
                 where: list[str] | None = None, for_generation: bool = False, max_image_pixels: int | None = None,
                 load_problems: list[Problem] | None = None):
        self.items = items
        self.to_conversation = to_conversation
        self.processor = processor
        self.names = where if where is not None else [f"item {i}" for i in range(len(items))]
        self.for_generation = for_generation
        self.max_image_pixels = max_image_pixels
        self.load_problems = load_problems or []
        self.lengths: list[int] | None = None  # token counts, set by validation
        self.sources: list[str] = []  # files the items come from (keys the validation cache), set by the loaders

    def __len__(self) -> int:
        return len(self.items)

    def where(self, index: int) -> str:
        return self.names[index]

    def conversation(self, index: int) -> Conversation:
        return self.to_conversation(self.items[index])

    def subset(self, indices: Sequence[int]) -> ConversationDataset:
        return ConversationDataset([self.items[i] for i in indices], self.to_conversation, self.processor,
                                   [self.names[i] for i in indices], self.for_generation, self.max_image_pixels)

    def num_tokens(self, index: int) -> int:
        """Sequence length of item `index` from image headers and text alone (no pixels decoded)."""
        text, images, _ = render(self.processor, self.conversation(index), self.for_generation)
        return self.processor.num_tokens(text, [image_size(ref) for ref in images])

    def __getitem__(self, index: int) -> dict:
        conversation = self.conversation(index)
        text, refs, spans = render(self.processor, conversation, self.for_generation)
        images = [open_image(ref, self.max_image_pixels) for ref in refs]
        encoded = self.processor(text, images or None, return_offsets_mapping=True)
        example = {"input_ids": encoded["input_ids"][0], "sample_id": conversation.id,
                   "pixel_values": encoded.get("pixel_values"), "image_sizes": encoded.get("image_sizes")}
        if self.for_generation:
            example["reference"] = conversation.turns[-1].assistant
        else:
            labels = labels_from_spans(encoded["input_ids"][0].tolist(), encoded["offset_mapping"][0].tolist(), spans)
            example["labels"] = torch.tensor(labels, dtype=torch.long)
        return example


# ------------------------------------------------------------------------------------------------- jsonl format


class KeyCheck:
    """An `object_pairs_hook` for json.loads that notes the first key repeated within an object (JSON itself keeps
    only the last value, silently) as `problem`."""

    def __init__(self):
        self.problem: str | None = None

    def __call__(self, pairs: list[tuple[str, object]]) -> dict:
        record = dict(pairs)
        if len(record) < len(pairs) and self.problem is None:
            seen = set()
            key = next(key for key, _ in pairs if key in seen or seen.add(key))
            self.problem = (f"the key {json.dumps(key)} appears twice in one object (only the last value would be "
                            "read): keep one of them")
        return record


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(line number, record) for every parseable line, and (line number, error) for the others. A byte-order mark
    (Windows editors write one) is allowed; a key repeated within an object is not."""
    records, errors = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                errors.append((number, f"not valid UTF-8 (byte {error.start})"))
                continue
            if not line.strip():
                continue
            keys = KeyCheck()
            try:
                record = json.loads(line.strip(), object_pairs_hook=keys)
            except json.JSONDecodeError as error:
                errors.append((number, f"malformed JSON: {error.msg} at column {error.colno}"))
                continue
            except RecursionError:
                errors.append((number, "JSON nested too deeply to read (thousands of [ or {)"))
                continue
            if not isinstance(record, dict):
                errors.append((number, f"a line must be a JSON object, got {type(record).__name__}"))
                continue
            if keys.problem:
                errors.append((number, keys.problem))
                continue
            records.append((number, record))
    return records, errors


class SampleError(UserError, ValueError):
    """A bad sample whose id is known."""

    def __init__(self, message: str, sample_id):
        super().__init__(message)
        self.sample_id = None if sample_id is None else str(sample_id)


def conversation_from_record(record: dict, image_root: str | os.PathLike, num_frames: int = 8) -> Conversation:
    """Our jsonl schema: {"id", "source", "system" (optional), "conversations": [{"images": [paths], "videos": [paths]
    (optional; `num_frames` frames each, after the images), "user": str, "assistant": str}]}."""
    try:
        return parse_record(record, image_root, num_frames)
    except SampleError:
        raise
    except ValueError as error:
        raise SampleError(str(error), valid_id(record)) from error


def valid_id(record: dict) -> str | None:
    """The record's id if it is a valid one (to name the record in a problem), else None."""
    value = record.get("id")
    return value if isinstance(value, str) and value.strip() else None


def record_id(record: dict, default: str | None = None) -> str:
    """A record's "id": a non-empty string in every file format, as in ours (in JSON, 5 and "5" would both become
    "5"). Without the key, `default` (the record's place in its file) where the format makes the id optional."""
    if "id" not in record:
        if default is None:
            raise ValueError('missing key "id"')
        return default
    if valid_id(record) is None:
        value = record["id"]
        shown = "empty" if isinstance(value, str) else "null" if value is None else type(value).__name__
        raise ValueError(f'"id" must be a non-empty string, got {shown}')
    return record["id"]


def parse_record(record: dict, image_root: str | os.PathLike, num_frames: int = 8) -> Conversation:
    sample_id = record_id(record)
    if not isinstance(record.get("conversations"), list):
        raise ValueError('"conversations" must be a list of {"images", "user", "assistant"} objects')
    if not record["conversations"]:
        raise ValueError('"conversations" is empty')
    turns = []
    for number, turn in enumerate(record["conversations"], start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {number} must be an object")
        for key in ("user", "assistant"):
            if not isinstance(turn.get(key), str):
                raise ValueError(f'turn {number}: "{key}" must be a string'
                                 + (" (missing)" if key not in turn else f", got {type(turn[key]).__name__}"))
        images = turn.get("images", [])
        videos = turn.get("videos", [])
        for key, value in (("images", images), ("videos", videos)):
            if not isinstance(value, list):
                raise ValueError(f'turn {number}: "{key}" must be a list of relative paths')
        refs = [resolve_image_path(image_root, p) for p in images]
        refs += [frame for p in videos for frame in video_frames(resolve_image_path(image_root, p), num_frames)]
        turns.append(Turn(turn["user"], turn["assistant"], refs))
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f'"system" must be a string, got {type(system).__name__}')
    return Conversation(sample_id, turns, system)


def jsonl_item_conversation(item: tuple[int, dict], image_root: str | os.PathLike, num_frames: int = 8
                            ) -> Conversation:
    return conversation_from_record(item[1], image_root, num_frames)


def jsonl_dataset(path: str | os.PathLike, image_root: str | os.PathLike, processor: Phi3VProcessor,
                  for_generation: bool = False, max_image_pixels: int | None = None,
                  limit: int | None = None, num_frames: int = 8) -> ConversationDataset:
    """A dataset over a jsonl file in our schema, with images relative to `image_root`."""
    records, errors = read_jsonl(path)
    records = records[:limit] if limit is not None else records
    name = Path(path).name
    dataset = ConversationDataset(
        records, functools.partial(jsonl_item_conversation, image_root=image_root, num_frames=num_frames), processor,
        where=[f"{name}:{line}" for line, _ in records], for_generation=for_generation,
        max_image_pixels=max_image_pixels,
        load_problems=[Problem(f"{name}:{line}", None, message) for line, message in errors],
    )
    dataset.sources = [str(path)]
    return dataset


# ------------------------------------------------------------------------------------------------- hub datasets


def load_hf_split(hub_id: str, config: str | None, split: str, local_path: str | None = None,
                  columns: Sequence[str] = ()):
    """One split of a hub dataset, or of a local copy of it: a `save_to_disk` folder or a folder of parquet files in
    the hub layout (e.g. `data/train-00000-of-00001.parquet` or `docvqa/train-*.parquet`). Images stay encoded
    (`decode=False`) so that sizes can be read from headers and decoding happens in DataLoader workers.

    `split` may carry a row range the way the hub does, e.g. "train[500:]" or "train[:500]"; the split must have
    those rows, and every name in `columns`.
    """
    import datasets

    base, rows = split.split("[")[0], split[len(split.split("[")[0]):]
    if local_path is None:
        try:
            dataset = datasets.load_dataset(hub_id, config, split=base)
        except Exception as error:  # offline, or no such dataset: the user's way out is a local copy
            raise Unavailable(f"could not load the hub dataset {hub_id}" + (f" ({config})" if config else "")
                          + f": {str(error).splitlines()[0][:200]}. Offline? Save a copy where the hub is reachable "
                          "(datasets.load_dataset(...).save_to_disk(DIR), or download its parquet files) and pass "
                          "--dataset_path DIR.") from error
    elif (Path(local_path) / "dataset_dict.json").exists() or (Path(local_path) / "state.json").exists():
        try:
            dataset = datasets.load_from_disk(local_path)
        except Exception as error:  # the datasets library's own errors on an empty or damaged copy
            raise UserError(f"--dataset_path {local_path}: cannot be read as a save_to_disk dataset "
                            f"({type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}); "
                            "is it empty or damaged? Save it again") from error
        if isinstance(dataset, datasets.DatasetDict):
            if base not in dataset:
                raise UserError(f"--dataset_path {local_path}: no split {base!r} (it has {', '.join(dataset)})")
            dataset = dataset[base]
    else:
        try:
            dataset = datasets.load_dataset("parquet", data_files={base: parquet_files(local_path, base, config)},
                                            split=base)
        except UserError:
            raise
        except Exception as error:
            raise UserError(f"--dataset_path {local_path}: its {base} parquet files cannot be read "
                            f"({type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}); "
                            "are they damaged?") from error
    where = f"--dataset_path {local_path}" if local_path else hub_id
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise UserError(f"{where}: the {base} split has no column {', '.join(map(repr, missing))} (its columns: "
                        f"{', '.join(dataset.column_names)}); is it the right dataset?")
    if rows:
        start, stop = (int(x) if x else None for x in rows.strip("[]").split(":"))
        needed = max(start or 0, stop or 0)
        if needed > len(dataset) or (start is not None and start >= len(dataset)):
            raise UserError(f"{where}: rows {rows} asked for, but the {base} split has only {len(dataset)} rows "
                            "(lower --eval_rows, the rows held out for evaluation)")
        dataset = dataset.select(range(len(dataset))[slice(start, stop)])
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(feature.feature, datasets.Image):
            dataset = undecoded_list(dataset, column, type(feature)(datasets.Image(decode=False)))
    return dataset


def parquet_files(path: str | os.PathLike, split: str, config: str | None) -> list[str]:
    """The parquet files of one split of one config: `path` itself if it is a file, else the files in the hub layout
    under it (CONFIG/SPLIT-*.parquet, data/SPLIT-*.parquet or SPLIT/*.parquet). Files of different configs (the
    Cauldron's docvqa/, nlvr2/, ...) are never merged into one split: name the config, or point to its folder."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    files = sorted(path.rglob(f"{split}-*.parquet")) or sorted(path.rglob(f"{split}/*.parquet"))
    if not files:
        raise UserError(f"{path}: no save_to_disk dataset and no {split}-*.parquet files in it")
    groups: dict[str, list[str]] = {}
    for file in files:
        folder = file.parent.parent if file.parent.name == split else file.parent
        groups.setdefault(folder.relative_to(path).as_posix(), []).append(str(file))
    if len(groups) == 1:
        return next(iter(groups.values()))
    chosen = [name for name in groups if config is not None and Path(name).name == config]
    if len(chosen) == 1:
        return groups[chosen[0]]
    names = ", ".join(sorted(groups))
    raise UserError(f"{path} holds {split} parquet files of several configs ({names})"
                    + (f", none of them named {config!r}" if config is not None else "")
                    + ": pass the config (--dataset_config NAME) or point to that config's folder; different "
                    "configs are never merged into one training set")


def undecoded_list(dataset, column: str, feature):
    """`cast_column` for a list of images, done as `cast_column` does it for one image: only the feature changes.
    (`cast_column` would rewrite the whole dataset, e.g. as a cache file inside the user's save_to_disk folder.)"""
    import copy

    from datasets.arrow_dataset import update_metadata_with_features

    try:
        copied = copy.deepcopy(dataset)
        copied._info.features[column] = feature
        copied._data = update_metadata_with_features(copied._data.cast(copied.features.arrow_schema), copied.features)
        return copied
    except (AttributeError, TypeError, ValueError):  # another datasets version: the public way
        return dataset.cast_column(column, feature)


def hub_image(value) -> ImageRef:
    """An image cell of a hub dataset (`{"bytes", "path"}` when not decoded, or a PIL image) as an ImageRef.

    Only embedded bytes are used: a path in a dataset row is never opened (rows are data, not file pointers).
    `save_to_disk` and the hub's parquet files embed the bytes.
    """
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        raise ValueError(f"image cell holds no image bytes (path {value.get('path')!r} is not opened): save the "
                         "dataset with the images embedded (save_to_disk or to_parquet embed them)")
    if isinstance(value, Image.Image):
        return value
    raise ValueError(f"image cell of type {type(value).__name__} is not an image")


def expect(value, kind: str, what: str):
    """`value` if it is of `kind` ("text", "texts", "list", "dict"), else a ValueError naming the field: hub rows
    are checked, not trusted (a string where a list belongs would be read character by character)."""
    ok = {"text": isinstance(value, str), "list": isinstance(value, list), "dict": isinstance(value, dict),
          "texts": isinstance(value, list) and all(isinstance(v, str) for v in value)}[kind]
    if not ok:
        wanted = {"text": "a string", "list": "a list", "dict": "an object", "texts": "a list of strings"}[kind]
        got = "null" if value is None else type(value).__name__
        if isinstance(value, list) and kind == "texts":
            got = "a list holding " + ", ".join(sorted({type(v).__name__ for v in value if not isinstance(v, str)}))
        raise ValueError(f"{what} must be {wanted}, got {got}")
    return value


def cauldron_texts(row: dict) -> list[dict]:
    """The Cauldron's `texts` column, checked: a list of {"user": str, "assistant": str}."""
    texts = expect(row["texts"], "list", '"texts"')
    for number, text in enumerate(texts, start=1):
        expect(text, "dict", f'"texts" item {number}')
        for key in ("user", "assistant"):
            expect(text.get(key), "text", f'"texts" item {number} "{key}"')
    return texts


# ------------------------------------------------------------------------------------------------- command line


def build_parser():
    """`python -m phi3v.data convert IN OUT`: any supported format -> our jsonl (see phi3v.formats)."""
    from phi3v.formats import build_parser

    return build_parser()


if __name__ == "__main__":
    from phi3v.errors import run_main
    from phi3v.formats import main

    run_main(main)
