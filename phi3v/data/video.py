"""Video files -> evenly spaced RGB frames, with PyAV: one rule for the converter, training on the fly and predict.py.

A video counts as `num_frames` images: frame k of n is frame floor(k * total / n) of the decoded stream, whether
convert_ucf101.py writes them or a record names the video. In a dataset a frame is a `VideoFrame` reference.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from phi3v.common.errors import require_regular_file

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm")


def frame_indices(total: int, count: int) -> list[int]:
    """`count` evenly spaced indices in [0, total), starting at 0: floor(k * total / count) (repeats if total < count).

    >>> frame_indices(300, 8)
    [0, 37, 75, 112, 150, 187, 225, 262]
    """
    if total <= 0:
        raise ValueError("the video has no frames")
    return [k * total // count for k in range(count)]


def read_frames(path: str | os.PathLike, count: int) -> list:
    """`count` evenly spaced RGB frames (PIL images) of a video, counted by decoding where the container's count is
    missing or wrong. Raises ValueError (or av.error.*) for an unreadable video."""
    import av

    require_regular_file(path)
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        reported = container.streams.video[0].frames  # 0 when the container does not say
    if reported > 0:
        frames = decode(path, frame_indices(reported, count))
        if len(frames) == count:
            return frames
    with av.open(str(path)) as container:  # count for real: the metadata was missing or wrong
        total = sum(1 for _ in container.decode(video=0))
    if total == 0:
        raise ValueError("no decodable frames")
    if total < reported / 2:
        raise ValueError(f"truncated: the container announces {reported} frames but only {total} decode")
    return decode(path, frame_indices(total, count))


def decode(path: str | os.PathLike, indices: list[int]) -> list:
    """RGB frames at `indices` (in order, repeats allowed), those the video has."""
    import av

    wanted, found = sorted(set(indices)), {}
    with av.open(str(path)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                found[number] = frame.to_image().convert("RGB")
                if number == wanted[-1]:
                    break
    return [found[i] for i in indices if i in found]


def describe_error(error: Exception) -> str:
    """One line for a video that cannot be read."""
    import av

    if isinstance(error, av.error.InvalidDataError):
        return "invalid data: not a video file, or a corrupt one"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, ValueError):
        return str(error)
    return f"{type(error).__name__}: {error}"


# ------------------------------------------------------------------------------------------------- in datasets


@dataclass(frozen=True)
class VideoFrame:
    """Frame `index` of the `count` evenly spaced frames of the video at `path`: an image reference."""

    path: Path
    index: int
    count: int

    def __str__(self) -> str:  # the same for every frame, so a bad video is reported once per sample
        return str(self.path)


def video_frames(path: str | os.PathLike, count: int) -> list[VideoFrame]:
    return [VideoFrame(Path(path), k, count) for k in range(count)]


_locks: dict = {}
_locks_guard = threading.Lock()


@functools.lru_cache(maxsize=4)
def _cached_frames(path: Path, count: int, stamp: tuple[int, int]) -> list:
    return read_frames(path, count)


def open_frame(frame: VideoFrame):
    """The PIL image of a frame reference, the video decoded once per process (and size and mtime) for all its
    frames, by one thread. Raises ValueError, saying why, when unreadable."""
    try:
        stat = frame.path.stat()
        with _locks_guard:
            lock = _locks.setdefault((frame.path, frame.count), threading.Lock())
        with lock:
            frames = _cached_frames(frame.path, frame.count, (stat.st_size, stat.st_mtime_ns))
    except Exception as error:  # any unreadable video: one line
        raise ValueError(describe_error(error)) from error
    return frames[frame.index]


def frame_size(frame: VideoFrame) -> tuple[int, int]:
    """(width, height) of a video's frames from its stream header, without decoding."""
    import av

    try:
        with av.open(str(frame.path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            context = container.streams.video[0].codec_context
            return context.width, context.height
    except Exception as error:
        raise ValueError(describe_error(error)) from error
