"""Processor throughput: the package's image processor against the previous implementation, and on page scans at
num_crops 16 per CPU core, with the cores that keep one GPU fed.

    python bench/processor_throughput.py [--images 12] [--repeats 9] [--json bench/results/processor_throughput.json]

Speed-up (first table): `reference_image_processor` below is the implementation the package had before it was
made faster, kept here verbatim as the baseline. Both turn the same decoded image into pixel_values, one torch
thread, alternating (A B, B A, ...); the ratio is the reference's median time over the package's. Images: a
1700x2200 document page, a 1024x768 photo and a 1280x720 video frame (matplotlib's grace_hopper.jpg resized), at
num_crops 4 and 16. Every call's pixel_values and image_sizes are asserted bit-identical between the two.

What: the work of one DataLoader worker per DocVQA sample, single process, one torch thread (DataLoader workers
run with one thread): `ConversationDataset.__getitem__` on a JPEG page held as bytes, i.e. JPEG decode
(`data.images.open_image`, EXIF rotation included), chat template, HD transform (resize, pad, normalize, 17 crops)
and tokenization with offsets and labels, via a `Phi3VProcessor` built from a tiny checkpoint
(`tiny.build_tiny_checkpoint`) with num_crops 16. The stages (decode, image processor) are also timed alone.

Images: synthetic US-letter pages at 200 dpi (1700x2200 RGB: headings, paragraphs of text, a ruled table, scan
noise), JPEG quality 90, a few different pages in turn. Each image is timed once after one warm-up; medians.

Then: CPU cores per GPU = the published per-GPU rate (8x A100 figures of the original recipe, DocVQA) / images per
second per core. The published rates come from the official model code; a faster model needs proportionally more.

Takes about 1-2 minutes.
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
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from bench.common import add_json_argument, markdown_table, median, time_alternating, write_json

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


# ------------------------------------------------------------------------------------------------- the baseline
# The package's image processing as it was before it was made faster (commit f1c84a7), verbatim except for names.
# Do not "improve" it: it is what the speed-up is measured against and what the outputs must equal bit for bit.

def _reference_hd_transform(image: Image.Image, num_crops: int) -> Image.Image:
    from phi3v.models.phi3_v.image_processing import hd_sizes

    (new_w, new_h), (padded_w, padded_h) = hd_sizes(*image.size, num_crops)
    transposed = image.width < image.height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        (new_w, new_h), (padded_w, padded_h) = (new_h, new_w), (padded_h, padded_w)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (padded_w, padded_h), (255, 255, 255))
    canvas.paste(image, (0, (padded_h - new_h) // 2))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas


def _reference_normalize(image: Image.Image, mean, std) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return pixels.sub(mean).div(std)


def _reference_image_to_crops(image: Image.Image, num_crops: int, mean, std) -> tuple[torch.Tensor, int, int]:
    canvas = _reference_normalize(_reference_hd_transform(image.convert("RGB"), num_crops), mean, std)
    channels, height, width = canvas.shape
    rows, cols, crop = height // 336, width // 336, 336
    tiles = canvas.reshape(channels, rows, crop, cols, crop).permute(1, 3, 0, 2, 4).reshape(-1, channels, crop, crop)
    glb = F.interpolate(canvas[None], size=(crop, crop), mode="bicubic", align_corners=False)[0]
    crops = torch.cat([glb[None], tiles])
    padding = crops.new_zeros(num_crops + 1 - crops.shape[0], *crops.shape[1:])
    return torch.cat([crops, padding]), canvas.shape[1], canvas.shape[2]


def reference_image_processor(images: list[Image.Image], num_crops: int, mean=None, std=None) -> dict:
    """pixel_values and image_sizes exactly as `Phi3VImageProcessor.__call__` computed them before (f1c84a7)."""
    from phi3v.models.phi3_v.image_processing import CLIP_MEAN, CLIP_STD

    pixel_values, sizes = [], []
    for image in images:
        crops, height, width = _reference_image_to_crops(image, num_crops, mean or CLIP_MEAN, std or CLIP_STD)
        pixel_values.append(crops)
        sizes.append((height, width))
    return {"pixel_values": torch.stack(pixel_values), "image_sizes": torch.tensor(sizes, dtype=torch.long)}


def speed_images() -> dict[str, Image.Image]:
    """The three shapes the speed-up is stated for: a scanned page, a photo and a video frame."""
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as photo:  # 512x600 JPEG
        photo = photo.convert("RGB")
    frame = photo.crop((0, 156, 512, 444))  # 16:9
    return {"page 1700x2200": document_page(),
            "photo 1024x768": photo.resize((1024, 768), Image.Resampling.LANCZOS),
            "frame 1280x720": frame.resize((1280, 720), Image.Resampling.LANCZOS)}


def _steps(processor, image: Image.Image, num_crops: int) -> tuple[dict, dict]:
    """The two variants as zero-argument steps that keep their last output in `outputs`."""
    outputs = {}

    def reference():
        outputs["reference"] = reference_image_processor([image], num_crops)

    def package():
        outputs["package"] = processor([image])

    return outputs, {"reference": reference, "package": package}


def compare(images: dict[str, Image.Image], crop_counts=(4, 16), repeats: int = 9) -> list[dict]:
    """Median seconds per image of the reference and the package, alternating, one row per (image, num_crops).

    Raises AssertionError if any output differs from the reference's in a single bit."""
    from phi3v.models.phi3_v.image_processing import Phi3VImageProcessor

    rows = []
    for num_crops in crop_counts:
        processor = Phi3VImageProcessor(num_crops=num_crops)
        for name, image in images.items():
            outputs, steps = _steps(processor, image, num_crops)
            samples = {variant: [] for variant in steps}
            for step in steps.values():  # warm-up
                step()
            for _ in range(repeats):  # check every call's output, not only the first
                for variant, seconds in time_alternating(steps, repeats=2, warmup=0).items():
                    samples[variant] += seconds
                for key in ("pixel_values", "image_sizes"):
                    assert torch.equal(outputs["package"][key], outputs["reference"][key]), (name, num_crops, key)
            seconds = {variant: median(values) for variant, values in samples.items()}
            rows.append({"image": name, "num_crops": num_crops, "reference_s": seconds["reference"],
                         "package_s": seconds["package"], "speedup": seconds["reference"] / seconds["package"]})
    return rows


# ------------------------------------------------------------------------------------------------- per core


def measure(processor, pages: list[bytes], num_images: int) -> dict:
    """Median seconds per image of: decode, the image processor alone, and a whole dataset item. The three are
    timed in a rotating order, so that none always runs on memory the one before it just freed."""
    from phi3v.data.conversation import Conversation, Turn
    from phi3v.data.dataset import ConversationDataset
    from phi3v.data.images import open_image

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


def run(num_images: int, num_pages: int = 3, num_crops: int = 16, repeats: int = 9) -> dict:
    from phi3v import Phi3VProcessor
    from phi3v.models.phi3_v.tiny import build_tiny_checkpoint

    torch.set_num_threads(1)  # as in a DataLoader worker
    speedup = compare(speed_images(), repeats=repeats)
    pages = [jpeg_bytes(document_page(seed=seed)) for seed in range(num_pages)]
    with tempfile.TemporaryDirectory() as directory:
        build_tiny_checkpoint(directory, num_crops=num_crops)
        processor = Phi3VProcessor.from_pretrained(directory, num_crops=num_crops)
    seconds = measure(processor, pages, num_images)
    per_core = 1 / seconds["dataset item"]
    cores = {mode: rate / NUM_GPUS / per_core for mode, rate in PUBLISHED_RATES.items()}
    return {"speedup": speedup, "repeats": repeats, "num_images": num_images, "num_crops": num_crops,
            "jpeg_kib": [len(p) / 1024 for p in pages], "seconds": seconds, "images_per_second_per_core": per_core,
            "cores_per_gpu": cores}


def report(result: dict) -> str:
    seconds = result["seconds"]
    stages = [[name, f"{value * 1e3:,.0f} ms", f"{1 / value:,.1f}"] for name, value in seconds.items()]
    feeding = [[mode, f"{rate / NUM_GPUS:.2f}", f"{result['cores_per_gpu'][mode]:.2f}"]
               for mode, rate in PUBLISHED_RATES.items()]
    kib = ", ".join(f"{k:,.0f}" for k in result["jpeg_kib"])
    speed = [[row["image"], row["num_crops"], f"{row['reference_s'] * 1e3:,.1f} ms",
              f"{row['package_s'] * 1e3:,.1f} ms", f"{row['speedup']:.2f}x"] for row in result["speedup"]]
    return "\n\n".join([
        f"**Image processor vs the previous implementation, 1 torch thread, median of {2 * result['repeats']} "
        "alternating calls each; outputs bit-identical (asserted)**",
        markdown_table(["image", "num_crops", "previous", "package", "speed-up"], speed),
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
    parser.add_argument("--repeats", type=int, default=9, help="speed-up: rounds of two alternating calls each")
    add_json_argument(parser)
    args = parser.parse_args(argv)

    result = run(args.images, num_crops=args.num_crops, repeats=args.repeats)
    markdown = report(result)
    print(markdown)
    write_json(args.json, "processor_throughput", result, markdown)
    return result


if __name__ == "__main__":
    main()
