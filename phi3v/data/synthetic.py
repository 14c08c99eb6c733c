"""Small synthetic video datasets in the UCF-101 folder layout, written with real codecs (PyAV), for the demo, the
tests and the benchmarks. Every class has its own colours and motion, so a model can learn to tell them apart."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

UCF101_SUBSET_CLASSES = ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching",
                         "BaseballPitch", "Basketball", "BasketballDunk", "BenchPress"]


def write_video(path: str | Path, frames: list[np.ndarray], fps: int = 10, codec: str = "mpeg4") -> Path:
    """Encode (H, W, 3) uint8 frames into a video file (container from the suffix: .avi, .mp4, ...)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# well separated in RGB: the cube's corners first, then points between them
PALETTE = [(40, 40, 40), (215, 215, 215), (215, 40, 40), (40, 215, 40), (40, 40, 215), (215, 215, 40),
           (40, 215, 215), (215, 40, 215), (128, 128, 40), (40, 128, 128), (128, 40, 128), (128, 128, 128)]


def class_frames(class_index: int, num_classes: int, num_frames: int, size: tuple[int, int], seed: int):
    """Frames of one video: class-specific background colour and stripe texture (orientation and period), and a square
    moving in a class-specific direction; per-video noise and square position."""
    rng = np.random.default_rng(seed)
    width, height = size
    background = np.array(PALETTE[class_index] if class_index < len(PALETTE) else
                          [int(255 * c) for c in colorsys.hsv_to_rgb(class_index / num_classes, 0.7, 0.8)])
    foreground = 255 - background
    y, x = np.mgrid[0:height, 0:width]
    along = [y, x, x + y, x - y][class_index % 4]
    stripes = np.where((along // (2 + class_index // 2)) % 2 == 0, 40.0, -40.0)[..., None]
    angle = 2 * np.pi * class_index / num_classes
    side = height // 3
    start = rng.uniform(0.3, 0.7, size=2) * [width - side, height - side]
    frames = []
    for t in range(num_frames):
        frame = np.empty((height, width, 3), dtype=np.float32)
        frame[:] = background + stripes
        frame += rng.normal(0, 8, size=frame.shape)  # sensor noise: no two videos are identical
        x, y = start + t * 3 * np.array([np.cos(angle), np.sin(angle)])
        x, y = int(np.clip(x, 0, width - side)), int(np.clip(y, 0, height - side))
        frame[y:y + side, x:x + side] = foreground
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def make_video_dataset(root: str | Path, classes: list[str] | None = None, videos_per_split: dict | None = None,
                       num_frames: int = 24, size: tuple[int, int] = (160, 120), seed: int = 0) -> Path:
    """Write SPLIT/CLASS/v_CLASS_gNN_c01.avi videos under `root` and return it."""
    classes = classes or UCF101_SUBSET_CLASSES
    videos_per_split = videos_per_split or {"train": 8, "val": 2, "test": 2}
    root = Path(root)
    for split_index, (split, count) in enumerate(videos_per_split.items()):
        for class_index, name in enumerate(classes):
            for v in range(count):
                video_seed = seed + 100_000 * split_index + 1000 * class_index + v
                frames = class_frames(class_index, len(classes), num_frames, size, video_seed)
                write_video(root / split / name / f"v_{name}_g{v + 1:02d}_c01.avi", frames)
    return root
