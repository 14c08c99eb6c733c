"""convert_ucf101.py on synthetic videos: layout, ids, prompt, frame choice, bad videos, reruns, archives."""

from __future__ import annotations

import io
import json
import tarfile

import av
import numpy as np
import pytest

import convert_ucf101
from phi3v.common.errors import UserError
from phi3v.data.synthetic import class_frames, make_video_dataset, write_video

CLASSES = ["Archery", "BabyCrawling", "Basketball"]


@pytest.fixture
def videos(tmp_path):
    root = make_video_dataset(tmp_path / "UCF101_subset", classes=CLASSES,
                              videos_per_split={"train": 2, "val": 1, "test": 1}, num_frames=20, size=(64, 48))
    return root


def run(src, out, *extra):
    return convert_ucf101.main(["--src", str(src), "--out_dir", str(out), "--num_workers", "2", "--no-tqdm", *extra])


def read(out, split):
    return [json.loads(line) for line in (out / f"ucf101_{split}.jsonl").read_text().splitlines()]


def test_frame_indices():
    assert convert_ucf101.frame_indices(300, 8) == [0, 37, 75, 112, 150, 187, 225, 262]
    assert convert_ucf101.frame_indices(8, 8) == list(range(8))
    assert convert_ucf101.frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]  # short clips repeat frames, never 9
    with pytest.raises(ValueError, match="no frames"):
        convert_ucf101.frame_indices(0, 8)


def test_layout_ids_and_prompt(videos, tmp_path):
    out = tmp_path / "out"
    summary = run(videos, out)
    assert (summary["train"], summary["val"], summary["test"], summary["unreadable"]) == (6, 3, 3, {})
    train, val = read(out, "train"), read(out, "val")
    assert [r["id"] for r in train] == [f"train-{i:010d}" for i in range(6)]
    assert [r["id"] for r in val] == [f"val-{i:010d}" for i in range(6, 9)]  # numbered over all videos
    record = val[1]
    assert record["source"] == "ucf101" and len(record["conversations"]) == 1
    turn = record["conversations"][0]
    assert turn["user"] == "Classify the video into one of the following classes: Archery, BabyCrawling, Basketball."
    assert turn["assistant"] == "BabyCrawling"
    assert turn["images"] == [f"val/BabyCrawling/v_BabyCrawling_g01_c01.{k}.jpg" for k in range(8)]
    for image in turn["images"]:
        assert (out / "images" / image).is_file()


def test_frames_are_evenly_spaced_and_follow_the_decoded_count(tmp_path):
    # every frame has its own brightness so we can tell which ones were picked
    frames = [class_frames(0, 3, 1, (64, 48), seed)[0] * 0 + 10 * k for k, seed in enumerate(range(20))]
    src = tmp_path / "src"
    write_video(src / "train" / "Archery" / "counted.avi", frames)
    write_video(src / "train" / "Archery" / "uncounted.mkv", frames)  # Matroska: the container says 0 frames
    with av.open(str(src / "train" / "Archery" / "uncounted.mkv")) as container:
        assert container.streams.video[0].frames == 0
    out = tmp_path / "out"
    assert run(src, out, "--num_frames", "4")["converted"] == 2
    for stem in ("counted", "uncounted"):
        suffix = "avi" if stem == "counted" else "mkv"
        picked = convert_ucf101.read_frames(src / "train" / "Archery" / f"{stem}.{suffix}", 4)
        brightness = [round(sum(f.convert("L").getdata()) / (64 * 48) / 10) for f in picked]
        assert brightness == [0, 5, 10, 15], stem  # frames 0, 5, 10, 15 of 20


def test_bad_videos_are_reported_and_skipped(videos, tmp_path):
    bad = videos / "train" / "Archery"
    (bad / "not_a_video.avi").write_bytes(b"hello" * 100)
    good = (bad / "v_Archery_g01_c01.avi").read_bytes()
    (bad / "truncated.avi").write_bytes(good[: int(len(good) * 0.8)])
    with av.open(str(bad / "audio_only.mkv"), "w") as audio:
        stream = audio.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            audio.mux(packet)
    out = tmp_path / "out"
    summary = run(videos, out)
    assert summary["unreadable"] == {
        "train/Archery/audio_only.mkv": "no video stream",
        "train/Archery/not_a_video.avi": "invalid data: not a video file, or a corrupt one",
        "train/Archery/truncated.avi": "truncated: the container announces 20 frames but only 1 decode",
    }
    assert summary["converted"] == 12 and summary["videos"] == 15
    assert len(read(out, "train")) == 6  # the good ones around them are all there
    assert not list((out / "images" / "train" / "Archery").glob("truncated*"))


def test_rerun_keeps_finished_videos_and_completes_the_rest(videos, tmp_path):
    out = tmp_path / "out"
    first = run(videos, out)
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.jpg")}
    jsonl = (out / "ucf101_train.jsonl").read_text()
    # an interrupted run: one video half written (a frame missing, a stray temp file), the jsonl not yet written
    victim = sorted(before)[0]
    victim.unlink()
    (victim.parent / f".{victim.name}.tmp").write_bytes(b"partial")
    (out / "ucf101_train.jsonl").unlink()
    second = run(videos, out)
    assert second["already_done"] == first["converted"] - 1
    assert (out / "ucf101_train.jsonl").read_text() == jsonl
    redone = {p for p, t in before.items() if p.stat().st_mtime_ns != t}
    stem = victim.name.rsplit(".", 2)[0]
    assert redone == {p for p in before if p.parent == victim.parent and p.name.startswith(stem + ".")}
    assert not (victim.parent / f".{victim.name}.tmp").exists()  # rewritten and renamed into place


def test_archive_source_and_path_checks(videos, tmp_path):
    archive = tmp_path / "UCF101_subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(videos, arcname="UCF101_subset")
    out = tmp_path / "out"
    assert run(archive, out)["converted"] == 12

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        payload = b"owned"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=r"refusing to extract '\.\./escaped\.txt'"):
        run(evil, tmp_path / "out2", "--tmp_dir", str(work))
    assert not (tmp_path / "escaped.txt").exists()


def test_hub_source_offline_names_src(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Pass --src"):
        convert_ucf101.main(["--out_dir", str(tmp_path)])
