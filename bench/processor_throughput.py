"""Processor throughput on page scans at num_crops 16, per CPU core, and the cores that keep one GPU fed.

    python bench/processor_throughput.py [--images 12] [--json bench/results/processor_throughput.json]

What: the work of one DataLoader worker per DocVQA sample, single process, one torch thread (DataLoader workers
run with one thread): `ConversationDataset.__getitem__` on a JPEG page held as bytes, i.e. JPEG decode
(`phi3v.data.open_image`, EXIF rotation included), chat template, HD transform (resize, pad, normalize, 17 crops)
and tokenization with offsets and labels, via a `Phi3VProcessor` built from a tiny checkpoint
(`phi3v.tiny.build_tiny_checkpoint`) with num_crops 16. The stages (decode, image processor) are also timed alone.

Images: synthetic US-letter pages at 200 dpi (1700x2200 RGB: headings, paragraphs of text, a ruled table, scan
noise), JPEG quality 90, a few different pages in turn. Each image is timed once after one warm-up; medians.

Then: CPU cores per GPU = the published per-GPU rate (8x A100 figures of the original recipe, DocVQA) / images per
second per core. The published rates come from the official model code; a faster model needs proportionally more.

Takes about 20-40 s.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/processor_throughput.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from bench.common import add_json_argument, markdown_table, median, write_json

# Original recipe, 8x A100-80GB, DocVQA, effective batch 64: images per second for all 8 GPUs.
PUBLISHED_RATES = {"full (flash attention)": 8.66, "LoRA": 12.1, "QLoRA": 10.5, "frozen vision": 31.7}
NUM_GPUS = 8
WORDS = ("invoice total amount date tobacco research council report page committee meeting budget approved "
         "sample analysis results october november december company name address phone number signature").split()


def document_page(width: int = 1700, height: int = 2200, seed: int = 0) -> Image.Image:
    """A synthetic scanned page: a heading, paragraphs, a ruled table, light scan noise."""
    rng = np.random.default_rng(seed)
    page = Image.new("RGB", (width, height), (250, 250, 247))
    draw = ImageDraw.Draw(page)
    heading, body = ImageFont.load_default(size=56), ImageFont.load_default(size=28)
    margin, y = width // 12, height // 14
    draw.text((margin, y), " ".join(rng.choice(WORDS, 4)).upper(), font=heading, fill=(20, 20, 20))
    y += 110
    while y < height * 0.55:  # paragraphs
        for _ in range(int(rng.integers(3, 8))):
            draw.text((margin, y), " ".join(rng.choice(WORDS, 11)), font=body, fill=(30, 30, 30))
            y += 40
        y += 30
    rows, cols = 10, 4
    cell_w, cell_h = (width - 2 * margin) // cols, 52
    for r in range(rows + 1):  # table
        draw.line([(margin, y + r * cell_h), (width - margin, y + r * cell_h)], fill=(0, 0, 0), width=2)
        for c in range(cols if r < rows else 0):
            draw.text((margin + c * cell_w + 12, y + r * cell_h + 10), f"{rng.integers(0, 99999):,}", font=body,
                      fill=(0, 0, 0))
    for c in range(cols + 1):
        draw.line([(margin + c * cell_w, y), (margin + c * cell_w, y + rows * cell_h)], fill=(0, 0, 0), width=2)
    pixels = np.asarray(page, dtype=np.int16) + rng.normal(0, 3, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def measure(processor, pages: list[bytes], num_images: int) -> dict:
    """Median seconds per image of: decode, the image processor alone, and a whole dataset item. The three are
    timed in a rotating order, so that none always runs on memory the one before it just freed."""
    from phi3v.data import Conversation, ConversationDataset, Turn, open_image

    conversations = [Conversation(str(i), [Turn("What is the total amount on the invoice?", "12,345",
                                                [pages[i % len(pages)]])]) for i in range(num_images + 1)]
    dataset = ConversationDataset(conversations, lambda conversation: conversation, processor)
    decoded = [open_image(page) for page in pages]
    stages = {"decode": lambda i: open_image(pages[i % len(pages)]),
              "image processor": lambda i: processor.image_processor([decoded[i % len(pages)]]),
              "dataset item": lambda i: dataset[i]}
    names = list(stages)
    seconds = {name: [] for name in names}
    for i in range(num_images + 1):  # image 0 is the warm-up
        for name in names[i % 3:] + names[:i % 3]:
            start = time.perf_counter()
            stages[name](i)
            if i:
                seconds[name].append(time.perf_counter() - start)
    return {name: median(values) for name, values in seconds.items()}


def run(num_images: int, num_pages: int = 3, num_crops: int = 16) -> dict:
    from phi3v import Phi3VProcessor
    from phi3v.tiny import build_tiny_checkpoint

    torch.set_num_threads(1)  # as in a DataLoader worker
    pages = [jpeg_bytes(document_page(seed=seed)) for seed in range(num_pages)]
    with tempfile.TemporaryDirectory() as directory:
        build_tiny_checkpoint(directory, num_crops=num_crops)
        processor = Phi3VProcessor.from_pretrained(directory, num_crops=num_crops)
    seconds = measure(processor, pages, num_images)
    per_core = 1 / seconds["dataset item"]
    cores = {mode: rate / NUM_GPUS / per_core for mode, rate in PUBLISHED_RATES.items()}
    return {"num_images": num_images, "num_crops": num_crops, "jpeg_kib": [len(p) / 1024 for p in pages],
            "seconds": seconds, "images_per_second_per_core": per_core, "cores_per_gpu": cores}


def report(result: dict) -> str:
    seconds = result["seconds"]
    stages = [[name, f"{value * 1e3:,.0f} ms", f"{1 / value:,.1f}"] for name, value in seconds.items()]
    feeding = [[mode, f"{rate / NUM_GPUS:.2f}", f"{result['cores_per_gpu'][mode]:.2f}"]
               for mode, rate in PUBLISHED_RATES.items()]
    kib = ", ".join(f"{k:,.0f}" for k in result["jpeg_kib"])
    return "\n\n".join([
        f"**Processor throughput, 1700x2200 JPEG pages ({kib} KiB), num_crops {result['num_crops']}, one process, "
        f"1 torch thread; median of {result['num_images']} images**",
        markdown_table(["stage", "time per image", "images/s per core"], stages),
        "(\"dataset item\" = decode + chat template + image processor + tokenization with labels: what a "
        "DataLoader worker does per sample.)",
        markdown_table(["mode (published, 8x A100)", "images/s per GPU", "CPU cores per GPU to keep up"], feeding),
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="timed images (after 1 warm-up)")
    parser.add_argument("--num_crops", type=int, default=16)
    add_json_argument(parser)
    args = parser.parse_args(argv)

    result = run(args.images, num_crops=args.num_crops)
    markdown = report(result)
    print(markdown)
    write_json(args.json, "processor_throughput", result, markdown)
    return result


if __name__ == "__main__":
    main()
