"""What validation found, kept between starts: a restart re-checks only what changed.

Two levels, keyed by files' path, size and mtime (embedded images by a digest of their bytes): per image file, its
problem or (width, height); per split, the token lengths and problems of the whole dataset, reused when its source
files, items, processor, limits and image files are unchanged (then a start only stats each image).

One JSON file (OUTPUT_DIR/validation_cache.json, or in --cache_dir), written atomically by rank 0, also on Ctrl-C;
a corrupt or foreign one is ignored and rewritten. A fingerprint of the code that computes lengths is kept with it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

from PIL import Image

from phi3v.data.video import VideoFrame

logger = logging.getLogger(__name__)
VERSION = 1
FILE_NAME = "validation_cache.json"


@functools.cache
def code_fingerprint() -> str:
    """A digest of the modules that decide a sample's length and validity: phi3v/data/ and phi3v/models/."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.blake2b(digest_size=8)
    for file in sorted([*(package / "data").glob("*.py"), *(package / "models").rglob("*.py")]):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def stamp(path: str | os.PathLike) -> list[int] | None:
    """[size, mtime_ns] of a file, or None if it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def image_key(ref) -> tuple[str, str | None] | None:
    """(cache key, file to stat or None) of an image reference; None for a decoded image (nothing to key)."""
    if isinstance(ref, bytes):
        return "bytes:" + hashlib.blake2b(ref, digest_size=16).hexdigest(), None
    if isinstance(ref, VideoFrame):
        return f"video:{ref.path}#{ref.count}", str(ref.path)
    if isinstance(ref, Image.Image):
        return None
    return f"file:{os.fspath(ref)}", os.fspath(ref)


class ValidationCache:
    """Image verdicts and split results from earlier starts (see the module docstring).

    Args:
        path: the cache file; None keeps everything in memory (no cache between starts).
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.images: dict[str, list] = {}  # key -> [stamp or None, max_pixels, problem, size]
        self.splits: dict[str, dict] = {}
        self.new_images: dict[str, list] = {}  # found in this start, to share across ranks and save
        self.used: set[str] = set()  # image keys the split being validated names
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == VERSION and data.get("code") == code_fingerprint():
                    self.images, self.splits = data["images"], data["splits"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                logger.warning(f"ignoring the validation cache {self.path} ({error}); it will be rewritten")

    # --- images
    def image(self, ref, max_pixels: int | None) -> tuple[str | None, list[int] | None] | None:
        """(problem, size) found earlier for this image, if the file is unchanged; else None."""
        key = image_key(ref)
        entry = self.images.get(key[0]) if key else None
        if entry is None or entry[1] != max_pixels or (key[1] is not None and entry[0] != stamp(key[1])):
            return None
        return entry[2], entry[3]

    def store_image(self, ref, max_pixels: int | None, problem: str | None, size) -> None:
        key = image_key(ref)
        if key is None:
            return
        entry = [stamp(key[1]) if key[1] is not None else None, max_pixels, problem, list(size) if size else None]
        self.images[key[0]] = self.new_images[key[0]] = entry

    # --- splits
    @staticmethod
    def split_fingerprint(dataset, max_length: int | None) -> str | None:
        """A digest of what a split's result depends on but its image files; None without the dataset's sources."""
        if not dataset.sources:
            return None
        tokenizer = dataset.processor.tokenizer
        template = hashlib.blake2b((tokenizer.chat_template or "").encode(), digest_size=8).hexdigest()
        processor = f"{dataset.processor.num_crops}|{tokenizer.name_or_path}|{len(tokenizer)}|{template}"
        digest = hashlib.blake2b(digest_size=16)
        for part in (code_fingerprint(), processor, max_length,
                     dataset.max_image_pixels, dataset.for_generation, len(dataset), _reader_name(dataset),
                     *[(str(s), stamp(s)) for s in dataset.sources], *dataset.names):
            digest.update(repr(part).encode() + b"\0")
        return digest.hexdigest()

    def split(self, name: str, fingerprint: str | None):
        """(lengths, problems as dicts) of a split checked earlier, if nothing it depends on changed; else None."""
        entry = self.splits.get(name)
        if fingerprint is None or entry is None or entry["fingerprint"] != fingerprint:
            return None
        for key in entry["images"]:
            cached = self.images.get(key)
            file = key[6:].rsplit("#", 1)[0] if key.startswith("video:") else key[5:] if key.startswith("file:") \
                else None
            if cached is None or (file is not None and cached[0] != stamp(file)):
                return None
        return entry["lengths"], entry["problems"]

    def store_split(self, name: str, fingerprint: str | None, lengths: list, problems: list[dict]) -> None:
        """Keep a split's result with the image files it names (`used`)."""
        if fingerprint is not None:
            self.splits[name] = {"fingerprint": fingerprint, "lengths": lengths, "problems": problems,
                                 "images": sorted(self.used)}

    def save(self) -> None:
        """Write the cache atomically (temporary file + rename); a failure to write only costs the next start."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps({"version": VERSION, "code": code_fingerprint(), "images": self.images,
                                             "splits": self.splits}))
            os.replace(temporary, self.path)
        except OSError as error:
            logger.warning(f"could not write the validation cache {self.path}: {error}")


def _reader_name(dataset) -> str:
    """The reader and its settings (image root, frames per video), as far as they print stably."""
    reader = dataset.to_conversation
    if isinstance(reader, functools.partial):
        settings = {k: v for k, v in reader.keywords.items() if isinstance(v, (str, int, float, os.PathLike))}
        return f"{reader.func.__module__}.{reader.func.__qualname__}{sorted((k, str(v)) for k, v in settings.items())}"
    return getattr(reader, "__qualname__", type(reader).__name__)
