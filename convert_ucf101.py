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
import json
import os
import shutil
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from phi3v.errors import BadValue, UserError, run_main
from phi3v.video import VIDEO_EXTENSIONS, describe_error, frame_indices, read_frames  # noqa: F401 (re-exported)

SPLITS = ("train", "val", "test")
HUB_REPO, HUB_FILE = "sayakpaul/ucf101-subset", "UCF101_subset.tar.gz"


def convert_video(job: tuple[str, Path, list[Path], bool]) -> str | None:
    """Write the frames of one video (atomically, skipping a video already done unless `redo`); the error message,
    or None."""
    source, _, targets, redo = job
    if not redo and all(t.is_file() for t in targets):
        return None
    try:
        frames = read_frames(source, len(targets))
        if len(frames) != len(targets):
            raise ValueError(f"decoded {len(frames)} of {len(targets)} frames")
        for frame, target in zip(frames, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp")
            frame.save(temporary, format="JPEG")
            os.replace(temporary, target)
    except Exception as error:  # any unreadable video is reported and skipped, never fatal
        return describe_error(error)
    return None


def safe_extract(archive: str | Path, target: Path) -> Path:
    """Extract a tar archive into `target`, refusing members that would land outside it (.., absolute, links)."""
    target = target.resolve()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            destination = (target / member.name).resolve()
            if not destination.is_relative_to(target) or member.issym() or member.islnk() or member.isdev():
                raise BadValue(f"{archive}: refusing to extract {member.name!r}: it would write outside {target} "
                               "or is a link/device")
        tar.extractall(target, filter="data")
    return target


def find_source(src: str | None, work_dir: Path) -> Path:
    """The folder holding {train,val,test}/<class>/<videos>: --src (folder or .tar.gz) or the hub archive."""
    if src is None:
        try:
            from huggingface_hub import hf_hub_download

            src = hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset")
        except Exception as error:
            raise UserError(f"could not download {HUB_FILE} from the hub dataset {HUB_REPO} "
                            f"({type(error).__name__}). Offline? Pass --src with a local copy of the archive or an "
                            f"extracted folder (SRC/{{train,val,test}}/<class>/*.avi).") from error
    src = Path(src)
    if src.is_file():
        src = safe_extract(src, work_dir)
    if not src.is_dir():
        raise UserError(f"--src {src}: no such file or folder")
    for candidate in [src, *sorted(p for p in src.iterdir() if p.is_dir())]:
        if any((candidate / split).is_dir() for split in SPLITS):
            return candidate
    raise UserError(f"--src {src}: expected {{train,val,test}}/<class>/<videos> folders inside it")


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

    if args.num_frames < 1:
        raise UserError(f"--num_frames must be >= 1, got {args.num_frames}")
    out_dir = Path(args.out_dir)
    work_dir = Path(args.tmp_dir or tempfile.mkdtemp(prefix="ucf101-"))
    try:
        root = find_source(args.src, work_dir)
        videos = [(split, p) for split in SPLITS for p in sorted((root / split).glob("*/*"))
                  if p.suffix.lower() in VIDEO_EXTENSIONS]
        if not videos:
            raise UserError(f"--src {args.src or HUB_FILE}: no videos ({', '.join(VIDEO_EXTENSIONS)}) in "
                            f"{root}/{{train,val,test}}/<class>/; nothing was written")
        classes = sorted({p.parent.name for _, p in videos})
        prompt = "Classify the video into one of the following classes: " + ", ".join(classes) + "."
        # frames are named after the video's stem, or after its whole name where two videos share a stem
        # (clip.avi and clip.mp4 in one class); frames of another --num_frames are never taken as done
        stems = [(split, p.parent, p.stem) for split, p in videos]
        settings = out_dir / "images" / "convert_settings.json"
        fresh = settings.is_file() and json.loads(settings.read_text()).get("num_frames") != args.num_frames
        jobs = []
        for split, path in videos:
            folder = out_dir / "images" / split / path.parent.name
            stem = path.stem if stems.count((split, path.parent, path.stem)) == 1 else path.name.replace(".", "_")
            jobs.append((str(path), folder, [folder / f"{stem}.{k}.jpg" for k in range(args.num_frames)], fresh))
        done_before = 0 if fresh else sum(all(t.is_file() for t in targets) for _, _, targets, _ in jobs)
        if not settings.is_file():  # the first run: what an interrupted run's frames were made with
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps({"num_frames": args.num_frames}))
        from tqdm.auto import tqdm

        with ProcessPoolExecutor(max(1, args.num_workers)) as pool:
            errors = list(tqdm(pool.map(convert_video, jobs, chunksize=4), total=len(jobs), desc="converting videos",
                               disable=not args.tqdm))
        failed = {}
        lines = {split: [] for split in SPLITS}
        for index, ((split, path), (_, _, targets, _), error) in enumerate(zip(videos, jobs, errors)):
            if error:
                failed[str(path.relative_to(root))] = error
                continue
            images = [t.relative_to(out_dir / "images").as_posix() for t in targets]
            lines[split].append({"id": f"{split}-{index:010d}", "source": "ucf101", "conversations": [
                {"images": images, "user": prompt, "assistant": path.parent.name}]})
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, records in lines.items():
            if not (root / split).is_dir():
                continue  # no test/ folder: no test file (the training script treats the test split as optional)
            temporary = out_dir / f".ucf101_{split}.jsonl.tmp"
            temporary.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(temporary, out_dir / f"ucf101_{split}.jsonl")
        settings.write_text(json.dumps({"num_frames": args.num_frames}))  # every video now has these frames
    finally:
        if args.tmp_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    summary = {"videos": len(videos), "converted": len(videos) - len(failed), "already_done": done_before,
               "unreadable": failed, "classes": classes, **{split: len(lines[split]) for split in SPLITS}}
    (out_dir / "convert_report.json").write_text(json.dumps(summary, indent=1))
    print(f"{summary['converted']} of {len(videos)} videos converted ({done_before} were already done) into "
          f"{out_dir}: " + ", ".join(f"{split} {len(lines[split])}" for split in SPLITS) + f"; {len(classes)} classes")
    for name, error in failed.items():
        print(f"  unreadable, skipped: {name}: {error}")
    return summary


if __name__ == "__main__":
    run_main(main)
