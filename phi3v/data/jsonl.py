"""Our jsonl format, one conversation per line (image and video paths relative to an image root; a video gives
`num_frames` frames, after the turn's images):

    {"id", "source"?, "system"?, "conversations": [{"images": [...], "videos"?: [...], "user", "assistant"}]}
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

from phi3v.common.errors import UserError
from phi3v.data.conversation import Conversation, Problem, Turn
from phi3v.data.dataset import ConversationDataset
from phi3v.data.images import resolve_image_path
from phi3v.data.video import video_frames


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


def jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record or None, problem or None) for each non-blank line of a jsonl file, read lazily. A
    byte-order mark (Windows editors write one) is allowed; a key repeated within an object is a problem."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            keys = KeyCheck()
            try:
                line = raw.decode("utf-8-sig")
                if not line.strip():
                    continue
                record = json.loads(line.strip(), object_pairs_hook=keys)
            except UnicodeDecodeError as error:
                yield number, None, f"not valid UTF-8 (byte {error.start})"
            except json.JSONDecodeError as error:
                yield number, None, f"malformed JSON: {error.msg} at column {error.colno}"
            except RecursionError:
                yield number, None, "JSON nested too deeply to read (thousands of [ or {)"
            else:
                if isinstance(record, dict):
                    yield number, record, keys.problem
                else:
                    yield number, None, f"a line must be a JSON object, got {type(record).__name__}"


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[str, dict]], list[Problem]]:
    """(where, record) for every line without a problem ("name.jsonl:12"), and a Problem for each of the others."""
    name, lines = Path(path).name, list(jsonl_lines(path))
    records = [(f"{name}:{number}", record) for number, record, problem in lines if problem is None]
    return records, [Problem(f"{name}:{number}", None, problem) for number, _, problem in lines if problem]


class SampleError(UserError, ValueError):
    """A bad sample whose id is known."""

    def __init__(self, message: str, sample_id):
        super().__init__(message)
        self.sample_id = None if sample_id is None else str(sample_id)


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


AUDIO = "audio inputs are not supported: these recipes fine-tune the vision path (remove the audio)"


@contextlib.contextmanager
def sample_errors(record: dict):
    """A ValueError inside becomes a SampleError naming the record's id (where valid); first an "audio"/"audios" key
    (ms-swift, Phi-4-multimodal's own fine-tuning data) is refused, not ignored."""
    try:
        for key in ("audio", "audios"):
            if key in record:
                raise ValueError(f'an "{key}" key: {AUDIO}')
        yield
    except ValueError as error:
        raise SampleError(str(error), valid_id(record)) from error


def jsonl_conversation(item: tuple[str, dict], image_root: str | os.PathLike, num_frames: int = 8) -> Conversation:
    """The Conversation of a (where, record) item in our schema; a bad record raises SampleError."""
    record = item[1]
    with sample_errors(record):
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
            images, videos = turn.get("images", []), turn.get("videos", [])
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


def jsonl_dataset(path: str | os.PathLike, image_root: str | os.PathLike, processor, for_generation: bool = False,
                  max_image_pixels: int | None = None) -> ConversationDataset:
    """A dataset over a jsonl file in our schema, with images relative to `image_root`."""
    records, problems = read_jsonl(path)
    return ConversationDataset(records, functools.partial(jsonl_conversation, image_root=image_root), processor,
                               where=[where for where, _ in records], for_generation=for_generation,
                               max_image_pixels=max_image_pixels, load_problems=problems, sources=[str(path)])
