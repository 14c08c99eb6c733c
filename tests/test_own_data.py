"""Your own data: file flags of the generic recipe, readers by content, video on the fly, validation at scale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import finetune_hf_trainer_ucf101 as ucf101
from phi3v.args import parse_args
from phi3v.errors import UserError
from tests.conftest import ucf_args


def file_args(tiny_dir, output_dir, *extra: str) -> list[str]:
    """ucf_args without --data_dir."""
    args = ucf_args(tiny_dir, "unused", output_dir, *extra)
    i = args.index("--data_dir")
    return args[:i] + args[i + 2:]


def data_args(*argv: str):
    return parse_args(ucf101.DataArguments, list(argv))[1]


# ------------------------------------------------------------------------------------------------- file flags


def test_data_dir_layout_with_and_without_test(ucf_data, tmp_path):
    files = ucf101.data_files(data_args("--data_dir", str(ucf_data)))
    assert files == {split: (ucf_data / f"ucf101_{split}.jsonl", ucf_data / "images") for split in ("train", "val",
                                                                                                     "test")}
    shutil.copytree(ucf_data, tmp_path / "d")
    (tmp_path / "d" / "ucf101_test.jsonl").unlink()
    assert list(ucf101.data_files(data_args("--data_dir", str(tmp_path / "d")))) == ["train", "val"]
    (tmp_path / "d" / "ucf101_val.jsonl").unlink()
    with pytest.raises(UserError, match=r"ucf101_val.jsonl not found: run convert_ucf101.py first"):
        ucf101.data_files(data_args("--data_dir", str(tmp_path / "d")))


def test_file_flags_and_image_root(tmp_path):
    for name in ("train.jsonl", "val.json", "sub/test.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    train, val, test = tmp_path / "train.jsonl", tmp_path / "val.json", tmp_path / "sub" / "test.jsonl"
    files = ucf101.data_files(data_args("--train_file", str(train), "--eval_file", str(val), "--test_file", str(test)))
    assert files == {"train": (train, tmp_path), "val": (val, tmp_path), "test": (test, tmp_path / "sub")}
    files = ucf101.data_files(data_args("--train_file", str(train), "--eval_file", str(val), "--image_root", "/img"))
    assert files == {"train": (train, Path("/img")), "val": (val, Path("/img"))}
    with pytest.raises(UserError, match="either --data_dir or --train_file"):
        ucf101.data_files(data_args("--data_dir", str(tmp_path), "--train_file", str(train)))
    with pytest.raises(UserError, match="pass --train_file and --eval_file"):
        ucf101.data_files(data_args("--train_file", str(train)))
    with pytest.raises(UserError, match="missing.jsonl not found"):
        ucf101.data_files(data_args("--train_file", str(train), "--eval_file", str(tmp_path / "missing.jsonl")))


def test_trains_on_a_file_pair_without_test(tiny_dir, ucf_data, tmp_path):
    for split, name in (("train", "mine.jsonl"), ("val", "held_out.jsonl")):
        shutil.copy(ucf_data / f"ucf101_{split}.jsonl", tmp_path / name)
    out = tmp_path / "out"
    ucf101.main(file_args(tiny_dir, out, "--train_file", str(tmp_path / "mine.jsonl"), "--eval_file",
                          str(tmp_path / "held_out.jsonl"), "--image_root", str(ucf_data / "images"),
                          "--max_steps", "1", "--no_eval_before_training"))
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_after_accuracy" in results and "train_loss" in results
    assert not any(key.startswith("test_") for key in results)
    assert results["eval_after_samples"] == 3


def test_converter_writes_no_test_file_without_test_videos(tmp_path):
    import convert_ucf101
    from phi3v.synthetic import make_video_dataset

    make_video_dataset(tmp_path / "videos", classes=["Archery", "Basketball"], videos_per_split={"train": 1, "val": 1},
                       num_frames=4, size=(32, 24))
    summary = convert_ucf101.main(["--src", str(tmp_path / "videos"), "--out_dir", str(tmp_path / "out"),
                                   "--num_frames", "2", "--num_workers", "1", "--no-tqdm"])
    assert (summary["train"], summary["val"], summary["test"]) == (2, 2, 0)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == ["ucf101_train.jsonl", "ucf101_val.jsonl"]
    assert list(ucf101.data_files(data_args("--data_dir", str(tmp_path / "out")))) == ["train", "val"]


def test_predict_names_an_unreadable_video(tmp_path):
    import predict

    (tmp_path / "clip.mp4").write_bytes(b"not a video" * 50)
    with pytest.raises(UserError, match=r"--video .*clip.mp4: invalid data: not a video file"):
        predict.video_frames(tmp_path / "clip.mp4", 4)
    with pytest.raises(UserError, match=r"--video .*gone.mp4: file not found"):
        predict.video_frames(tmp_path / "gone.mp4", 4)
