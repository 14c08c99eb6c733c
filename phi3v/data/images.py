"""Image references (a file, encoded bytes, a decoded image, a video frame), opened and sized as the model sees
them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from phi3v.common.errors import require_regular_file
from phi3v.data.video import VideoFrame, frame_size, open_frame

ImageRef = str | os.PathLike | bytes | Image.Image | VideoFrame  # a file, encoded bytes (hub datasets), a decoded
# image, or one of the evenly spaced frames of a video file (decoded on access)


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
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grayscale (PNG "I;16", or "I") scaled to 8 bits: `convert("RGB")` would clip it to almost all white
        pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.round(pixels / 257).astype(np.uint8), "L")
    return image


def image_size(ref: ImageRef) -> tuple[int, int]:
    """(width, height) as the model will see it (after EXIF rotation), from the header only."""
    if isinstance(ref, VideoFrame):
        return frame_size(ref)
    image = open_image(ref, decode=False)
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
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
