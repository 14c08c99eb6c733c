"""Inputs that used to give a silently wrong result now give the right one: 16-bit images, look-alike image tags,
video name collisions, a converter re-run with other --num_frames, long conversations (linear validation), and
samples that used to end in a traceback are skipped with --skip_bad_samples."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

import convert_ucf101
from phi3v.data.conversation import Conversation, Turn, render
from phi3v.data.images import open_image
from phi3v.data.jsonl import jsonl_dataset
from phi3v.data.synthetic import class_frames, write_video
from phi3v.data.validation import prepare_dataset, validate
from tests.conftest import make_image


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)  # by hand: /257 -> 0, 1, 127.5 -> 128, 255
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = open_image(tmp_path / "deep.png")
    assert image.mode == "L"
    assert np.asarray(image).tolist() == [[0, 1, 128, 255]]
    assert np.asarray(image.convert("RGB"))[0, :, 0].tolist() == [0, 1, 128, 255]  # not 99.6% white


def write_records(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(sample_id, user="Which class?", assistant="Archery", images=("good.jpg",)):
    return {"id": sample_id, "conversations": [{"images": list(images), "user": user, "assistant": assistant}]}


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    make_image(32, 24).save(root / "good.jpg")
    return root


def test_wrong_case_image_tag_is_warned_about_and_stays_text(image_root, processor, caplog):
    path = write_records(image_root.parent / "d.jsonl", [record("w", user="<|Image_1|> which class?")])
    dataset = jsonl_dataset(path, image_root, processor)
    lengths, problems = validate(dataset, workers=1, disable_tqdm=True)
    assert problems == [] and lengths[0] is not None
    assert ("d.jsonl:1 (id w): turn 1: <|Image_1|> is plain text, not an image tag (tags are lower case: "
            "<|image_1|>)") in caplog.text
    text, images, _ = render(processor, dataset.conversation(0))
    assert text.startswith("<|user|>\n<|image_1|>\n<|Image_1|> which class?")  # the image still goes in front


def test_samples_that_used_to_raise_are_skipped(image_root, processor, tmp_path):
    path = write_records(image_root.parent / "d.jsonl", [
        record("ok"), record("s", user="Which\ud800?"), record("t", assistant="see <|image_1|>"),
        record("u", user="<|placeholder1|>"), record("e", assistant="  ")])
    with open(path, "a") as f:
        f.write('{"id": ' + "[" * 100_000 + "\n")
    dataset = jsonl_dataset(path, image_root, processor)
    kept = prepare_dataset(dataset, "train", None, True, tmp_path / "out", workers=1, disable_tqdm=True)
    assert [kept.conversation(i).id for i in range(len(kept))] == ["ok"]
    listing = (tmp_path / "out" / "skipped_samples_train.jsonl").read_text().splitlines()
    skipped = [json.loads(line) for line in listing]
    assert [s["where"] for s in skipped] == [f"d.jsonl:{n}" for n in range(2, 7)]


def test_rendering_is_linear_and_equals_the_prefix_rendering(processor):
    short = Conversation("c", [Turn(f"q{k}", f"a{k}", []) for k in range(3)])
    assert render(processor, short) == render(processor, short, False, by_prefixes=True)
    assert render(processor, short, True) == render(processor, short, True, by_prefixes=True)
    long = Conversation("c", [Turn(f"question {k}?", f"answer {k}", []) for k in range(2000)])
    started = time.monotonic()
    text, _, spans = render(processor, long)
    assert time.monotonic() - started < 5  # the prefix rendering takes minutes on 2,000 turns
    assert len(spans) == 2000 and text[spans[1999][0]:spans[1999][1]] == "answer 1999<|end|>\n<|endoftext|>"


def video(path, seed):
    return write_video(path, list(class_frames(seed, 3, 8, (32, 24), seed=seed)))


def frames_of(out, split="train"):
    records = [json.loads(line) for line in (out / f"ucf101_{split}.jsonl").read_text().splitlines()]
    return {r["conversations"][0]["assistant"] + ":" + r["id"]: r["conversations"][0]["images"] for r in records}


def test_converter_names_colliding_videos_apart_and_redoes_other_frame_counts(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    video(src / "train" / "Archery" / "clip.avi", 0)
    video(src / "train" / "Archery" / "clip.mp4", 1)
    args = ["--src", str(src), "--out_dir", str(out), "--num_workers", "1", "--no-tqdm"]
    convert_ucf101.main([*args, "--num_frames", "4"])
    images = list(frames_of(out).values())
    assert len(images) == 2 and images[0] != images[1]  # two videos, two sets of frames
    first = [np.asarray(Image.open(out / "images" / p)) for p in images[0]]
    second = [np.asarray(Image.open(out / "images" / p)) for p in images[1]]
    assert not np.array_equal(first[0], second[0])  # each set decoded from its own video

    before = (out / "images" / images[0][1]).read_bytes()  # frame 1 of 4: source frame 2
    summary = convert_ucf101.main([*args, "--num_frames", "2"])
    assert summary["already_done"] == 0 and summary["converted"] == 2
    again = list(frames_of(out).values())
    assert (out / "images" / again[0][1]).read_bytes() != before  # frame 1 of 2 is source frame 4, re-decoded
    assert convert_ucf101.main([*args, "--num_frames", "2"])["already_done"] == 2  # same count: kept


def test_converter_reports_a_named_pipe_within_a_second(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    video(src / "train" / "Archery" / "good.avi", 0)
    os.mkfifo(src / "train" / "Archery" / "pipe.avi")
    started = time.monotonic()
    summary = convert_ucf101.main(["--src", str(src), "--out_dir", str(out), "--num_workers", "1", "--no-tqdm",
                                   "--num_frames", "2"])
    assert time.monotonic() - started < 10
    assert summary["unreadable"] == {"train/Archery/pipe.avi": "not a regular file (a named pipe, socket or device): "
                                                                "refused, reading it could block"}
