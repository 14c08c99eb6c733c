"""`python -m phi3v.data convert IN OUT`: data of any supported format written as our jsonl, to inspect what will be
trained (embedded images are written beside it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from phi3v.common.errors import Parser, UserError
from phi3v.data.conversation import Conversation
from phi3v.data.formats import FORMATS, detect_format, load_data
from phi3v.data.images import open_image
from phi3v.data.video import VideoFrame


def to_record(conversation: Conversation, image_root: Path, save_image) -> dict:
    """Our jsonl record for a conversation; `save_image(ref, name)` returns the relative path of an embedded image."""
    turns = []
    for number, turn in enumerate(conversation.turns):
        images, videos = [], []
        for k, ref in enumerate(turn.images):
            if isinstance(ref, VideoFrame):
                if ref.index == 0:
                    videos.append(ref.path.relative_to(image_root.resolve()).as_posix())
            elif videos:
                raise UserError(f"sample {conversation.id}: an image after a video in one turn cannot be written in "
                                "our format (its video frames follow the images); train from the original file")
            elif isinstance(ref, Path):
                images.append(ref.relative_to(image_root.resolve()).as_posix())
            else:
                images.append(save_image(ref, f"{conversation.id}-{number}-{k}"))
        # the default layout: our reader puts the tags back (for any --num_frames)
        default = "".join(f"<|image_{k + 1}|>" for k in range(len(turn.images))) + "\n"
        user = turn.user.removeprefix(default) if turn.images else turn.user
        entry = {"images": images, "user": user, "assistant": turn.assistant}
        if videos:
            entry["videos"] = videos
        turns.append(entry)
    system = {"system": conversation.system} if conversation.system is not None else {}
    return {"id": conversation.id, **system, "conversations": turns}


def convert(source: str, target: str, data_format: str = "auto", image_root: str | None = None,
            split: str = "train", config: str | None = None, num_frames: int = 8) -> dict:
    """Write `source` (any format) as our jsonl `target`; embedded images go to TARGET_images/. Stops at the first
    bad record, naming it."""
    data_format = detect_format(source) if data_format == "auto" else data_format
    dataset = load_data(source, None, image_root, data_format, split=split, config=config, num_frames=num_frames)
    if dataset.load_problems:
        raise UserError(f"{source}: {len(dataset.load_problems)} unreadable record(s)",
                        [str(p) for p in dataset.load_problems])
    target = Path(target)
    root = target.parent / f"{target.stem}_images" if data_format == "hf" else Path(image_root or Path(source).parent)

    def save_image(ref, name: str) -> str:
        image = open_image(ref, decode=False)
        suffix = (image.format or "png").lower().replace("jpeg", "jpg")
        root.mkdir(parents=True, exist_ok=True)
        file = re.sub(r"[^\w.-]", "_", name) + f".{suffix}"
        if isinstance(ref, bytes):
            (root / file).write_bytes(ref)
        else:
            image.save(root / file, format="PNG")
        return file

    lines = []
    for index in range(len(dataset)):
        try:
            lines.append(json.dumps(to_record(dataset.conversation(index), root, save_image), ensure_ascii=False))
        except ValueError as error:
            raise UserError(f"{source} {dataset.where(index)}: {error}") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {"records": len(lines), "format": data_format, "image_root": str(root)}


def build_parser():
    parser = Parser(prog="python -m phi3v.data", description="Write data of any supported format "
                                     "(ours, LLaVA, messages, Hugging Face dataset) as our jsonl, to inspect it.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("convert", help="IN (any format) -> OUT (our jsonl)")
    command.add_argument("source", metavar="IN", help="a json/jsonl file, a dataset folder, a parquet file, a hub id")
    command.add_argument("target", metavar="OUT", help="the jsonl file to write")
    command.add_argument("--data_format", default="auto", choices=FORMATS)
    command.add_argument("--image_root", help="folder IN's image paths are relative to (default: beside IN); OUT "
                                              "keeps paths relative to it")
    command.add_argument("--split", default="train", help="Hugging Face dataset split")
    command.add_argument("--dataset_config", help="Hugging Face dataset config")
    command.add_argument("--num_frames", type=int, default=8, help="frames per video")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    summary = convert(args.source, args.target, args.data_format, args.image_root, args.split, args.dataset_config,
                      args.num_frames)
    print(f"{summary['records']} records ({summary['format']}) written to {args.target}; train with "
          f"--train_file {args.target} --image_root {summary['image_root']}")
    return summary
