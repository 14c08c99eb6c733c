"""First start vs restart: validating N images before the first step, without and with the validation cache.

    python bench/validation_cache.py                          # 2,000 images, 2 rounds: ~2 minutes on 2 CPU cores
    python bench/validation_cache.py --images 20000 --rounds 1   # the 20,000-image times: ~15 minutes

What: `data.validation.prepare_dataset`, which every recipe runs on each split before training, on a jsonl file of
N single-image samples (photo-like 640x480 JPEGs, one question each), read through `phi3v.data.formats.load_data` as a
recipe reads it. A first start checks everything: it renders and tokenizes every sample and decodes every image
fully. A restart on the unchanged files finds the results in the cache the first start wrote (OUTPUT_DIR or
--cache_dir) and only stat's the files. Rounds alternate (first start on a fresh cache directory, then its restart,
then the next round), and we report medians and first / restart. Target from the issue: >= 20x at 2,000 images.
After the last round one image is rewritten and one more start is timed: only that file is decoded again (every
sample is rendered again, since the split's result no longer holds).

The tokenizer is the tiny test checkpoint's (built in a temporary folder); a restart tokenizes nothing, so only
the first start's time depends on it. Files live in a temporary folder (removed afterwards); the operating system's
page cache holds them in every start, so the first start's time is decoding, not disk reads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/validation_cache.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from bench.common import add_json_argument, markdown_table, median, ratio, write_json
from phi3v.data.formats import load_data
from phi3v.data.validation import prepare_dataset
from phi3v.models.phi3_v.processing import Phi3VProcessor
from phi3v.models.phi3_v.tiny import build_tiny_checkpoint

TARGET = 20.0


def photo_like(seed: int, size: tuple[int, int]) -> Image.Image:
    """Smooth colour fields with fine noise: decodes like a photograph (unlike flat colour or pure noise)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (size[1] // 40, size[0] // 40, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.int16)
    image = image + rng.integers(-12, 13, image.shape, dtype=np.int16)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_dataset(root: Path, count: int, size: tuple[int, int]) -> Path:
    (root / "images").mkdir(parents=True)
    with open(root / "train.jsonl", "w") as f:
        for i in range(count):
            photo_like(i, size).save(root / "images" / f"{i:06d}.jpg", quality=90)
            f.write(json.dumps({"id": str(i), "conversations": [
                {"images": [f"{i:06d}.jpg"], "user": "What is in this picture? Answer in one word.",
                 "assistant": f"thing{i % 10}"}]}) + "\n")
    return root / "train.jsonl"


def start(path: Path, processor, cache_dir: Path, workers: int) -> float:
    began = time.perf_counter()
    dataset = load_data(path, processor, image_root=path.parent / "images")
    prepared = prepare_dataset(dataset, "train", None, False, cache_dir, workers=workers, disable_tqdm=True,
                               cache_dir=cache_dir)
    assert len(prepared.lengths) == len(dataset)
    return time.perf_counter() - began


def run(images: int, rounds: int, size: tuple[int, int], workers: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-validation-"))
    try:
        began = time.perf_counter()
        path = write_dataset(work / "data", images, size)
        print(f"{images:,} images of {size[0]}x{size[1]} written in {time.perf_counter() - began:.0f} s",
              flush=True)
        processor = Phi3VProcessor.from_pretrained(build_tiny_checkpoint(work / "tiny", seed=0))
        first, restart = [], []
        for round_ in range(rounds):
            cache = work / f"cache-{round_}"
            first.append(start(path, processor, cache, workers))
            restart.append(start(path, processor, cache, workers))
            print(f"round {round_ + 1}: first start {first[-1]:.2f} s, restart {restart[-1]:.3f} s", flush=True)
        photo_like(10**6, (size[0] // 2, size[1])).save(path.parent / "images" / "000000.jpg", quality=90)
        changed = start(path, processor, work / f"cache-{rounds - 1}", workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"images": images, "size": list(size), "first_start_s": first, "restart_s": restart,
            "one_file_changed_s": changed, "ratio": median(first) / median(restart)}


def report(results: dict) -> str:
    first, restart = median(results["first_start_s"]), median(results["restart_s"])
    table = markdown_table(
        ["images", "first start", "restart (unchanged)", "first / restart", "restart after 1 file changed"],
        [[f"{results['images']:,}", f"{first:.2f} s", f"{restart:.3f} s", ratio(first, restart),
          f"{results['one_file_changed_s']:.2f} s"]])
    verdict = "meets" if results["ratio"] >= TARGET else "MISSES"
    return f"{table}\n\nfirst / restart = {results['ratio']:.1f}x ({verdict} the >= {TARGET:.0f}x target)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the images")
    parser.add_argument("--workers", type=int, default=2, help="image-checking threads (the recipes use "
                                                               "--dataloader_num_workers)")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    size = tuple(int(x) for x in args.size.lower().split("x"))
    results = run(args.images, args.rounds, size, args.workers)
    markdown = report(results)
    print(markdown)
    write_json(args.json, "validation_cache", results, markdown)
    return results


if __name__ == "__main__":
    main()
