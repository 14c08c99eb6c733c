"""Videos -> evenly spaced JPEG frames + our jsonl, the layout the ucf101 recipe trains on (convert_ucf101.py is its
command line; its docstring describes the output). A video that cannot be read is reported and skipped; a re-run
keeps every finished video; archives are extracted with path checks."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from phi3v.common.errors import BadValue, UserError
from phi3v.data.video import VIDEO_EXTENSIONS, describe_error, read_frames

SPLITS = ("train", "val", "test")
HUB_REPO, HUB_FILE = "sayakpaul/ucf101-subset", "UCF101_subset.tar.gz"


def convert_video(job: tuple[str, list[Path], bool]) -> str | None:
    """Write the frames of one video (atomically; one already done is skipped unless `redo`): an error, or None."""
    source, targets, redo = job
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


def convert_videos(src: str | None, out_dir: str | Path, num_frames: int = 8, num_workers: int | None = None,
                   tmp_dir: str | None = None, progress: bool = True) -> dict:
    """Convert SRC/{train,val,test}/<class>/<videos> (a folder or .tar.gz; None: the hub archive) into OUT_DIR;
    returns the summary also written to OUT_DIR/convert_report.json."""
    if num_frames < 1:
        raise UserError(f"--num_frames must be >= 1, got {num_frames}")
    out_dir = Path(out_dir)
    work_dir = Path(tmp_dir or tempfile.mkdtemp(prefix="ucf101-"))
    try:
        root = find_source(src, work_dir)
        videos = [(split, p) for split in SPLITS for p in sorted((root / split).glob("*/*"))
                  if p.suffix.lower() in VIDEO_EXTENSIONS]
        if not videos:
            raise UserError(f"--src {src or HUB_FILE}: no videos ({', '.join(VIDEO_EXTENSIONS)}) in "
                            f"{root}/{{train,val,test}}/<class>/; nothing was written")
        classes = sorted({p.parent.name for _, p in videos})
        prompt = "Classify the video into one of the following classes: " + ", ".join(classes) + "."
        # frames are named after the video's stem, or after its whole name where two videos share a stem
        # (clip.avi and clip.mp4 in one class); frames of another --num_frames are never taken as done
        stems = [(split, p.parent, p.stem) for split, p in videos]
        settings = out_dir / "images" / "convert_settings.json"
        fresh = settings.is_file() and json.loads(settings.read_text()).get("num_frames") != num_frames
        jobs = []
        for split, path in videos:
            folder = out_dir / "images" / split / path.parent.name
            stem = path.stem if stems.count((split, path.parent, path.stem)) == 1 else path.name.replace(".", "_")
            jobs.append((str(path), [folder / f"{stem}.{k}.jpg" for k in range(num_frames)], fresh))
        done_before = 0 if fresh else sum(all(t.is_file() for t in targets) for _, targets, _ in jobs)
        if not settings.is_file():  # the first run: what an interrupted run's frames were made with
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps({"num_frames": num_frames}))
        from tqdm.auto import tqdm

        with ProcessPoolExecutor(max(1, num_workers or os.cpu_count() or 1)) as pool:
            errors = list(tqdm(pool.map(convert_video, jobs, chunksize=4), total=len(jobs), desc="converting videos",
                               disable=not progress))
        failed = {}
        lines = {split: [] for split in SPLITS}
        for index, ((split, path), (_, targets, _), error) in enumerate(zip(videos, jobs, errors)):
            if error:
                failed[str(path.relative_to(root))] = error
                continue
            images = [t.relative_to(out_dir / "images").as_posix() for t in targets]
            lines[split].append({"id": f"{split}-{index:010d}", "source": "ucf101", "conversations": [
                {"images": images, "user": prompt, "assistant": path.parent.name}]})
        for split, records in lines.items():
            if not (root / split).is_dir():
                continue  # no test/ folder: no test file (the training script treats the test split as optional)
            temporary = out_dir / f".ucf101_{split}.jsonl.tmp"
            temporary.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(temporary, out_dir / f"ucf101_{split}.jsonl")
        settings.write_text(json.dumps({"num_frames": num_frames}))  # every video now has these frames
    finally:
        if tmp_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)

    summary = {"videos": len(videos), "converted": len(videos) - len(failed), "already_done": done_before,
               "unreadable": failed, "classes": classes, **{split: len(lines[split]) for split in SPLITS}}
    (out_dir / "convert_report.json").write_text(json.dumps(summary, indent=1))
    return summary
