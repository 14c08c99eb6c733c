"""Your own data: file flags of the generic recipe, readers by content, video on the fly, validation at scale."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune_hf_trainer_ucf101 as ucf101
from phi3v.common.errors import UserError
from phi3v.train.parsing import parse_args
from tests.conftest import ucf_args

REPO = Path(__file__).resolve().parents[1]


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


def test_trains_on_llava_and_messages_files_without_test(tiny_dir, ucf_data, tmp_path):
    """One command, no conversion step: LLaVA json for training, messages jsonl for evaluation, no test split."""
    records = {split: [json.loads(line) for line in (ucf_data / f"ucf101_{split}.jsonl").read_text().splitlines()]
               for split in ("train", "val")}
    llava = [{"id": r["id"], "image": t["images"], "conversations": [
        {"from": "human", "value": t["user"]}, {"from": "gpt", "value": t["assistant"]}]}
        for r in records["train"] for t in r["conversations"]]
    messages = [{"id": r["id"], "images": t["images"], "messages": [
        {"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["assistant"]}]}
        for r in records["val"] for t in r["conversations"]]
    (tmp_path / "mine.json").write_text(json.dumps(llava))
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(m) + "\n" for m in messages))
    out = tmp_path / "out"
    ucf101.main(file_args(tiny_dir, out, "--train_file", str(tmp_path / "mine.json"), "--eval_file",
                          str(tmp_path / "held_out.jsonl"), "--image_root", str(ucf_data / "images"),
                          "--max_steps", "1", "--no_eval_before_training"))
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_after_accuracy" in results and "train_loss" in results
    assert not any(key.startswith("test_") for key in results)
    assert results["eval_after_samples"] == 3


def test_converter_writes_no_test_file_without_test_videos(tmp_path):
    import convert_ucf101
    from phi3v.data.synthetic import make_video_dataset

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


# ------------------------------------------------------------------------------------------------- formats

SYSTEM = "You are a careful assistant."


def write_three_formats(root: Path) -> dict[str, Path]:
    """The same three samples in ours, LLaVA (json array), messages (jsonl) and a Hugging Face dataset (save_to_disk
    and parquet). a: text turn then an image turn, with a system prompt; b: two images, two turns; c: text only."""
    import datasets

    from tests.conftest import make_image

    images = {"red.png": make_image(40, 30, seed=1), "cat.png": make_image(50, 70, seed=2),
              "dog.png": make_image(90, 40, seed=3)}
    for name, image in images.items():
        image.save(root / name)
    ours = [
        {"id": "a", "system": SYSTEM, "conversations": [
            {"user": "Hello.", "assistant": "Hi!"},
            {"images": ["red.png"], "user": "What colour?", "assistant": "red"}]},
        {"id": "b", "conversations": [{"images": ["cat.png", "dog.png"], "user": "Same animal?", "assistant": "no"},
                                      {"user": "Sure?", "assistant": "yes"}]},
        {"id": "c", "conversations": [{"user": "Say hi.", "assistant": "hi"}]},
    ]
    llava = [
        {"id": "a", "image": "red.png", "conversations": [
            {"from": "system", "value": SYSTEM}, {"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hi!"},
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "b", "image": ["cat.png", "dog.png"], "conversations": [  # no tags: images go in front, as ours
            {"from": "human", "value": "Same animal?"}, {"from": "gpt", "value": "no"},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
    ]
    messages = [
        {"id": "a", "images": ["red.png"], "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "<image>\nWhat colour?"},
            {"role": "assistant", "content": "red"}]},
        {"id": "b", "images": ["cat.png", "dog.png"], "messages": [
            {"role": "user", "content": "<image><image>\nSame animal?"}, {"role": "assistant", "content": "no"},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}]},
        {"id": "c", "images": [], "messages": [{"role": "user", "content": "Say hi."},
                                               {"role": "assistant", "content": "hi"}]},
    ]
    files = {"ours": root / "ours.jsonl", "llava": root / "llava.json", "messages": root / "messages.jsonl"}
    files["ours"].write_text("".join(json.dumps(r) + "\n" for r in ours))
    files["llava"].write_text(json.dumps(llava, indent=1))
    files["messages"].write_text("".join(json.dumps(r) + "\n" for r in messages))
    features = datasets.Features({"id": datasets.Value("string"), "messages": [{"role": datasets.Value("string"),
                                  "content": datasets.Value("string")}], "images": [datasets.Image()]})
    rows = {"id": [r["id"] for r in messages], "messages": [r["messages"] for r in messages],
            "images": [[images[name] for name in r["images"]] for r in messages]}
    hub = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": hub}).save_to_disk(str(root / "hf_disk"))
    (root / "hf_parquet" / "data").mkdir(parents=True)
    hub.to_parquet(str(root / "hf_parquet" / "data" / "train-00000-of-00001.parquet"))
    files["hf_disk"], files["hf_parquet"] = root / "hf_disk", root / "hf_parquet"
    return files


def batch_of(dataset):
    from phi3v.models.phi3_v.collator import Phi3VCollator

    return Phi3VCollator(dataset.processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


def test_the_same_samples_in_every_format_give_identical_batches(processor, tmp_path):
    from phi3v.data.conversation import render
    from phi3v.data.formats import detect_format, load_data
    from phi3v.data.jsonl import SampleError

    files = write_three_formats(tmp_path)
    assert {name: detect_format(path) for name, path in files.items()} == {
        "ours": "ours", "llava": "llava", "messages": "messages", "hf_disk": "hf", "hf_parquet": "hf"}
    reference = batch_of(load_data(files["ours"], processor))
    assert reference["sample_ids"] == ["a", "b", "c"] and reference["pixel_values"].shape[0] == 3
    for name in ("llava", "messages", "hf_disk", "hf_parquet"):
        batch = batch_of(load_data(files[name], processor))
        assert batch["sample_ids"] == reference["sample_ids"], name
        for key in ("input_ids", "labels", "attention_mask", "pixel_values", "image_sizes"):
            assert torch.equal(batch[key], reference[key]), (name, key)
    forced = batch_of(load_data(files["llava"], processor, data_format="llava"))
    assert torch.equal(forced["input_ids"], reference["input_ids"])
    with pytest.raises(SampleError, match='"messages" must be a list'):
        load_data(files["llava"], processor, data_format="messages").conversation(0)
    with pytest.raises(UserError, match="--data_format must be one of auto, ours, llava, messages, hf"):
        load_data(files["ours"], processor, data_format="sharegpt")
    # the system message as the chat template renders it (spec: "<|role|>\n" + content + "<|end|>\n"), never trained
    dataset = load_data(files["llava"], processor)
    text, _, _ = render(processor, dataset.conversation(0))
    assert text == (f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\nHello.<|end|>\n<|assistant|>\nHi!<|end|>\n"
                    "<|user|>\n<|image_1|>\nWhat colour?<|end|>\n<|assistant|>\nred<|end|>\n<|endoftext|>")
    supervised = processor.decode([t for t in reference["labels"][0].tolist() if t != -100])
    assert "careful" not in supervised and "Hi!" in supervised and "red" in supervised


def test_files_with_a_byte_order_mark_are_read_as_without(processor, tmp_path):
    """Windows editors start a UTF-8 file with a byte-order mark (EF BB BF): our jsonl, a LLaVA json array and a
    messages jsonl with one validate and give the batches they give without it."""
    import codecs

    from phi3v.data.formats import load_data
    from phi3v.data.validation import validate

    files = write_three_formats(tmp_path)
    reference = batch_of(load_data(files["ours"], processor))
    for name in ("ours", "llava", "messages"):
        files[name].write_bytes(codecs.BOM_UTF8 + files[name].read_bytes())
        dataset = load_data(files[name], processor)
        assert validate(dataset, disable_tqdm=True)[1] == [], name
        batch = batch_of(dataset)
        assert batch["sample_ids"] == ["a", "b", "c"] and torch.equal(batch["input_ids"], reference["input_ids"])


def test_convert_writes_our_jsonl_from_every_format(processor, tmp_path):
    from phi3v.data.convert import main
    from phi3v.data.formats import load_data

    files = write_three_formats(tmp_path)
    reference = batch_of(load_data(files["ours"], processor))
    for name in ("llava", "messages", "hf_disk"):
        out = tmp_path / "converted" / f"{name}.jsonl"
        summary = main(["convert", str(files[name]), str(out)])
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in records] == ["a", "b", "c"] and records[0]["system"] == SYSTEM
        assert records[1]["conversations"][0]["user"] == "Same animal?"  # default layout: tags left to the reader
        batch = batch_of(load_data(out, processor, image_root=summary["image_root"]))
        for key in ("input_ids", "labels", "pixel_values", "image_sizes"):
            assert torch.equal(batch[key], reference[key]), (name, key)


@pytest.mark.slow
def test_convert_command_line(tmp_path):
    files = write_three_formats(tmp_path)
    out = tmp_path / "converted.jsonl"
    result = subprocess.run([sys.executable, "-m", "phi3v.data", "convert", str(files["llava"]), str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"3 records (llava) written to {out}; train with --train_file {out} --image_root {tmp_path}" in \
        result.stdout
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "c"]
    result = subprocess.run([sys.executable, "-m", "phi3v.data", "convert", str(tmp_path / "none.json"), str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'none.json'}: no such file"
    result = subprocess.run([sys.executable, "-m", "phi3v.data", "convert", str(files["llava"]), str(out),
                             "--data_format", "csv"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: argument --data_format: invalid choice: 'csv' (choose from 'auto', 'ours', 'llava', 'messages', "
        "'hf'); --help lists the flags")


def test_messages_parts_tags_and_mistakes(tmp_path):
    from phi3v.data.formats import llava_conversation, messages_conversation
    from phi3v.data.jsonl import SampleError

    def messages(*turns, images=("a.png", "b.png"), **extra):
        record = {"id": "m", "images": list(images), **extra,
                  "messages": [{"role": r, "content": c} for r, c in turns]}
        return messages_conversation(("x.jsonl:1", record), tmp_path)

    parts = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]
    conversation = messages(("user", parts), ("assistant", [{"type": "text", "text": "no"}]))
    assert conversation.turns[0].user == "<|image_1|>\n<|image_2|>\nSame?"  # the model card's layout
    assert conversation.turns[0].images == [tmp_path / "a.png", tmp_path / "b.png"]
    # tags place images in later turns, numbered within the turn (render numbers them across the conversation)
    conversation = messages(("user", "<image>Left"), ("assistant", "ok"), ("user", "Right: <image>"),
                            ("assistant", "ok"))
    assert [(t.user, [p.name for p in t.images]) for t in conversation.turns] == [
        ("<|image_1|>Left", ["a.png"]), ("Right: <|image_1|>", ["b.png"])]
    assert messages(("user", "Q"), images=()).turns[0].assistant is None  # a prompt without answer (evaluation)
    for turns, images, message in [
        ((("user", "<image> one tag"), ("assistant", "x")), ("a.png", "b.png"), r"1 <image> tag\(s\) but 2 image"),
        ((("user", "Q"), ("user", "Q2")), (), "message 2 is from 'user' where an 'assistant' message was expected"),
        ((("user", "Q"), ("assistant", "<image>")), ("a.png",), "an assistant message cannot hold"),
        ((("user", [{"type": "table"}]), ("assistant", "x")), (), "a content part must be"),
        ((("user", [{"type": "audio"}]), ("assistant", "x")), (), "audio inputs are not supported"),
        ((("user", "Q"), ("assistant", "x")), ("../escape.png",), "outside the image root"),
    ]:
        with pytest.raises(SampleError, match=message):
            messages(*turns, images=images)
    with pytest.raises(SampleError, match='"from" must be one of'):
        llava_conversation(("x.json[0]", {"conversations": [{"from": "bot", "value": "x"}]}), tmp_path)


# ------------------------------------------------------------------------------------------------- video


def test_video_on_the_fly_gives_the_converters_frames(processor, tmp_path):
    import numpy as np

    import convert_ucf101
    from phi3v.data.formats import load_data
    from phi3v.data.jsonl import jsonl_dataset
    from phi3v.data.synthetic import write_video
    from phi3v.data.validation import validate

    # frame k has brightness 10 k, so the frames picked can be read back from the pixels
    write_video(tmp_path / "src" / "train" / "Archery" / "clip.avi",
                [np.full((48, 64, 3), 10 * k, dtype=np.uint8) for k in range(20)])
    convert_ucf101.main(["--src", str(tmp_path / "src"), "--out_dir", str(tmp_path / "conv"), "--num_frames", "4",
                         "--num_workers", "1", "--no-tqdm"])
    converted = jsonl_dataset(tmp_path / "conv" / "ucf101_train.jsonl", tmp_path / "conv" / "images", processor)
    first = json.loads((tmp_path / "conv" / "ucf101_train.jsonl").read_text())
    prompt = first["conversations"][0]["user"]
    record = {"id": "train-0000000000", "videos": ["src/train/Archery/clip.avi"],
              "messages": [{"role": "user", "content": f"<video>\n{prompt}"},
                           {"role": "assistant", "content": "Archery"}]}
    (tmp_path / "videos.jsonl").write_text(json.dumps(record) + "\n")
    on_the_fly = load_data(tmp_path / "videos.jsonl", processor, num_frames=4)

    def brightness(dataset):
        from phi3v.data.images import open_image

        refs = dataset.conversation(0).turns[0].images
        return [round(np.asarray(open_image(ref).convert("L")).mean() / 10) for ref in refs]

    assert brightness(on_the_fly) == brightness(converted) == [0, 5, 10, 15]  # frames 0, 5, 10, 15 of 20
    a, b = on_the_fly[0], converted[0]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["image_sizes"], b["image_sizes"])
    assert (a["pixel_values"] - b["pixel_values"]).abs().mean() < 0.02  # the converter's frames went through JPEG
    assert len(load_data(tmp_path / "videos.jsonl", processor, num_frames=6)[0]["pixel_values"]) == 6

    # an unreadable video: one problem for the sample, naming the file
    (tmp_path / "src" / "bad.avi").write_bytes(b"not a video" * 100)
    record["videos"] = ["src/bad.avi"]
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
    _, problems = validate(load_data(tmp_path / "bad.jsonl", processor, num_frames=4), disable_tqdm=True)
    assert [str(p) for p in problems] == [f"bad.jsonl:1 (id train-0000000000): video {tmp_path}/src/bad.avi: "
                                          "invalid data: not a video file, or a corrupt one"]


def test_a_parquet_folder_of_several_configs_is_refused(tmp_path):
    from phi3v.data.hub_datasets import parquet_files

    for config in ("docvqa", "nlvr2", "hateful_memes"):
        (tmp_path / "cauldron" / config).mkdir(parents=True)
        for shard in range(2):
            (tmp_path / "cauldron" / config / f"train-0000{shard}-of-00002.parquet").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds train parquet files of several configs \(docvqa, hateful_memes, "
                                        r"nlvr2\): pass the config \(--dataset_config NAME\)"):
        parquet_files(tmp_path / "cauldron", "train", None)
    with pytest.raises(UserError, match="none of them named 'chartqa'"):
        parquet_files(tmp_path / "cauldron", "train", "chartqa")
    expected = [str(tmp_path / "cauldron" / "nlvr2" / f"train-0000{k}-of-00002.parquet") for k in range(2)]
    assert parquet_files(tmp_path / "cauldron", "train", "nlvr2") == expected
    assert parquet_files(tmp_path / "cauldron" / "nlvr2", "train", None) == expected  # one config's folder
    assert parquet_files(tmp_path / "cauldron" / "nlvr2", "train", "nlvr2") == expected


# ------------------------------------------------------------------------------------------------- validation cache


def image_dataset(root: Path, count: int, missing: int | None = None) -> Path:
    from tests.conftest import make_image

    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        if i != missing:
            make_image(40 + 10 * (i % 5), 30, seed=i).save(root / "images" / f"{i}.png")
        records.append({"id": str(i), "conversations": [{"images": [f"{i}.png"], "user": "Which?", "assistant": "a"}]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root / "data.jsonl"


def test_a_restart_rechecks_only_changed_files(processor, tmp_path, monkeypatch):
    import phi3v.data.validation as validation
    from phi3v.data.jsonl import jsonl_dataset
    from tests.conftest import make_image

    calls = {"decode": 0, "render": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(validation, "open_image", counted("decode", validation.open_image))
    monkeypatch.setattr(validation, "render", counted("render", validation.render))
    path = image_dataset(tmp_path, 12, missing=7)

    def start():
        calls.update(decode=0, render=0)
        dataset = validation.prepare_dataset(jsonl_dataset(path, tmp_path / "images", processor), "train", None,
                                             True, tmp_path / "out", workers=2, disable_tqdm=True,
                                             cache_dir=tmp_path / "cache")
        skipped = (tmp_path / "out" / "skipped_samples_train.jsonl").read_text()
        return dataset.lengths, skipped, dict(calls)

    def uncached():
        return validation.validate(jsonl_dataset(path, tmp_path / "images", processor), disable_tqdm=True)

    first = start()
    assert first[2] == {"decode": 12, "render": 12} and "7.png: file not found" in first[1]
    assert start() == (first[0], first[1], {"decode": 0, "render": 0})  # nothing changed: nothing re-checked
    make_image(300, 200, seed=99).save(tmp_path / "images" / "3.png")  # a changed file: new size, new length
    changed = start()
    assert changed[2] == {"decode": 1, "render": 12}
    assert changed[0] == [n for n in uncached()[0] if n is not None] and changed[0][3] > first[0][3]
    (tmp_path / "images" / "5.png").write_bytes(b"\x89PNG broken")  # a file turned bad is found
    make_image(40, 30).save(tmp_path / "images" / "7.png")  # and one made good is accepted
    fixed = start()
    assert fixed[2] == {"decode": 2, "render": 12}
    assert "5.png: not an image file" in fixed[1] and "7.png" not in fixed[1]
    assert (fixed[0], fixed[1]) == start()[:2]
    data = json.loads((tmp_path / "cache" / "validation_cache.json").read_text())
    assert len(data["images"]) == 12 and list(data["splits"]) == ["train"]


def test_a_file_rewritten_with_the_same_size_is_checked_again(processor, tmp_path):
    """The cache knows a file by its size and modification time: new content of the same size, written later, is
    decoded again and its problem reported (a cache keyed by size alone would reuse the old verdict)."""
    from phi3v.data.jsonl import jsonl_dataset
    from phi3v.data.validation import prepare_dataset

    path = image_dataset(tmp_path, 2)

    def start():
        return prepare_dataset(jsonl_dataset(path, tmp_path / "images", processor), "train", None, True,
                               tmp_path / "out", workers=1, disable_tqdm=True, cache_dir=tmp_path / "cache").names

    assert start() == ["data.jsonl:1", "data.jsonl:2"]
    image = tmp_path / "images" / "1.png"
    before = image.stat()
    image.write_bytes(b"\x89PNG broken".ljust(before.st_size, b"\0"))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert image.stat().st_size == before.st_size
    assert start() == ["data.jsonl:1"]
    skipped = json.loads((tmp_path / "out" / "skipped_samples_train.jsonl").read_text())
    assert skipped == {"where": "data.jsonl:2", "sample_id": "1",
                       "message": f"image {image}: not an image file (or an unsupported format)"}


def test_duplicate_ids_are_found_across_the_shares_of_two_ranks(tiny_dir, tmp_path, monkeypatch):
    """Under torchrun each rank checks every second item: here items 1 and 4 share an id but rank 0 checks item 1
    and rank 1 item 4. Two threads stand in for the two ranks, exchanging their results as all_gather_object does."""
    import threading

    import phi3v.data.validation as validation
    from phi3v.data.jsonl import jsonl_dataset
    from phi3v.models.phi3_v.processing import Phi3VProcessor

    path = image_dataset(tmp_path, 4)
    path.write_text(path.read_text().replace('"id": "3"', '"id": "0"'))
    rank, barrier, parts, kept, failures = threading.local(), threading.Barrier(2, timeout=120), [None, None], {}, []

    def all_gather_object(output, part):
        parts[rank.value] = part
        barrier.wait()
        output[:] = parts

    def run(value):
        rank.value = value
        try:
            dataset = jsonl_dataset(path, tmp_path / "images", Phi3VProcessor.from_pretrained(tiny_dir))
            kept[value] = validation.prepare_dataset(dataset, "train", None, True, tmp_path / "out", workers=1,
                                                     disable_tqdm=True).names
        except Exception as error:
            failures.append(error)
            barrier.abort()

    monkeypatch.setattr(validation, "world_rank_size", lambda: (rank.value, 2))
    monkeypatch.setattr(validation.dist, "all_gather_object", all_gather_object)
    threads = [threading.Thread(target=run, args=(value,)) for value in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert kept == dict.fromkeys((0, 1), ["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"])  # the same on each rank
    skipped = json.loads((tmp_path / "out" / "skipped_samples_train.jsonl").read_text())
    assert skipped == {"where": "data.jsonl:4", "sample_id": "0",
                       "message": "duplicate id: data.jsonl:1 has the same id"}


def test_an_interrupted_validation_keeps_what_it_checked(processor, tmp_path, monkeypatch):
    """Ctrl-C at the 7th of 12 samples (its image check raises KeyboardInterrupt): the verdicts on images 0-5 are in
    the cache, so the next start decodes only images 6-11, and finds what an uninterrupted start finds."""
    import phi3v.data.validation as validation
    from phi3v.data.jsonl import jsonl_dataset

    path = image_dataset(tmp_path, 12)
    decoded, stop_at, open_image = [], ["6.png"], validation.open_image

    def stopped_once(ref, *args):
        if Path(ref).name in stop_at:
            stop_at.clear()
            raise KeyboardInterrupt
        decoded.append(Path(ref).name)
        return open_image(ref, *args)

    monkeypatch.setattr(validation, "open_image", stopped_once)

    def start():
        decoded.clear()
        return validation.prepare_dataset(jsonl_dataset(path, tmp_path / "images", processor), "train", None, False,
                                          tmp_path / "out", workers=2, disable_tqdm=True, cache_dir=tmp_path / "cache")

    with pytest.raises(KeyboardInterrupt):
        start()
    cache = json.loads((tmp_path / "cache" / "validation_cache.json").read_text())
    assert sorted(Path(key).name for key in cache["images"]) == [f"{i}.png" for i in range(6)]
    assert cache["splits"] == {}  # the split was not finished: no result for it
    lengths = start().lengths
    assert sorted(decoded, key=lambda name: int(name.split(".")[0])) == [f"{i}.png" for i in range(6, 12)]
    assert lengths == validation.validate(jsonl_dataset(path, tmp_path / "images", processor), disable_tqdm=True)[0]


@pytest.mark.slow
def test_validation_split_across_two_ranks_reports_as_one_process(tiny_dir, tmp_path):
    from tests.test_distributed import free_port

    path = image_dataset(tmp_path, 11, missing=4)
    lines = path.read_text().splitlines()
    lines[6] = "{broken"
    lines[8] = json.dumps({"id": "long", "conversations": [{"user": "word " * 2000, "assistant": "a"}]})
    path.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = [str(REPO / "tests" / "distributed_validation.py"), str(tiny_dir), str(path)]
    one = subprocess.run([sys.executable, *script, str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", *script, str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    reference = json.loads((tmp_path / "one" / "report-0.json").read_text())
    assert "3 problem(s) in 3 of 11 samples" in reference["error"] and len(reference["lengths"]) == 8
    reference["error"] = reference["error"].replace(str(tmp_path / "one"), str(tmp_path / "two"))
    for rank in (0, 1):
        assert json.loads((tmp_path / "two" / f"report-{rank}.json").read_text()) == reference, rank
    assert (tmp_path / "two" / "skipped_samples_train.jsonl").read_text() == \
        (tmp_path / "one" / "skipped_samples_train.jsonl").read_text()


def test_a_hub_dataset_with_an_integer_id_column_is_read(processor, tmp_path):
    """In a json or jsonl file an "id" must be a string, as in ours (5 and "5" would both become "5"); a hub dataset's
    column has one type for every row, so an integer id column is taken as text."""
    import datasets

    from phi3v.data.formats import load_data
    from tests.conftest import make_image

    features = datasets.Features({"id": datasets.Value("int64"), "images": [datasets.Image()], "messages": [
        {"role": datasets.Value("string"), "content": datasets.Value("string")}]})
    rows = {"id": [5], "images": [[make_image(40, 30)]],
            "messages": [[{"role": "user", "content": "Which?"}, {"role": "assistant", "content": "a"}]]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hub"))
    assert load_data(tmp_path / "hub", processor).conversation(0).id == "5"


def test_cauldron_texts_from_a_folder_of_configs(processor, tmp_path):
    import datasets

    from phi3v.data.formats import load_data
    from tests.conftest import make_image

    features = datasets.Features({"images": [datasets.Image()], "texts": [{
        "user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")}]})
    for config, question in (("docvqa", "What is the date?"), ("nlvr2", "Is it true?")):
        (tmp_path / "cauldron" / config).mkdir(parents=True)
        rows = {"images": [[make_image(60, 40)]], "texts": [[{"user": question, "assistant": "yes", "source": config},
                                                             {"user": "Sure?", "assistant": "no", "source": config}]]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(tmp_path / "cauldron" / config / "train-00000-of-00001.parquet"))
    dataset = load_data(tmp_path / "cauldron", processor, config="nlvr2")
    conversation = dataset.conversation(0)
    assert [(t.user, t.assistant, len(t.images)) for t in conversation.turns] == [
        ("<|image_1|>\nIs it true?", "yes", 1), ("Sure?", "no", 0)]
    assert dataset[0]["pixel_values"].shape[0] == 1
    with pytest.raises(UserError, match=r"several configs \(docvqa, nlvr2\)"):
        load_data(tmp_path / "cauldron", processor)


def test_validation_cache_bench_runs(capsys):
    from bench.validation_cache import main

    results = main(["--images", "6", "--rounds", "1", "--size", "80x60"])
    assert results["restart_s"][0] < results["first_start_s"][0]
    assert "first / restart = " in capsys.readouterr().out


def test_a_hub_id_offline_fails_clearly(processor, monkeypatch):
    from phi3v.data.formats import load_data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"could not load the Hugging Face dataset someone/absent-dataset: .*Offline\? "
                                        r"Save a copy .*save_to_disk\(DIR\).* and pass DIR instead of the hub id"):
        load_data("someone/absent-dataset", processor)


def test_validation_shows_progress_with_the_time_left(processor, tmp_path, capsys):
    from phi3v.data.jsonl import jsonl_dataset
    from phi3v.data.validation import validate

    path = image_dataset(tmp_path, 5)
    validate(jsonl_dataset(path, tmp_path / "images", processor), desc="validating train", chunk=2)
    bar = capsys.readouterr().err.split("\r")[-1]
    assert re.search(r"validating train: 100%.*\| 5/5 \[\d\d:\d\d<00:00, .* ?sample/s\]", bar), bar


def test_every_format_renders_into_phi4s_chat_format(phi4_processor, tmp_path):
    """Phi-4-multimodal reads the same files: ours, LLaVA, messages and both Hugging Face layouts give one batch;
    the text is Phi-4's chat format (no newlines around the role tokens) and only the answers are supervised."""
    import numpy as np

    from phi3v.data.conversation import render
    from phi3v.data.formats import load_data
    from phi3v.data.synthetic import write_video

    files = write_three_formats(tmp_path)
    collate = phi4_processor.collator()
    reference = collate([load_data(files["ours"], phi4_processor)[i] for i in range(3)])
    assert reference["image_pixel_values"].shape[0] == 3  # red; cat, dog
    for name in ("llava", "messages", "hf_disk", "hf_parquet"):
        dataset = load_data(files[name], phi4_processor)
        batch = collate([dataset[i] for i in range(3)])
        for key in ("input_ids", "labels", "attention_mask", "image_pixel_values", "image_sizes",
                    "image_attention_mask"):
            assert torch.equal(batch[key], reference[key]), (name, key)
    dataset = load_data(files["messages"], phi4_processor)
    text, _, _ = render(phi4_processor, dataset.conversation(1))
    assert text == ("<|user|><|image_1|><|image_2|>\nSame animal?<|end|><|assistant|>no<|end|>"
                    "<|user|>Sure?<|end|><|assistant|>yes<|end|><|endoftext|>")
    labels = reference["labels"][1]
    assert phi4_processor.decode(labels[labels != -100]) == "no<|end|>yes<|end|><|endoftext|>"

    # a video read on the fly: num_frames images, their image tokens side by side (Phi-4 puts nothing between images)
    write_video(tmp_path / "clip.avi", [np.full((48, 64, 3), 10 * k, dtype=np.uint8) for k in range(12)])
    record = {"id": "v", "videos": ["clip.avi"], "messages": [{"role": "user", "content": "<video>\nWhat?"},
                                                              {"role": "assistant", "content": "Archery"}]}
    (tmp_path / "videos.jsonl").write_text(json.dumps(record) + "\n")
    example = load_data(tmp_path / "videos.jsonl", phi4_processor, num_frames=3)[0]
    image_tokens = int((example["input_ids"] == phi4_processor.image_token_id).sum())
    # a 64x48 frame fills one 448-pixel tile as 448x336: 32 x 24 patches, pooled 2x2 to 16 x 12 -> 273 + 12 * (16 + 1)
    assert example["image_pixel_values"].shape[0] == 3 and image_tokens == 3 * (273 + 12 * 17)


def test_decoded_images_validate(processor, tmp_path):
    """A dataset built in code may hold decoded PIL images (hub_image accepts them): validation checks them as it
    checks files, and counts each sample's tokens as the processor makes them (it used to fail: an image is not
    hashable). With the cache on, a restart gives the same result and the cache names only image files."""
    from PIL import Image

    from phi3v.data.conversation import Conversation, Turn
    from phi3v.data.dataset import ConversationDataset
    from phi3v.data.validation import prepare_dataset, validate

    red, blue = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 40), "blue")
    conversations = [Conversation("a", [Turn("<|image_1|>\nColour?", "red", [red])]),
                     Conversation("b", [Turn("<|image_1|>\n<|image_2|>\nColours?", "red, blue", [red, blue])])]
    dataset = ConversationDataset(conversations, lambda c: c, processor)
    lengths, problems = validate(dataset, disable_tqdm=True)
    assert problems == []
    assert lengths == [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]

    source = tmp_path / "made_in_code.txt"  # a file the items come from, so that the split result is cached
    source.write_text("a, b")
    for _ in range(2):
        dataset = ConversationDataset(conversations, lambda c: c, processor, sources=[str(source)])
        assert prepare_dataset(dataset, "train", None, False, tmp_path, workers=1, disable_tqdm=True,
                               cache_dir=tmp_path).lengths == lengths
    assert json.loads((tmp_path / "validation_cache.json").read_text())["splits"]["train"]["images"] == []
