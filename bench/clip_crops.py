"""CLIP work per image: only the real crops (ours) vs all num_crops + 1 (the official code), over realistic sizes.

    python bench/clip_crops.py [--timed_crops 2] [--json bench/results/clip_crops.json]

What: for document scans (US letter / A4 at 150-300 dpi, portrait and landscape), photos (4:3 from 640x480 to
4032x3024, portrait and square) and video frames (320x240 to 3840x2160), at num_crops 4 and 16: how many 336px
crops CLIP encodes per image. Ours: the global view + the rows x cols crops of the HD grid
(`image_processing.crop_grid`); the official model: all num_crops + 1 entries of pixel_values, the zero
padding crops included. The crop counts are exact arithmetic from the image size (no pixels).

Time saved: the CLIP forward of one crop is timed once on this machine with the full-size ViT-L/14-336 tower
(`Phi3VConfig.official()`, the 23 layers the model uses, fp32), a small batch after a 1-crop warm-up; saved time
= saved crops x that time. A frozen tower costs one forward per crop; a trained one (full fine-tuning, LoRA on
CLIP) about 3 forwards (forward + backward), which the table also shows. The ratio, not the CPU seconds, is what
carries over to a GPU.

Takes about 30-60 s on 2 CPU cores (building the tower and three CLIP forwards); `--seconds_per_crop X` skips the
measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/clip_crops.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import add_json_argument, markdown_table, ratio, write_json
from phi3v.models.phi3_v.image_processing import CROP, crop_grid

# (name, width, height) per category; the HD grid depends on the aspect ratio, so the sizes cover the usual ones.
SIZES = {
    "documents": [
        ("US letter, 150 dpi", 1275, 1650), ("US letter, 200 dpi", 1700, 2200), ("US letter, 300 dpi", 2550, 3300),
        ("A4, 150 dpi", 1240, 1754), ("A4, 200 dpi", 1654, 2339), ("A4, 300 dpi", 2480, 3508),
        ("US legal, 200 dpi", 1700, 2800), ("US letter landscape, 200 dpi", 2200, 1700),
        ("A4 landscape, 200 dpi", 2339, 1654), ("receipt, 80 mm at 203 dpi", 640, 2000),
    ],
    "photos": [
        ("VGA 4:3", 640, 480), ("SVGA 4:3", 800, 600), ("XGA 4:3", 1024, 768), ("2 MP 4:3", 1600, 1200),
        ("3 MP 4:3", 2048, 1536), ("12 MP phone 4:3", 4032, 3024), ("12 MP phone, portrait", 3024, 4032),
        ("square 1080", 1080, 1080), ("panorama 3:1", 6000, 2000),
    ],
    "video frames": [
        ("QVGA 4:3", 320, 240), ("360p 16:9", 640, 360), ("SD 4:3", 640, 480), ("720p 16:9", 1280, 720),
        ("1080p 16:9", 1920, 1080), ("4K 16:9", 3840, 2160),
    ],
}
NUM_CROPS = (4, 16)
TRAINED_TOWER_FACTOR = 3  # forward + backward ~ 3 forwards when CLIP (or LoRA on it) trains


def crops_per_image(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(CLIP crops we compute, CLIP crops the official code computes) for one image."""
    rows, cols = crop_grid(width, height, num_crops)
    return 1 + rows * cols, num_crops + 1


def category_summary(sizes: list[tuple[str, int, int]], num_crops: int) -> dict:
    """Mean crops per image (each size equally likely) for ours and the official code."""
    counts = [crops_per_image(w, h, num_crops) for _, w, h in sizes]
    ours = sum(c[0] for c in counts) / len(counts)
    official = sum(c[1] for c in counts) / len(counts)
    return {"ours": ours, "official": official, "saving": official / ours, "saved_crops": official - ours}


def seconds_per_crop(timed_crops: int = 2, threads: int | None = None) -> float:
    """Median-free single measurement: CLIP forward of `timed_crops` crops with the full-size tower, per crop."""
    from phi3v.models.phi3_v.configuration import Phi3VConfig
    from phi3v.models.phi3_v.image_embedding import Phi3VImageEmbedding

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    embedding = Phi3VImageEmbedding(Phi3VConfig.official()).eval()
    crops = torch.randn(timed_crops, 3, CROP, CROP)
    with torch.inference_mode():
        embedding.clip_features(crops[:1])  # warm-up
        start = time.perf_counter()
        embedding.clip_features(crops)
        return (time.perf_counter() - start) / timed_crops


def run(per_crop: float | None) -> dict:
    rows = []
    for category, sizes in SIZES.items():
        for name, width, height in sizes:
            row = {"category": category, "name": name, "width": width, "height": height}
            for num_crops in NUM_CROPS:
                row[f"grid_{num_crops}"] = crop_grid(width, height, num_crops)
                row[f"crops_{num_crops}"] = crops_per_image(width, height, num_crops)
            rows.append(row)
    summary = {f"{category}@{num_crops}": category_summary(sizes, num_crops)
               for category, sizes in SIZES.items() for num_crops in NUM_CROPS}
    return {"seconds_per_crop": per_crop, "sizes": rows, "summary": summary}


def report(result: dict) -> str:
    per_crop = result["seconds_per_crop"]
    size_rows = []
    for row in result["sizes"]:
        cells = [row["category"], f"{row['name']} ({row['width']}x{row['height']})"]
        for num_crops in NUM_CROPS:
            (rows, cols), (ours, official) = row[f"grid_{num_crops}"], row[f"crops_{num_crops}"]
            cells += [f"{rows}x{cols}", f"{ours} / {official}"]
        size_rows.append(cells)
    header = ["category", "image"]
    for num_crops in NUM_CROPS:
        header += [f"grid @{num_crops}", f"crops ours / official @{num_crops}"]

    summary_rows = []
    for key, s in result["summary"].items():
        category, num_crops = key.split("@")
        share = s["saved_crops"] / s["official"]
        cells = [category, num_crops, f"{s['ours']:.2f}", f"{s['official']:.0f}",
                 ratio(s["official"], s["ours"], digits=2), f"{s['saved_crops']:.2f} ({share:.0%})"]
        if per_crop is not None:
            saved = s["saved_crops"] * per_crop
            cells += [f"{saved:.2f} s", f"{saved * TRAINED_TOWER_FACTOR:.2f} s"]
        summary_rows.append(cells)
    summary_header = ["images", "num_crops", "CLIP crops/image, ours", "official", "saving (official / ours)",
                      "crops saved/image (share of CLIP work)"]
    if per_crop is not None:
        summary_header += ["CLIP time saved/image, frozen tower", "trained tower (~3x)"]
    timing = (f"Measured CLIP ViT-L/14-336 forward (23 layers, fp32, {torch.get_num_threads()} CPU threads): "
              f"{per_crop:.2f} s per crop; saved time = saved crops x that." if per_crop is not None else
              "CLIP time per crop not measured.")
    return "\n\n".join([
        "**CLIP crops per image: real crops only (ours) vs all num_crops + 1 (official)**",
        markdown_table(header, size_rows),
        "**Mean per image (sizes of a category equally likely)**",
        markdown_table(summary_header, summary_rows),
        timing,
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timed_crops", type=int, default=2, help="crops in the timed CLIP forward")
    parser.add_argument("--seconds_per_crop", type=float, default=None, help="use this instead of measuring")
    parser.add_argument("--no_timing", action="store_true", help="crop counts only")
    add_json_argument(parser)
    args = parser.parse_args(argv)

    per_crop = args.seconds_per_crop
    if per_crop is None and not args.no_timing:
        per_crop = seconds_per_crop(args.timed_crops)
    result = run(per_crop)
    markdown = report(result)
    print(markdown)
    write_json(args.json, "clip_crops", result, markdown)
    return result


if __name__ == "__main__":
    main()
