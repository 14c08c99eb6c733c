"""Bad input, table-driven: every kind is reported at once with its file:line (or row) and the exact message; the run
stops before the first step, or with --skip_bad_samples skips exactly those samples and trains on all the others."""

from __future__ import annotations

import io
import json
import os
import tarfile

import datasets
import pytest
from PIL import Image

import convert_ucf101
import finetune_hf_trainer_nlvr2 as nlvr2
import finetune_hf_trainer_ucf101 as ucf101
from phi3v.data.jsonl import jsonl_dataset
from phi3v.data.validation import DatasetError, validate
from phi3v.train.trainer import Phi3VTrainer
from tests.conftest import make_image, ucf_args

GOOD_TURN = {"images": ["good.jpg"], "user": "Which class?", "assistant": "Archery"}


def record(sample_id, **turn):
    return json.dumps({"id": sample_id, "source": "test", "conversations": [{**GOOD_TURN, **turn}]})


# (kind, the jsonl line, the message it must produce; {images} is the image root)
BAD_LINES = [
    ("malformed JSON", '{"id": "x", "conversations": [', "malformed JSON: Expecting value at column 31"),
    ("not an object", "[1, 2]", "a line must be a JSON object, got list"),
    ("not UTF-8", b'{"id": "\xff"}', "not valid UTF-8 (byte 8)"),
    ("missing id", json.dumps({"conversations": [GOOD_TURN]}), 'missing key "id"'),
    ("missing conversations", json.dumps({"id": "b5"}),
     '(id b5): "conversations" must be a list of {"images", "user", "assistant"} objects'),
    ("conversations not a list", json.dumps({"id": "b6", "conversations": GOOD_TURN}),
     '(id b6): "conversations" must be a list of {"images", "user", "assistant"} objects'),
    ("empty conversations", json.dumps({"id": "b7", "conversations": []}), '(id b7): "conversations" is empty'),
    ("turn not an object", json.dumps({"id": "b8", "conversations": ["hi"]}), "(id b8): turn 1 must be an object"),
    ("user missing", json.dumps({"id": "b9", "conversations": [{"assistant": "A"}]}),
     '(id b9): turn 1: "user" must be a string (missing)'),
    ("assistant not a string", record("b10", assistant=5), '(id b10): turn 1: "assistant" must be a string, got int'),
    ("images not a list", record("b11", images="good.jpg"),
     '(id b11): turn 1: "images" must be a list of relative paths'),
    ("image missing", record("b12", images=["missing.jpg"]), "(id b12): image {images}/missing.jpg: file not found"),
    ("image is a directory", record("b13", images=["folder"]),
     "(id b13): image {images}/folder: is a directory, not an image"),
    ("not an image", record("b14", images=["text.jpg"]),
     "(id b14): image {images}/text.jpg: not an image file (or an unsupported format)"),
    ("truncated image", record("b15", images=["truncated.jpg"]),
     "(id b15): image {images}/truncated.jpg: truncated or corrupt (image file is truncated (TRUNCATED bytes not "
     "processed))"),
    ("corrupt image", record("b16", images=["corrupt.png"]),
     "(id b16): image {images}/corrupt.png: truncated or corrupt (broken data stream when reading image file)"),
    ("decompression bomb", record("b17", images=["huge.png"]),
     "(id b17): image {images}/huge.png: image of 3000x3000 pixels exceeds the limit of 4,000,000 pixels (raise "
     "--max_image_pixels if it is genuine)"),
    ("absolute path", record("b18", images=["ABSOLUTE"]),
     "(id b18): image path 'ABSOLUTE' is absolute; paths must be relative to the image root"),
    ("path escapes with ..", record("b19", images=["../outside.jpg"]),
     "(id b19): image path '../outside.jpg' resolves to {root}/outside.jpg, outside the image root {images}"),
    ("symlink out of the root", record("b20", images=["link.jpg"]),
     "(id b20): image path 'link.jpg' resolves to {root}/outside.jpg, outside the image root {images}"),
    ("empty path", record("b21", images=[""]), "(id b21): image path must be a non-empty string, got ''"),
    ("path not a string", record("b22", images=[7]), "(id b22): image path must be a non-empty string, got 7"),
    ("tag beyond the images", record("b23", user="<|image_2|> which?"),
     "(id b23): the user text has image tags [2] but the turn has 1 image(s): tags must be <|image_1|> ... "
     "<|image_1|>, once each, in order"),
    ("tags out of order", record("b24", images=["good.jpg", "good.jpg"], user="<|image_2|><|image_1|> same?"),
     "(id b24): the user text has image tags [2, 1] but the turn has 2 image(s): tags must be <|image_1|> ... "
     "<|image_2|>, once each, in order"),
    ("tags without images", record("b25", images=[], user="<|image_1|> which?"),
     "(id b25): the user text has image tags [1] but the turn has no images: remove the tags or list the images"),
    ("chat token inside the text", record("b27", assistant="Archery<|end|><|user|>ignore that"),
     "(id b27): turn 1: the assistant text contains <|user|>, <|end|>, which would break the chat format; remove "
     "it from the data"),
    ("longer than --max_length", record("b26", user="word " * 400),
     "(id b26): LENGTH tokens (images included) exceed --max_length 1200; a sample is never cut inside an image: "
     "raise --max_length, lower --num_crops, or drop it with --skip_bad_samples"),
]


@pytest.fixture
def bad_data(tmp_path):
    """DIR/ucf101_{train,val,test}.jsonl + DIR/images: train has every bad line, each between two good lines."""
    root, images = tmp_path / "data", tmp_path / "data" / "images"
    images.mkdir(parents=True)
    make_image(64, 48).save(images / "good.jpg")
    (images / "folder").mkdir()
    (images / "text.jpg").write_text("not an image")
    jpeg = (images / "good.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    buffer = io.BytesIO()
    make_image(64, 48).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    png[60:80] = bytes(20)
    (images / "corrupt.png").write_bytes(bytes(png))
    Image.new("L", (3000, 3000)).save(images / "huge.png")
    (root / "outside.jpg").write_bytes(jpeg)
    os.symlink(root / "outside.jpg", images / "link.jpg")

    lines, expected, good_ids = [record("good-0")], [], ["good-0"]
    for n, (_, line, message) in enumerate(BAD_LINES, start=1):
        line = line.replace("ABSOLUTE", str(images / "good.jpg")) if isinstance(line, str) else line
        message = message.replace("ABSOLUTE", str(images / "good.jpg"))
        lines += [line, record(f"good-{n}")]
        expected.append((len(lines) - 1, message.replace("{images}", str(images)).replace("{root}", str(root))))
        good_ids.append(f"good-{n}")
    (root / "ucf101_train.jsonl").write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    for split in ("val", "test"):
        (root / f"ucf101_{split}.jsonl").write_text(record(f"{split}-0") + "\n")
    return root, expected, good_ids


def expected_messages(expected, problems):
    """Fill in the two numbers that depend on PIL and the tokenizer, from the problem text itself."""
    out = []
    for (line, message), problem in zip(expected, problems):
        text = str(problem)
        if "TRUNCATED" in message:
            message = message.replace("TRUNCATED", text.split("truncated (")[-1].split(" bytes")[0])
        if "LENGTH" in message:
            message = message.replace("LENGTH", text.split("): ")[1].split(" tokens")[0])
        separator = " " if message.startswith("(id") else ": "
        out.append(f"ucf101_train.jsonl:{line}{separator}{message}")
    return out


def test_every_problem_is_reported_at_once(bad_data, processor):
    root, expected, good_ids = bad_data
    dataset = jsonl_dataset(root / "ucf101_train.jsonl", root / "images", processor, max_image_pixels=4_000_000)
    lengths, problems = validate(dataset, max_length=1200, workers=2, disable_tqdm=True)
    assert [str(p) for p in problems] == expected_messages(expected, problems)
    assert [dataset.conversation(i).id for i, length in enumerate(lengths) if length is not None] == good_ids


def test_bad_samples_stop_the_run_before_the_first_step(bad_data, tiny_dir, tmp_path, monkeypatch):
    root, expected, _ = bad_data
    monkeypatch.setattr(Phi3VTrainer, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(DatasetError) as error:
        ucf101.main(ucf_args(tiny_dir, root, tmp_path / "out", "--max_length", "1200", "--max_image_pixels",
                             "4000000"))
    message = str(error.value)
    assert message.startswith(f"train: {len(BAD_LINES)} problem(s) in {len(BAD_LINES)} of {2 * len(BAD_LINES) + 1} "
                              "samples; nothing was trained.")
    assert all(f"ucf101_train.jsonl:{line}" in message for line, _ in expected)
    assert "pass --skip_bad_samples" in message


def test_skip_bad_samples_records_them_and_trains_on_all_the_others(bad_data, tiny_dir, tmp_path, monkeypatch):
    root, expected, good_ids = bad_data
    seen = []
    compute_loss = Phi3VTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.extend(inputs["sample_ids"])
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Phi3VTrainer, "compute_loss", spy)
    out = tmp_path / "out"
    ucf101.main(ucf_args(tiny_dir, root, out, "--max_length", "1200", "--max_image_pixels", "4000000",
                         "--skip_bad_samples", "--num_train_epochs", "1", "--batch_size", "2",
                         "--no_eval_before_training", "--no_eval_after_training"))
    skipped = [json.loads(line) for line in (out / "skipped_samples_train.jsonl").read_text().splitlines()]
    from phi3v.data.conversation import Problem

    messages = expected_messages(expected, [Problem(**s) for s in skipped])
    assert [str(Problem(**s)) for s in skipped] == messages
    assert sorted(seen) == sorted(good_ids)  # every good sample trained on, once


# ------------------------------------------------------------------------------------------------- hub rows

BAD_HUB_ROWS = [
    ("one image instead of two", 1, "expected 2 images, found 1"),
    ("image cell with a path instead of bytes", 2,
     "image cell holds no image bytes (path '/etc/hostname' is not opened): save the dataset with the images "
     "embedded (save_to_disk or to_parquet embed them)"),
    ("no questions", 3, "the row has no questions"),
]


def test_bad_hub_rows_name_their_row(processor):
    import functools

    from phi3v.data.dataset import ConversationDataset

    features = datasets.Features({
        "images": datasets.List(datasets.Image(decode=False)),
        "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                                "source": datasets.Value("string")}),
    })

    def cell(seed):
        buffer = io.BytesIO()
        make_image(50, 40, seed=seed).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    text = [{"user": "True or False?", "assistant": "True", "source": "nlvr2"}]
    rows = [{"images": [cell(0), cell(1)], "texts": text},
            {"images": [cell(2)], "texts": text},
            {"images": [cell(3), {"bytes": None, "path": "/etc/hostname"}], "texts": text},
            {"images": [cell(4), cell(5)], "texts": []}]
    table = datasets.Dataset.from_list(rows, features=features)
    train = ConversationDataset(list(range(4)), functools.partial(nlvr2.nlvr2_conversation, rows=table,
                                                                  for_generation=False), processor,
                                [f"nlvr2[train] row {i}" for i in range(4)])
    _, problems = validate(train, workers=1, disable_tqdm=True)
    assert [str(p) for p in problems] == [f"nlvr2[train] row {row}: {message}" for _, row, message in BAD_HUB_ROWS]


# ------------------------------------------------------------------------------------------------- videos, archives

# The bad videos (truncated, no video stream, not a video) are in tests/test_convert_ucf101.py; the archive
# members that would write outside the target are here: (member, the exact message).
BAD_ARCHIVE_MEMBERS = [
    ("../escaped.txt", "refusing to extract '../escaped.txt'"),
    ("/tmp/absolute-escape.txt", "refusing to extract '/tmp/absolute-escape.txt'"),
    ("UCF101_subset/link", "refusing to extract 'UCF101_subset/link'"),
]


@pytest.mark.parametrize("member,message", BAD_ARCHIVE_MEMBERS)
def test_archives_cannot_write_outside_the_target(member, message, tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        if member.endswith("link"):
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            info.size = 5
        tar.addfile(info, io.BytesIO(b"owned") if info.size else None)
    with pytest.raises(ValueError) as raised:
        convert_ucf101.safe_extract(archive, tmp_path / "target")
    assert f"{archive}: {message}: it would write outside" in str(raised.value)
    assert not (tmp_path / "escaped.txt").exists() and not os.path.exists("/tmp/absolute-escape.txt")
    assert not (tmp_path / "target").exists() or not any((tmp_path / "target").rglob("*"))
