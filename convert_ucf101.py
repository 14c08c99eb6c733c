"""Convert a folder of videos (by default the UCF-101 subset from the hub) into the jsonl + frames training format.

    python convert_ucf101.py --out_dir /path/to/converted_ucf101                 # downloads sayakpaul/ucf101-subset
    python convert_ucf101.py --src UCF101_subset.tar.gz --out_dir DIR            # a local copy of the archive
    python convert_ucf101.py --src /data/my_videos --out_dir DIR --num_frames 8  # SRC/{train,val,test}/<class>/*.avi

Writes, as the original script: DIR/images/<split>/<class>/<video>.<k>.jpg (frames k = 0..num_frames-1, evenly
spaced, JPEG, original size) and DIR/ucf101_<split>.jsonl with one line per video:

    {"id": "val-0000000300", "source": "ucf101", "conversations": [{"images": ["val/BabyCrawling/v_...0.jpg", ...],
     "user": "Classify the video into one of the following classes: ApplyEyeMakeup, ....",
     "assistant": "BabyCrawling"}]}

Ids number all videos (train, then val, then test) in sorted order. Videos are decoded with PyAV in parallel
workers. Frame indices come from the decoded frame count when the container's count is missing or wrong. A video
that cannot be read is reported by name and skipped. Re-running after an interruption keeps every finished video
(frames are written under temporary names and renamed) and converts only the rest. Archives are extracted with
path checks: no member may land outside the extraction folder.
"""

from __future__ import annotations

import argparse
import os

from phi3v.common.errors import run_main
from phi3v.data.ucf101 import convert_videos, safe_extract  # noqa: F401 (safe_extract: tests)
from phi3v.data.video import frame_indices, read_frames  # noqa: F401 (re-exported)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="./ucf101", help="where images/ and the jsonl files go")
    parser.add_argument("--src", help="videos: a .tar.gz or a folder with {train,val,test}/<class>/*.avi "
                                      "(default: download the UCF-101 subset from the hub)")
    parser.add_argument("--tmp_dir", help="where to extract an archive (default: a temporary folder, removed)")
    parser.add_argument("--num_frames", type=int, default=8, help="frames per video, evenly spaced")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count(), help="parallel decoding processes")
    parser.add_argument("--no-tqdm", dest="tqdm", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    summary = convert_videos(args.src, args.out_dir, args.num_frames, args.num_workers, args.tmp_dir, args.tqdm)
    print(f"{summary['converted']} of {summary['videos']} videos converted ({summary['already_done']} were already "
          f"done) into {args.out_dir}: " + ", ".join(f"{split} {summary[split]}" for split in ("train", "val", "test"))
          + f"; {len(summary['classes'])} classes")
    for name, error in summary["unreadable"].items():
        print(f"  unreadable, skipped: {name}: {error}")
    return summary


if __name__ == "__main__":
    run_main(main)
