"""The data formats people already have, read as they are: ours, LLaVA, messages, and Hugging Face datasets.

    ours      jsonl  {"id", "system"?, "conversations": [{"images": [...], "videos"?: [...], "user", "assistant"}]}
    llava     json array or jsonl  {"id"?, "image": str | [str], "video"?: str | [str], "system"?,
                                    "conversations": [{"from": "system"|"human"|"gpt", "value": "<image>\\n..."}]}
    messages  jsonl  {"id"?, "messages": [{"role": "system"|"user"|"assistant", "content": str | [parts]}],
                      "images": [...], "videos"?: [...]}   (TRL, ms-swift; parts are {"type": "text"|"image"|"video"})
    hf        a Hugging Face dataset with `messages` (or the Cauldron's `texts`) and `images` columns: a hub id, a
              `save_to_disk` folder, a folder of parquet files or one parquet file (images embedded, as on the hub)

The format is recognised from the first records, or forced with `data_format`. Everything becomes a Conversation:
`<image>` tags (and `<video>` tags, each `num_frames` frames) become <|image_k|> tags numbered within their turn;
untagged images go in front of the first user message, as in LLaVA. `python -m phi3v.data convert IN OUT` writes any
of them in our jsonl, to inspect what will be trained.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import json
import os
import re
from pathlib import Path

from phi3v.common.errors import UserError
from phi3v.data.conversation import Conversation, Problem, Turn
from phi3v.data.dataset import ConversationDataset
from phi3v.data.hub_datasets import arrow_files, hub_image, load_hf_split
from phi3v.data.images import resolve_image_path
from phi3v.data.jsonl import AUDIO, KeyCheck, jsonl_conversation, jsonl_lines, read_jsonl, record_id, sample_errors
from phi3v.data.video import video_frames

FORMATS = ("auto", "ours", "llava", "messages", "hf")
PLACEHOLDER = re.compile(r"(<image>|<video>)")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SEPARATORS = re.compile(r"[\s,]*")  # between the items of an array already known to be valid JSON
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ------------------------------------------------------------------------------------------------- reading files


def is_json_array(path: str | os.PathLike) -> bool:
    """Whether a data file is one JSON array (LLaVA's .json) rather than jsonl, after any byte-order mark."""
    with open(path, "rb") as f:
        return f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def read_records(path: str | os.PathLike) -> tuple[list[tuple[str, dict]], list[Problem]]:
    """(where, record) for a JSON array file (LLaVA's .json, read whole) or a jsonl file, and the unreadable lines."""
    if not is_json_array(path):
        return read_jsonl(path)
    path, name = Path(path), Path(path).name
    keys = KeyCheck()
    try:
        text = path.read_text(encoding="utf-8-sig")
        array = json.loads(text, object_pairs_hook=keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not a valid JSON array ({str(error).splitlines()[0][:200]})") from error
    except RecursionError:
        raise UserError(f"{path}: not a valid JSON array (nested too deeply to read: thousands of [ or {{)") from None
    repeated = repeated_keys(text) if keys.problem else {}
    problems = [Problem(f"{name}[{i}] (line {line})", None, message) for i, (line, message) in repeated.items()]
    problems += [Problem(f"{name}[{i}]", None, f"an item must be a JSON object, got {type(r).__name__}")
                 for i, r in enumerate(array) if not isinstance(r, dict)]
    records = [(f"{name}[{i}]", r) for i, r in enumerate(array) if isinstance(r, dict) and i not in repeated]
    return records, problems


def repeated_keys(text: str) -> dict[int, tuple[int, str]]:
    """{item index: (its first line, problem)} for the items of a valid JSON array that repeat a key in an object."""
    found, position = {}, text.index("[") + 1
    for index in itertools.count():
        position = SEPARATORS.match(text, position).end()
        if text.startswith("]", position):
            return found
        keys = KeyCheck()
        _, end = json.JSONDecoder(object_pairs_hook=keys).raw_decode(text, position)
        if keys.problem:
            found[index] = (text.count("\n", 0, position) + 1, keys.problem)
        position = end


def record_format(record: dict) -> str | None:
    """"ours", "llava" or "messages" from the keys of one record, or None."""
    turns = record.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        if "from" in turns[0] or "value" in turns[0]:
            return "llava"
        if "user" in turns[0] or "assistant" in turns[0]:
            return "ours"
    if isinstance(record.get("messages"), list):
        return "messages"
    return None


def is_hub_id(path: str) -> bool:
    """A name like `owner/dataset` that is not a local path (and not a file name we would read ourselves)."""
    return not Path(path).exists() and bool(HUB_ID.match(path)) and Path(path).suffix not in (".json", ".jsonl")


def detect_format(path: str | os.PathLike) -> str:
    """The format of a data file or dataset, from its content."""
    path = str(path)
    if Path(path).is_dir() or path.endswith(".parquet") or is_hub_id(path):
        return "hf"
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    if is_json_array(path):
        records = [record for _, record in read_records(path)[0][:10]]
    else:  # the first lines only: the dataset reads the whole file once, later (and reports what is unreadable)
        records = list(itertools.islice((r for _, r, _ in jsonl_lines(path) if r is not None), 10))
    if not records and not read_records(path)[1]:
        raise UserError(f"{path}: the file holds no records (it is empty)")
    found = [kind for kind in map(record_format, records) if kind]
    if found:
        return found[0]
    keys = sorted(records[0])[:8] if records else []
    raise UserError(f"{path}: cannot tell the data format from its first records (keys {keys}); expected ours "
                    '("conversations" with "user"/"assistant"), LLaVA ("conversations" with "from"/"value") or '
                    '"messages": fix the file or pass --data_format')


# ------------------------------------------------------------------------------------------------- to Conversation


def _as_list(value) -> list:
    """A field that may hold one item or a list of them (LLaVA's "image": "a.jpg" or ["a.jpg", "b.jpg"])."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def build_conversation(sample_id: str, messages: list[tuple[str, str]], images: list, videos: list,
                       num_frames: int, system: str | None = None) -> Conversation:
    """Conversation from (role, text) messages with <image>/<video> tags and the sample's images and video paths;
    untagged ones go in front of the first user message."""
    if messages and messages[0][0] == "system":
        if system is not None:
            raise ValueError("two system messages (a system key and a system turn)")
        system, messages = messages[0][1], messages[1:]
    tags = [tag for _, text in messages for tag in PLACEHOLDER.findall(text)]
    prefix = ""
    for kind, items in (("image", images), ("video", videos)):
        count = tags.count(f"<{kind}>")
        if count and count != len(items):
            raise ValueError(f"{count} <{kind}> tag(s) but {len(items)} {kind}(s)")
        if not count:
            prefix += f"<{kind}>" * len(items)
    pending = {"<image>": iter(images), "<video>": iter(videos)}
    turns, user = [], None
    for number, (role, text) in enumerate(messages, start=1):
        expected, article = ("user", "a") if user is None else ("assistant", "an")
        if role != expected:
            raise ValueError(f"message {number} is from {role!r} where {article} {expected!r} message was expected "
                             "(a system message may only come first; then user and assistant alternate)")
        if role == "assistant":
            if PLACEHOLDER.search(text):
                raise ValueError(f"message {number}: an assistant message cannot hold an <image> or <video> tag")
            turns.append(Turn(user[0], text, user[1]))
            user = None
            continue
        if not turns and prefix:
            text = prefix + "\n" + text
        refs, parts = [], []
        for piece in PLACEHOLDER.split(text):
            if piece not in pending:
                parts.append(piece)
                continue
            frames = [next(pending[piece])] if piece == "<image>" else video_frames(next(pending[piece]), num_frames)
            parts += [f"<|image_{len(refs) + j + 1}|>" for j in range(len(frames))]
            refs += frames
        user = ("".join(parts), refs)
    if user is not None:  # a last question without its answer: a prompt (fine for evaluation, not for training)
        turns.append(Turn(user[0], None, user[1]))
    if not turns:
        raise ValueError("no user message")
    return Conversation(sample_id, turns, system)


def _text(content, number: int) -> str:
    """A message content as text: a string, or parts [{"type": "text"|"image"|"video", ...}] where an image or
    video part becomes its tag and a line break (the model card's "<|image_1|>\\n<|image_2|>\\n..." layout)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"message {number}: content must be a string or a list of parts")
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        elif kind in ("image", "video"):
            text += f"<{kind}>\n"
        elif kind == "audio":
            raise ValueError(f"message {number}: an audio part: {AUDIO}")
        else:
            raise ValueError(f"message {number}: a content part must be {{'type': 'text', 'text': ...}}, "
                             f"{{'type': 'image'}} or {{'type': 'video'}}, got {str(part)[:80]}")
    return text


def llava_conversation(item: tuple[str, dict], image_root: str | os.PathLike, num_frames: int = 8) -> Conversation:
    where, record = item
    with sample_errors(record):
        turns = record.get("conversations")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError('"conversations" must be a list of {"from", "value"} objects')
        messages = []
        for number, turn in enumerate(turns, start=1):
            role = LLAVA_ROLES.get(turn.get("from"))
            if role is None or not isinstance(turn.get("value"), str):
                raise ValueError(f'turn {number}: "from" must be one of {sorted(LLAVA_ROLES)} and "value" a string')
            messages.append((role, turn["value"]))
        images = [resolve_image_path(image_root, p) for p in _as_list(record.get("image"))]
        videos = [resolve_image_path(image_root, p) for p in _as_list(record.get("video"))]
        return build_conversation(record_id(record, where), messages, images, videos, num_frames, record.get("system"))


def messages_conversation(item: tuple[str, dict], image_root: str | os.PathLike | None, num_frames: int = 8
                          ) -> Conversation:
    """A `messages` record; with `image_root` None (a hub dataset row) images are embedded image cells."""
    where, record = item
    with sample_errors(record):
        messages = record.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError('"messages" must be a list of {"role", "content"} objects')
        pairs = [(m.get("role"), _text(m.get("content"), n)) for n, m in enumerate(messages, start=1)]
        images, videos = _as_list(record.get("images")), _as_list(record.get("videos"))
        if image_root is None:
            images = [hub_image(cell) for cell in images]
            if videos:
                raise ValueError("videos in a hub dataset are not supported: use a jsonl file with video paths")
        else:
            images = [resolve_image_path(image_root, p) for p in images]
            videos = [resolve_image_path(image_root, p) for p in videos]
        return build_conversation(record_id(record, where), pairs, images, videos, num_frames, record.get("system"))


def hf_row_conversation(index: int, rows) -> Conversation:
    """A row with `messages`, or with the Cauldron's `texts` ([{"user", "assistant"}]), and `images`."""
    row = rows[index]
    if "messages" not in row and isinstance(row.get("texts"), list):
        turns = [t if isinstance(t, dict) else {} for t in row["texts"]]
        messages = [{"role": role, "content": t.get(role)} for t in turns for role in ("user", "assistant")]
        row = {**row, "messages": messages}
    if isinstance(row.get("id"), int):  # an integer column: typed, so unlike a JSON file it cannot mix 5 and "5"
        row = {**row, "id": str(row["id"])}
    return messages_conversation((f"row {index}", row), None)


READERS = {"ours": jsonl_conversation, "llava": llava_conversation, "messages": messages_conversation}


# ------------------------------------------------------------------------------------------------- datasets


def load_data(path: str | os.PathLike, processor, image_root: str | os.PathLike | None = None,
              data_format: str = "auto", for_generation: bool = False, split: str = "train",
              config: str | None = None, num_frames: int = 8, max_image_pixels: int | None = None,
              limit: int | None = None) -> ConversationDataset:
    """A dataset over a file or Hugging Face dataset in any supported format.

    Args:
        image_root: folder the image and video paths are relative to (default: the file's folder).
        data_format: "auto" (from the content) or one of ours, llava, messages, hf.
        split, config: for a Hugging Face dataset, the split (hub syntax: "train", "train[:100]") and config.
    """
    path = str(path)
    if data_format not in FORMATS:
        raise UserError(f"--data_format must be one of {', '.join(FORMATS)}, got {data_format!r}")
    data_format = detect_format(path) if data_format == "auto" else data_format
    if data_format == "hf":
        rows = hf_rows(path, split, config)
        items, problems = list(range(len(rows)))[:limit], []
        where = [f"{Path(path).name} {split} row {i}" for i in items]
        reader = functools.partial(hf_row_conversation, rows=rows)
        sources = arrow_files(rows)
    else:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file")
        records, problems = read_records(path)
        items = records[:limit]
        where = [name for name, _ in items]
        root = Path(image_root) if image_root is not None else Path(path).parent
        reader = functools.partial(READERS[data_format], image_root=root, num_frames=num_frames)
        sources = [path]
    return ConversationDataset(items, reader, processor, where=where, for_generation=for_generation,
                               max_image_pixels=max_image_pixels, load_problems=problems, sources=sources)


def hf_rows(path: str, split: str, config: str | None):
    """The rows of a Hugging Face dataset split, checked for the `messages` and `images` columns."""
    local = Path(path).exists()
    try:
        rows = load_hf_split(None if local else path, config, split, path if local else None)
    except OSError as error:  # the hub, offline or without that dataset
        raise UserError(f"could not load the Hugging Face dataset {path}" + (f" ({config})" if config else "")
                        + f": {str(error).split('. Offline?')[0][:300]}. Offline? Save a copy where the hub is "
                        "reachable (datasets.load_dataset(...).save_to_disk(DIR), or its parquet files) and pass "
                        "DIR instead of the hub id.") from error
    if "images" not in rows.column_names or not {"messages", "texts"} & set(rows.column_names):
        raise UserError(f"{path}: the dataset has columns {rows.column_names}; a Hugging Face dataset is read from "
                        "an `images` column and a `messages` column (role/content), or the Cauldron's `texts` "
                        "(user/assistant)")
    return rows
