"""Bad inputs, tried as a new user would, through each entry point's main(argv) under the run_main handler: every one
ends with exit status 2 and one exact `error:` line (and, for dataset problems, the exact located problem under
it), and nothing under the test's folder is written, changed or deleted (except OUTPUT_DIR/validation_cache.json,
which records what validation found so that a re-run after a fix checks only what changed).

A case is (name, entry point, setup, expected error line, expected problem line or None). `setup(ctx)` writes the
inputs and returns argv; in the expected lines {tmp} is the test's folder, {data} the data folder, {images} its image
root, and {N} stands for a token count (it depends on the tokenizer).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import datasets
import pytest

import convert_ucf101
import finetune_hf_trainer_docvqa as docvqa
import finetune_hf_trainer_hateful_memes as memes
import finetune_hf_trainer_nlvr2 as nlvr2
import finetune_hf_trainer_ucf101 as ucf101
import predict
from phi3v import export
from phi3v.common.errors import run_main
from phi3v.data.validation_cache import FILE_NAME as CACHE_FILE
from tests.conftest import make_image

MAINS = {"ucf101": ucf101.main, "docvqa": docvqa.main, "nlvr2": nlvr2.main, "memes": memes.main,
         "convert": convert_ucf101.main, "predict": predict.main, "export": export.main}
TRAIN_STOP = "error: train: 1 problem(s) in 1 of 1 samples; nothing was trained."
TRAIN_STOP_2 = "error: train: 1 problem(s) in 1 of 2 samples; nothing was trained."
MINI, CAULDRON = "nielsr/docvqa_1200_examples", "HuggingFaceM4/the_cauldron"


class Ctx:
    def __init__(self, tmp: Path, tiny_dir: Path):
        self.tmp, self.tiny_dir = tmp, tiny_dir
        self.data, self.images, self.out = tmp / "data", tmp / "data" / "images", tmp / "out"

    def train_args(self, *extra: str, model: Path | None = None) -> list[str]:
        return ["--model_name_or_path", str(model or self.tiny_dir), "--output_dir", str(self.out), "--num_crops",
                "1", "--batch_size", "2", "--batch_size_per_gpu", "2", "--dataloader_num_workers", "0", "--no-tqdm",
                "--report_to", "none", *extra]

    def jsonl(self, train: list, val: list | None = None, *extra: str, model: Path | None = None) -> list[str]:
        """DATA/ucf101_{train,val}.jsonl (lines: dicts, or raw str/bytes) and DATA/images/good.jpg."""
        self.images.mkdir(parents=True, exist_ok=True)
        make_image(64, 48).save(self.images / "good.jpg")
        for split, lines in (("train", train), ("val", val if val is not None else [good("v0")])):
            raw = [x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()
                   for x in lines]
            (self.data / f"ucf101_{split}.jsonl").write_bytes(b"\n".join(raw) + b"\n")
        return self.train_args("--data_dir", str(self.data), *extra, model=model)

    def hub(self, script: str, rows: list[dict], features: dict, split: str = "train", *extra: str,
            test_rows: list[dict] | None = None) -> list[str]:
        splits = {split: datasets.Dataset.from_list(rows, features=datasets.Features(features)) if rows else
                  datasets.Dataset.from_dict({k: [] for k in features}, features=datasets.Features(features))}
        if test_rows is not None:
            splits["test"] = datasets.Dataset.from_list(test_rows, features=datasets.Features(features))
        datasets.DatasetDict(splits).save_to_disk(self.data / script)
        return self.train_args("--dataset_path", str(self.data / script), *extra)

    def model_copy(self, damage=None) -> Path:
        model = self.tmp / "model"
        shutil.copytree(self.tiny_dir, model)
        if damage:
            damage(model / "model.safetensors")
        return model


def good(sample_id, **turn):
    return {"id": sample_id, "conversations": [{"images": ["good.jpg"], "user": "Which class?",
                                                "assistant": "Archery", **turn}]}


def turn_problem(sample_id: str, message: str) -> str:
    return f"  ucf101_train.jsonl:1 (id {sample_id}): {message}"


def text_case(name, field, text, message):
    return (name, "ucf101", lambda c: c.jsonl([good("t", **{field: text})]), TRAIN_STOP, turn_problem("t", message))


def flag_case(name, flags, message, entry="ucf101"):
    return (name, entry, lambda c: c.jsonl([good("a")], None, *flags), f"error: {message}", None)


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:1000])


def random_bytes(path: Path):
    path.write_bytes(os.urandom(4096))


MINI_FEATURES = {"id": datasets.Value("string"), "image": datasets.Image(),
                 "query": {"en": datasets.Value("string")}, "answers": datasets.List(datasets.Value("string"))}
CAULDRON_FEATURES = {"images": datasets.List(datasets.Image()),
                     "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string")})}


def mini_row(**change):
    return {"id": "q0", "image": make_image(40, 30), "query": {"en": "Total?"}, "answers": ["5"], **change}


def cauldron_row(images=1, **change):
    return {"images": [make_image(40, 30, seed=k) for k in range(images)],
            "texts": [{"user": "True or False?", "assistant": "True"}], **change}


def with_feature(features: dict, **change) -> dict:
    return {**features, **change}


def without(features: dict, name: str) -> dict:
    return {k: v for k, v in features.items() if k != name}


def small_context(c: Ctx, context: int) -> Path:
    model = c.tmp / "model"
    model.mkdir()
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "processor_config.json", "chat_template.jinja"):
        if (c.tiny_dir / name).exists():
            shutil.copy(c.tiny_dir / name, model / name)
    config = json.loads((c.tiny_dir / "config.json").read_text())
    (config.get("text_config") or config)["max_position_embeddings"] = context
    (model / "config.json").write_text(json.dumps(config))
    return model


def no_videos(c: Ctx) -> list[str]:
    (c.data / "train" / "Archery").mkdir(parents=True)
    (c.data / "train" / "Archery" / "notes.txt").write_text("no video here")
    return ["--src", str(c.data), "--out_dir", str(c.out), "--no-tqdm", "--num_workers", "1"]


def escaping_tar(c: Ctx) -> list[str]:
    c.data.mkdir()
    with tarfile.open(c.data / "videos.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return ["--src", str(c.data / "videos.tar.gz"), "--out_dir", str(c.out), "--tmp_dir", str(c.data / "work")]


def adapter(c: Ctx, base: Path | None = None) -> Path:
    folder = c.tmp / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base or c.tiny_dir)}))
    return folder


def resumable(c: Ctx, files: dict) -> Path:
    """A checkpoint another run wrote, which resolves as resumable (a trainer state and weights): {tmp}/ckpt with
    trainer_state.json and `files` ({name: JSON content, or None for an empty file})."""
    folder = c.tmp / "ckpt"
    folder.mkdir()
    for name, content in {"trainer_state.json": {"global_step": 1}, **files}.items():
        (folder / name).write_text("" if content is None else json.dumps(content))
    return folder


LORA_FILES = {"adapter_config.json": {"base_model_name_or_path": "microsoft/Phi-3.5-vision-instruct"},
              "adapter_model.safetensors": None}
def lora_adapter(c: Ctx, module: str = "model.layers.0.self_attn.o_proj", base: Path | None = None, **config) -> Path:
    """A rank-1 LoRA adapter with its weights, on `module` of the tiny model (hidden size 64)."""
    import torch
    from safetensors.torch import save_file

    folder = c.tmp / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": str(base or c.tiny_dir), "peft_type": "LORA", "r": 1, "lora_alpha": 2, **config}))
    save_file({f"base_model.model.{module}.lora_A.weight": torch.ones(1, 64),
               f"base_model.model.{module}.lora_B.weight": torch.ones(64, 1)}, folder / "adapter_model.safetensors")
    return folder


def without_lm_head(path: Path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    del tensors["lm_head.weight"]
    save_file(tensors, path, metadata={"format": "pt"})


def predict_args(c: Ctx, *extra: str) -> list[str]:
    c.data.mkdir(exist_ok=True)
    return [str(c.tiny_dir), *extra]


def llava(sample_id, **change) -> dict:
    return {"id": sample_id, "image": "good.jpg", "conversations": [
        {"from": "human", "value": "Which class?"}, {"from": "gpt", "value": "Archery"}], **change}


def messages(sample_id, *roles: str, **change) -> dict:
    return {"id": sample_id, "images": ["good.jpg"], **change,
            "messages": [{"role": role, "content": "Archery?"} for role in roles or ("user", "assistant")]}


def json_array(c: Ctx, items: list[str]) -> list[str]:
    """DATA/train.json: a LLaVA array of the given item texts, one per line from line 2, as --train_file."""
    c.jsonl([good("a")])
    (c.data / "train.json").write_text("[\n" + ",\n".join(items) + "\n]\n")
    return c.train_args("--train_file", str(c.data / "train.json"), "--eval_file", str(c.data / "ucf101_val.jsonl"),
                        "--image_root", str(c.images))


def empty_video(c: Ctx) -> list[str]:
    argv = c.jsonl([good("v", images=[], videos=["empty.avi"])])
    (c.images / "empty.avi").write_bytes(b"")
    return argv


AUDIO = "audio inputs are not supported: these recipes fine-tune the vision path (remove the audio)"
REPEATED = "the key {} appears twice in one object (only the last value would be read): keep one of them"

CASES = [
    # --- special tokens, image tags and text that is not what it says (jsonl, ucf101 recipe)
    text_case("<s> in the user text", "user", "Which <s> class?",
              "turn 1: the user text contains <s>, which would break the chat format; remove it from the data"),
    text_case("</s> in the answer", "assistant", "Archery</s>",
              "turn 1: the assistant text contains </s>, which would break the chat format; remove it from the data"),
    text_case("<unk> in the user text", "user", "<unk> class?",
              "turn 1: the user text contains <unk>, which would break the chat format; remove it from the data"),
    text_case("<|placeholder1|> in the answer", "assistant", "Arch<|placeholder1|>ery",
              "turn 1: the assistant text contains <|placeholder1|>, which would break the chat format; remove it "
              "from the data"),
    text_case("<|assistant|> in the user text", "user", "Which?<|assistant|>Archery",
              "turn 1: the user text contains <|assistant|>, which would break the chat format; remove it from the "
              "data"),
    text_case("<|endoftext|> in the answer", "assistant", "Archery<|endoftext|>",
              "turn 1: the assistant text contains <|endoftext|>, which would break the chat format; remove it from "
              "the data"),
    text_case("image tag in the answer", "assistant", "see <|image_1|>",
              "turn 1: the assistant text contains <|image_1|>: image tags belong in the user text"),
    text_case("lone surrogate", "user", "Which\ud800 class?",
              "turn 1: the user text holds a lone surrogate '\\ud800' at character 5 (not valid Unicode); fix the "
              "text's encoding"),
    text_case("empty answer", "assistant", "", "turn 1: the assistant answer is empty"),
    text_case("whitespace-only answer", "assistant", " \n\t", "turn 1: the assistant answer is empty"),
    text_case("image tag beyond the images", "user", "<|image_2|> which?",
              "the user text has image tags [2] but the turn has 1 image(s): tags must be <|image_1|> ... "
              "<|image_1|>, once each, in order"),
    # --- ids
    ("null id", "ucf101", lambda c: c.jsonl([{**good("x"), "id": None}]), TRAIN_STOP,
     '  ucf101_train.jsonl:1: "id" must be a non-empty string, got null'),
    ("dict id", "ucf101", lambda c: c.jsonl([{**good("x"), "id": {"a": 1}}]), TRAIN_STOP,
     '  ucf101_train.jsonl:1: "id" must be a non-empty string, got dict'),
    ("integer id", "ucf101", lambda c: c.jsonl([{**good("x"), "id": 5}]), TRAIN_STOP,
     '  ucf101_train.jsonl:1: "id" must be a non-empty string, got int'),
    ("whitespace id", "ucf101", lambda c: c.jsonl([{**good("x"), "id": "  "}]), TRAIN_STOP,
     '  ucf101_train.jsonl:1: "id" must be a non-empty string, got empty'),
    ("duplicate id", "ucf101", lambda c: c.jsonl([good("same"), good("same")]),
     "error: train: 1 problem(s) in 1 of 2 samples; nothing was trained.",
     "  ucf101_train.jsonl:2 (id same): duplicate id: ucf101_train.jsonl:1 has the same id"),
    # --- lines and files
    ("100,000 nested [ on a line", "ucf101", lambda c: c.jsonl([good("a"), '{"id": ' + "[" * 100_000]), TRAIN_STOP_2,
     "  ucf101_train.jsonl:2: JSON nested too deeply to read (thousands of [ or {)"),
    ("100,000 nested [ as the file", "ucf101", lambda c: c.jsonl(["[" * 100_000]),
     "error: {data}/ucf101_train.jsonl: not a valid JSON array (nested too deeply to read: thousands of [ or {)",
     None),
    ("malformed JSON", "ucf101", lambda c: c.jsonl([good("a"), '{"id": "x", "conversations": [']), TRAIN_STOP_2,
     "  ucf101_train.jsonl:2: malformed JSON: Expecting value at column 31"),
    ("not UTF-8", "ucf101", lambda c: c.jsonl([good("a"), b'{"id": "\xff"}']), TRAIN_STOP_2,
     "  ucf101_train.jsonl:2: not valid UTF-8 (byte 8)"),
    ("image is a named pipe", "ucf101",
     lambda c: c.jsonl([good("p", images=["pipe.jpg"])]) if fifo(c.images / "pipe.jpg") else None, TRAIN_STOP,
     "  ucf101_train.jsonl:1 (id p): image {images}/pipe.jpg: not a regular file (a named pipe, socket or device): "
     "refused, reading it could block"),
    ("image missing", "ucf101", lambda c: c.jsonl([good("m", images=["missing.jpg"])]), TRAIN_STOP,
     "  ucf101_train.jsonl:1 (id m): image {images}/missing.jpg: file not found"),
    ("empty evaluation file", "ucf101", lambda c: c.jsonl([good("a")], []),
     "error: {data}/ucf101_val.jsonl: the file holds no records (it is empty)", None),
    ("missing split file", "ucf101",
     lambda c: [c.jsonl([good("a")]), (c.data / "ucf101_val.jsonl").unlink()][0],
     "error: {data}/ucf101_val.jsonl not found: run convert_ucf101.py first", None),
    ("no data flags", "ucf101", lambda c: c.train_args(),
     "error: pass --train_file and --eval_file (and optionally --test_file), or --data_dir: the folder "
     "convert_ucf101.py wrote (see --help)", None),
    ("--data_dir and --train_file", "ucf101", lambda c: c.jsonl([good("a")], None, "--train_file", "x.jsonl"),
     "error: pass either --data_dir or --train_file/--eval_file/--test_file, not both", None),
    # --- length limits: without --max_length, the model's context
    ("train sample longer than the context", "ucf101",
     lambda c: c.jsonl([good("long", user="word " * 1200)], None, model=small_context(c, 1024)), TRAIN_STOP,
     "  ucf101_train.jsonl:1 (id long): {N} tokens (images included) exceed the model's context of 1024; a sample "
     "is never cut inside an image: shorten it, lower --num_crops, or drop it with --skip_bad_samples"),
    ("eval prompt leaves no room for the answer", "ucf101",
     lambda c: c.jsonl([good("a")], [good("v", user="word " * 480)], "--max_new_tokens", "600",
                       model=small_context(c, 1024)),
     "error: val: 1 problem(s) in 1 of 1 samples; nothing was trained.",
     "  ucf101_val.jsonl:1 (id v): {N} tokens (images included) exceed the model's context (1024) less "
     "--max_new_tokens (600) = 424; a sample is never cut inside an image: shorten it, lower --num_crops, or drop "
     "it with --skip_bad_samples"),
    # --- flags, checked before anything is loaded
    flag_case("--train_samples -1", ["--train_samples", "-1"], "--train_samples must be >= 0, got -1"),
    flag_case("--eval_samples -2", ["--eval_samples", "-2"], "--eval_samples must be >= 0, got -2"),
    flag_case("--max_length 0", ["--max_length", "0"], "--max_length must be >= 1, got 0"),
    flag_case("--max_new_tokens 0", ["--max_new_tokens", "0"], "--max_new_tokens must be >= 1, got 0"),
    flag_case("--eval_batch_size 0", ["--eval_batch_size", "0"], "--eval_batch_size must be >= 1, got 0"),
    flag_case("--max_image_pixels 0", ["--max_image_pixels", "0"], "--max_image_pixels must be >= 1, got 0"),
    flag_case("--learning_rate -1", ["--learning_rate", "-1"], "--learning_rate must be >= 0, got -1.0"),
    flag_case("--weight_decay -0.5", ["--weight_decay", "-0.5"], "--weight_decay must be >= 0, got -0.5"),
    flag_case("--warmup_steps -1", ["--warmup_steps", "-1"], "--warmup_steps must be >= 0, got -1.0"),
    flag_case("--num_train_epochs 0", ["--num_train_epochs", "0"],
              "--num_train_epochs must be > 0 (or set --max_steps), got 0.0"),
    flag_case("--dataloader_num_workers -1", ["--dataloader_num_workers", "-1"],
              "--dataloader_num_workers must be >= 0, got -1"),
    flag_case("--num_crops 17", ["--num_crops", "17"], "--num_crops must be between 1 and 16, got 17"),
    flag_case("--lora_rank 0", ["--lora_rank", "0"], "--lora_rank must be >= 1, got 0"),
    flag_case("--fp32 with --bf16", ["--fp32", "--bf16"], "--fp32 cannot be combined with --bf16 or --fp16"),
    flag_case("--batch_size not a multiple", ["--batch_size", "3"],
              "--batch_size 3 is the global batch: it must be a multiple of --batch_size_per_gpu (2) x the number "
              "of processes (1) = 2"),
    ("--output_dir is a file", "ucf101",
     lambda c: c.jsonl([good("a")]) + ["--output_dir", str(c.data / "ucf101_train.jsonl")],
     "error: --output_dir {data}/ucf101_train.jsonl is an existing file, not a folder: pass a folder", None),
    ("--output_dir under a file", "ucf101",
     lambda c: c.jsonl([good("a")]) + ["--output_dir", str(c.data / "ucf101_train.jsonl" / "out")],
     "error: --output_dir {data}/ucf101_train.jsonl/out: {data}/ucf101_train.jsonl is a file, so the folder cannot "
     "be created", None),
    ("--resume_from_checkpoint missing", "ucf101",
     lambda c: c.jsonl([good("a")], None, "--resume_from_checkpoint", str(c.tmp / "nope")),
     "error: --resume_from_checkpoint {tmp}/nope: no such directory", None),
    ("model folder without files", "ucf101",
     lambda c: c.jsonl([good("a")], None, model=c.data),
     "error: {data}/config.json does not exist: is {data} a Phi-3.5-vision checkpoint directory?", None),
    # --- model weights (refused when the model loads, after validation)
    ("truncated model.safetensors", "ucf101", lambda c: c.jsonl([good("a")], None, model=c.model_copy(truncate)),
     "error: {tmp}/model/model.safetensors (Error while deserializing header: invalid header length): not a "
     "readable safetensors file (truncated or corrupt); copy it again from its source", None),
    ("random model.safetensors", "ucf101", lambda c: c.jsonl([good("a")], None, model=c.model_copy(random_bytes)),
     "error: {tmp}/model/model.safetensors (Error while deserializing header: header too large): not a readable "
     "safetensors file (truncated or corrupt); copy it again from its source", None),
    # --- hub-format datasets (save_to_disk copies)
    ("DocVQA answers as a string", "docvqa",
     lambda c: c.hub("docvqa", [mini_row(answers="5 USD")], with_feature(MINI_FEATURES, answers=datasets.Value(
         "string")), "train", test_rows=[mini_row(answers="5")]), TRAIN_STOP,
     f'  {MINI}[train] row 0: "answers" must be a list of strings, got str'),
    ("DocVQA query without en", "docvqa",
     lambda c: c.hub("docvqa", [mini_row(query={"de": "Summe?"})], with_feature(MINI_FEATURES, query={
         "de": datasets.Value("string")}), "train", test_rows=[mini_row(query={"de": "x"})]), TRAIN_STOP,
     f'  {MINI}[train] row 0: "query" "en" must be a string, got null'),
    ("DocVQA query as a string", "docvqa",
     lambda c: c.hub("docvqa", [mini_row(query="Total?")], with_feature(MINI_FEATURES, query=datasets.Value(
         "string")), "train", test_rows=[mini_row(query="x")]), TRAIN_STOP,
     f'  {MINI}[train] row 0: "query" must be an object, got str'),
    ("DocVQA answers list empty", "docvqa",
     lambda c: c.hub("docvqa", [mini_row(answers=[])], MINI_FEATURES, "train", test_rows=[mini_row()]),
     TRAIN_STOP, f"  {MINI}[train] row 0: the row has no answers"),
    ("DocVQA column missing", "docvqa",
     lambda c: c.hub("docvqa", [without(mini_row(), "answers")], without(MINI_FEATURES, "answers"), "train",
                     test_rows=[without(mini_row(), "answers")]),
     "error: --dataset_path {data}/docvqa: the train split has no column 'answers' (its columns: id, image, query); "
     "is it the right dataset?", None),
    ("DocVQA split missing", "docvqa", lambda c: c.hub("docvqa", [mini_row()], MINI_FEATURES, "train"),
     "error: --dataset_path {data}/docvqa: no split 'test' (it has train)", None),
    ("Cauldron DocVQA answer not a string", "docvqa",
     lambda c: c.hub("cauldron", [cauldron_row(texts=[{"user": "Date?", "assistant": None}])], CAULDRON_FEATURES,
                     "train", "--full_train", "--full_train_dataset_path", str(c.data / "cauldron")) and
     c.hub("docvqa", [mini_row()], MINI_FEATURES, "train", "--full_train", "--full_train_dataset_path",
           str(c.data / "cauldron"), test_rows=[mini_row()]), TRAIN_STOP,
     f'  {CAULDRON}/docvqa[train] row 0 question 1: "texts" item 1 "assistant" must be a string, got null'),
    ("NLVR2 user text null", "nlvr2",
     lambda c: c.hub("nlvr2", [cauldron_row(2), cauldron_row(2, texts=[{"user": None, "assistant": "True"}])],
                     CAULDRON_FEATURES, "train", "--eval_rows", "1"), TRAIN_STOP,
     f'  {CAULDRON}/nlvr2[train] row 1: "texts" item 1 "user" must be a string, got null'),
    ("NLVR2 images not a list", "nlvr2",
     lambda c: c.hub("nlvr2", [{**cauldron_row(), "images": make_image(40, 30)}] * 2,
                     with_feature(CAULDRON_FEATURES, images=datasets.Image()), "train", "--eval_rows", "1"),
     TRAIN_STOP, f'  {CAULDRON}/nlvr2[train] row 1: "images" must be a list, got dict'),
    ("NLVR2 one image", "nlvr2",
     lambda c: c.hub("nlvr2", [cauldron_row(2), cauldron_row(1)], CAULDRON_FEATURES, "train", "--eval_rows", "1"),
     TRAIN_STOP, f"  {CAULDRON}/nlvr2[train] row 1: expected 2 images, found 1"),
    ("fewer rows than --eval_rows", "nlvr2",
     lambda c: c.hub("nlvr2", [cauldron_row(2)] * 3, CAULDRON_FEATURES),
     "error: --dataset_path {data}/nlvr2: rows [500:] asked for, but the train split has only 3 rows (lower "
     "--eval_rows, the rows held out for evaluation)", None),
    flag_case("--eval_rows -3", ["--eval_rows", "-3"], "--eval_rows must be >= 0, got -3", entry="nlvr2"),
    ("empty dataset", "memes", lambda c: c.hub("memes", [], CAULDRON_FEATURES, "train", "--eval_rows", "0"),
     "error: --dataset_path {data}/memes: cannot be read as a save_to_disk dataset (IndexError: list index out of "
     "range); is it empty or damaged? Save it again", None),
    ("memes texts not a list", "memes",
     lambda c: c.hub("memes", [cauldron_row(texts="yes")] * 2, with_feature(CAULDRON_FEATURES, texts=datasets.Value(
         "string")), "train", "--eval_rows", "1"), TRAIN_STOP,
     f'  {CAULDRON}/hateful_memes[train] row 1: "texts" must be a list, got str'),
    ("memes --dataset_path empty folder", "memes",
     lambda c: c.train_args("--dataset_path", str(c.data)) if c.data.mkdir() is None else None,
     "error: {data}: no save_to_disk dataset and no train-*.parquet files in it", None),
    # --- converter
    ("converter: no videos", "convert", no_videos,
     "error: --src {data}: no videos (.avi, .mp4, .mkv, .mov, .webm) in {data}/{{train,val,test}}/<class>/; nothing "
     "was written", None),
    ("converter: --num_frames 0", "convert", lambda c: ["--src", str(c.tmp), "--out_dir", str(c.out),
                                                        "--num_frames", "0"],
     "error: --num_frames must be >= 1, got 0", None),
    ("converter: --src missing", "convert", lambda c: ["--src", str(c.tmp / "nope"), "--out_dir", str(c.out)],
     "error: --src {tmp}/nope: no such file or folder", None),
    ("converter: --src without splits", "convert",
     lambda c: ["--src", str(c.tmp), "--out_dir", str(c.out)] if c.data.mkdir() is None else None,
     "error: --src {tmp}: expected {{train,val,test}}/<class>/<videos> folders inside it", None),
    ("converter: archive escaping its folder", "convert", escaping_tar,
     "error: {data}/videos.tar.gz: refusing to extract '../escaped.txt': it would write outside {data}/work or is "
     "a link/device", None),
    # --- predict.py
    ("predict: --image not an image", "predict",
     lambda c: [predict_args(c, "--question", "q", "--image", str(c.data / "x.png")),
                (c.data / "x.png").write_text("text")][0],
     "error: --image {data}/x.png: not an image file (or an unsupported format)", None),
    ("predict: --image missing", "predict",
     lambda c: predict_args(c, "--question", "q", "--image", str(c.data / "none.png")),
     "error: --image {data}/none.png: file not found", None),
    ("predict: --image a named pipe", "predict",
     lambda c: predict_args(c, "--question", "q", "--image", str(fifo(c.data / "pipe.png"))),
     "error: --image {data}/pipe.png: not a regular file (a named pipe, socket or device): refused, reading it could "
     "block", None),
    ("predict: --jsonl missing", "predict", lambda c: predict_args(c, "--jsonl", str(c.data / "none.jsonl")),
     "error: --jsonl {data}/none.jsonl: no such file", None),
    ("predict: --num_frames 0", "predict",
     lambda c: predict_args(c, "--question", "q", "--video", "v.avi", "--num_frames", "0"),
     "error: --num_frames must be >= 1, got 0", None),
    # --- export
    ("export into the adapter folder", "export", lambda c: [str(adapter(c)), str(c.tmp / "adapter")],
     "error: {tmp}/adapter is the adapter folder itself: write the merged model to a new folder", None),
    ("export over another model", "export",
     lambda c: [str(adapter(c)), str(c.data)] if (c.data.mkdir() or (c.data / "model.safetensors.index.json")
                                                  .write_text("{}")) else None,
     "error: {data} already holds model files (model.safetensors.index.json): pass a new or empty folder (an old "
     "shard or index there would be mixed with the merged model)", None),
    ("export without an adapter", "export", lambda c: [str(c.tmp), str(c.out)],
     "error: {tmp} holds no LoRA adapter (adapter_config.json is missing)", None),
    # issue 22: training flags and resume
    ("--output_dir is the base model", "ucf101",
     lambda c: c.jsonl([good("a")], None, "--output_dir", str(c.tmp / "model"), model=c.model_copy()),
     "error: --output_dir {tmp}/model is the base model folder (--model_name_or_path {tmp}/model): the run would "
     "write over the checkpoint it starts from; pass a folder outside it", None),
    ("--output_dir inside the base model, through a link", "ucf101",
     lambda c: c.jsonl([good("a")], None, "--output_dir", str(c.tmp / "link" / "run"), model=c.model_copy())
     if (c.tmp / "link").symlink_to(c.tmp / "model") is None else None,
     "error: --output_dir {tmp}/link/run is inside the base model folder (--model_name_or_path {tmp}/model): the run "
     "would write into the checkpoint it starts from; pass a folder outside it", None),
    ("--output_dir is the base of the resumed adapter", "ucf101",
     lambda c: c.jsonl([good("a")], None, "--use_lora", "--output_dir", str(c.model_copy()),
                       "--resume_from_checkpoint", str(resumable(c, {**LORA_FILES, "adapter_config.json": {
                           "base_model_name_or_path": str(c.tmp / "model")}}))),
     "error: --output_dir {tmp}/model is the base model folder ({tmp}/ckpt/adapter_config.json names {tmp}/model as "
     "its base): the run would write over the checkpoint it starts from; pass a folder outside it", None),
    ("export into the base model folder", "export",
     lambda c: [str(adapter(c, c.tmp / "model")), str(c.model_copy())],
     "error: {tmp}/model already holds model files (config.json, model.safetensors): pass a new or empty folder (an "
     "old shard or index there would be mixed with the merged model)", None),
    flag_case("--lora_dropout 1.5", ["--use_lora", "--lora_dropout", "1.5"],
              "--lora_dropout must be in [0, 1), got 1.5"),
    flag_case("--lora_alpha_ratio -1", ["--use_lora", "--lora_alpha_ratio", "-1"],
              "--lora_alpha_ratio must be a number > 0, got -1.0"),
    flag_case("--lora_alpha 0", ["--use_lora", "--lora_alpha", "0"], "--lora_alpha must be a number > 0, got 0"),
    flag_case("LoRA alpha rounding to 0", ["--use_lora", "--lora_rank", "1", "--lora_alpha_ratio", "0.4"],
              "--lora_rank 1 x --lora_alpha_ratio 0.4 rounds to a LoRA alpha of 0 (adapters that change nothing): "
              "raise the ratio or pass --lora_alpha"),
    ("resume a LoRA checkpoint without --use_lora", "ucf101",
     lambda c: c.jsonl([good("a")], None, "--resume_from_checkpoint", str(resumable(c, LORA_FILES))),
     "error: --resume_from_checkpoint {tmp}/ckpt was written in LoRA/QLoRA mode (it holds adapter_config.json), this "
     "run is full mode: resume it with --use_lora (or --use_qlora)", None),
    ("resume full weights with --use_lora", "ucf101",
     lambda c: c.jsonl([good("a")], None, "--use_lora", "--resume_from_checkpoint",
                       str(resumable(c, {"model.safetensors": None}))),
     "error: --resume_from_checkpoint {tmp}/ckpt was written in full fine-tuning mode (it holds model weights, no "
     "adapter), this run is lora mode: resume it with no --use_lora/--use_qlora", None),
    ("resume a frozen-vision checkpoint in full mode", "ucf101",
     lambda c: c.jsonl([good("a")], None, "--resume_from_checkpoint", str(resumable(c, {
         "model.safetensors": None, "run_info.json": {"mode": "frozen_vision", "frozen": ["projector", "vision"]}}))),
     "error: --resume_from_checkpoint {tmp}/ckpt was written in frozen_vision mode (projector, vision frozen), this "
     "run is full mode: resume it with --freeze_vision_model", None),
    flag_case("--eval_split for jsonl data", ["--eval_split", "train[-5:]"],
              "--eval_split applies to Hugging Face datasets only, and {data}/ucf101_val.jsonl is a jsonl/json file "
              "(ours format): leave it out"),
    flag_case("--train_split for jsonl data", ["--train_split", "train[:5]"],
              "--train_split applies to Hugging Face datasets only, and {data}/ucf101_train.jsonl is a jsonl/json "
              "file (ours format): leave it out"),
    flag_case("--test_split without test data", ["--test_split", "test"],
              "--test_split applies to Hugging Face datasets only, and there is no test data: leave it out"),
    flag_case("--dataset_config for jsonl data", ["--dataset_config", "ai2d"],
              "--dataset_config applies to Hugging Face datasets only, and no data file is one: leave it out"),
    # issue 22: data
    ("repeated key in our jsonl", "ucf101", lambda c: c.jsonl([json.dumps(good("a"))[:-1] + ', "id": "b"}']),
     TRAIN_STOP, "  ucf101_train.jsonl:1: " + REPEATED.format('"id"')),
    ("repeated key in a LLaVA jsonl turn", "ucf101",
     lambda c: c.jsonl([json.dumps(llava("l")).replace('"gpt",', '"gpt", "value": "Darts",')]), TRAIN_STOP,
     "  ucf101_train.jsonl:1: " + REPEATED.format('"value"')),
    ("repeated key in a messages jsonl", "ucf101",
     lambda c: c.jsonl([json.dumps(messages("m")).replace('"user",', '"user", "role": "assistant",')]), TRAIN_STOP,
     "  ucf101_train.jsonl:1: " + REPEATED.format('"role"')),
    ("repeated key in a LLaVA json array", "ucf101",
     lambda c: json_array(c, [json.dumps(llava("a")), json.dumps(llava("b")).replace(
         '"id": "b"', '"id": "b", "image": "other.jpg"')]), TRAIN_STOP_2,
     "  train.json[1] (line 3): " + REPEATED.format('"image"')),
    ("empty video file", "ucf101", empty_video, TRAIN_STOP,
     "  ucf101_train.jsonl:1 (id v): video {images}/empty.avi: empty file (0 bytes)"),
    ("messages: user after user", "ucf101", lambda c: c.jsonl([messages("m", "user", "user")]), TRAIN_STOP,
     "  ucf101_train.jsonl:1 (id m): message 2 is from 'user' where an 'assistant' message was expected (a system "
     "message may only come first; then user and assistant alternate)"),
    ("LLaVA integer id", "ucf101", lambda c: c.jsonl([llava(7)]), TRAIN_STOP,
     '  ucf101_train.jsonl:1: "id" must be a non-empty string, got int'),
    ("messages integer id", "ucf101", lambda c: c.jsonl([messages(7)]), TRAIN_STOP,
     '  ucf101_train.jsonl:1: "id" must be a non-empty string, got int'),
    # audio (Phi-4-multimodal's other input): refused, these recipes fine-tune the vision path
    ("messages: audio content part", "ucf101", lambda c: c.jsonl([{**messages("m"), "messages": [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Archery?"}]},
        {"role": "assistant", "content": "Archery"}]}]), TRAIN_STOP,
     "  ucf101_train.jsonl:1 (id m): message 1: an audio part: " + AUDIO),
    ("messages: audios key", "ucf101", lambda c: c.jsonl([messages("m", audios=["a.wav"])]), TRAIN_STOP,
     '  ucf101_train.jsonl:1 (id m): an "audios" key: ' + AUDIO),
    ("LLaVA: audio key", "ucf101", lambda c: c.jsonl([llava("l", audio="a.wav")]), TRAIN_STOP,
     '  ucf101_train.jsonl:1 (id l): an "audio" key: ' + AUDIO),
    ("ours: audio key", "ucf101", lambda c: c.jsonl([{**good("o"), "audio": "a.wav"}]), TRAIN_STOP,
     '  ucf101_train.jsonl:1 (id o): an "audio" key: ' + AUDIO),
    # issue 22: entry points
    flag_case("LoRA values without LoRA", ["--lora_rank", "8", "--lora-dropout=0.1"],
              "--lora_rank, --lora_dropout need(s) --use_lora (or --use_qlora)"),
    ("predict: --num_crops 0", "predict",
     lambda c: predict_args(c, "--question", "q", "--num_crops", "0"),
     "error: --num_crops must be between 1 and 16, got 0", None),
    ("predict: --num_crops 17", "predict",
     lambda c: predict_args(c, "--question", "q", "--num_crops", "17"),
     "error: --num_crops must be between 1 and 16, got 17", None),
    ("predict: --out in a missing folder", "predict",
     lambda c: predict_args(c, "--question", "q", "--out", str(c.tmp / "none" / "answer.jsonl")),
     "error: --out {tmp}/none/answer.jsonl: pass a file name in an existing folder", None),
    ("predict: --out a folder", "predict", lambda c: predict_args(c, "--jsonl", "x.jsonl", "--out", str(c.data)),
     "error: --out {data}: pass a file name in an existing folder", None),
    flag_case("--config abbreviated", ["--conf", "run.yaml"],
              "write --config in full: an abbreviation of it is not read as a settings file; --help lists the flags"),
    # issue 22: export
    ("export: adapter with a rank_pattern", "export",
     lambda c: [str(lora_adapter(c, rank_pattern={"o_proj": 2})), str(c.out)],
     "error: {tmp}/adapter/adapter_config.json: rank_pattern: phi3v.export merges LoRA, rsLoRA, DoRA and "
     "modules_to_save adapters only; merge this one with peft (merge_and_unload)", None),
    ("export: not a LoRA adapter", "export", lambda c: [str(lora_adapter(c, peft_type="LOHA")), str(c.out)],
     "error: {tmp}/adapter/adapter_config.json: peft_type LOHA: phi3v.export merges LoRA, rsLoRA, DoRA and "
     "modules_to_save adapters only; merge this one with peft (merge_and_unload)", None),
    ("export: adapter without its weights", "export", lambda c: [str(adapter(c)), str(c.out)],
     "error: {tmp}/adapter/adapter_model.safetensors is missing: the adapter's weights are needed to merge it (a "
     "pickled adapter_model.bin is not loaded)", None),
    ("export: adapter of another base", "export",
     lambda c: [str(lora_adapter(c, "model.layers.7.self_attn.o_proj")), str(c.out)],
     "error: {tmp}/adapter: the adapter changes model.layers.7.self_attn.o_proj.weight, which the base model has no "
     "weight of: an adapter of another base model (pass that one with --base), or LoRA on a layer that is not Linear",
     None),
    ("export: base without lm_head", "export",
     lambda c: [str(lora_adapter(c, base=c.model_copy(without_lm_head))), str(c.out)],
     "error: {tmp}/model lacks 1 weight(s) of the model (lm_head.weight, ...): not a complete Phi-3.5-vision "
     "checkpoint", None),
]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size if not p.is_dir() else 0, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def fill(text: str, ctx: Ctx) -> str:
    return text.replace("{tmp}", str(ctx.tmp)).replace("{data}", str(ctx.data)).replace(
        "{images}", str(ctx.images)).replace("{{", "{").replace("}}", "}")


PHI3_ONLY = {  # case name -> why the row does not apply to Phi-4-multimodal
    **{name: "a Phi-3 special token (Phi-4's vocabulary has none of these; the rows with <|user|>, <|end|> and "
             "<|endoftext|> run for both)" for name in ("<s> in the user text", "</s> in the answer",
                                                        "<unk> in the user text", "<|placeholder1|> in the answer")},
    "export: base without lm_head": "Phi-4's lm_head is tied to the embeddings and never saved",
}


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("family", ["phi3_v", "phi4_mm"])
@pytest.mark.parametrize("name,entry,setup,first,problem", CASES, ids=[case[0] for case in CASES])
def test_bad_input(name, entry, setup, first, problem, family, request, tmp_path, capsys, monkeypatch):
    if family == "phi4_mm" and name in PHI3_ONLY:
        pytest.skip(f"Phi-3.5-vision only: {PHI3_ONLY[name]}")
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)
    ctx = Ctx(tmp_path, request.getfixturevalue("tiny_dir" if family == "phi3_v" else "phi4_dir"))
    argv = setup(ctx)
    before = snapshot(tmp_path)
    capsys.readouterr()
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        run_main(MAINS[entry], argv)
    assert time.monotonic() - started < 30  # no input hangs (a named pipe is refused, never opened)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    errors = [n for n, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, lines[-5:]
    assert lines[errors[0]] == fill(first, ctx)
    if problem is not None:
        expected = re.escape(fill(problem, ctx)).replace(re.escape("{N}"), r"\d+")
        assert re.fullmatch(expected, lines[errors[0] + 1]), lines[errors[0] + 1]
    after = snapshot(tmp_path)
    for kept in ("out/" + CACHE_FILE, "out"):  # the validation cache, kept on purpose: a re-run after a fix is quick
        if kept not in before:
            after.pop(kept, None)
    assert after == before  # nothing else written, changed or deleted


def test_named_pipes_are_refused_within_a_second(tmp_path):
    """Each reader gets one second; one that blocks is released by opening the pipe's other end, then fails."""
    import threading

    from phi3v.data.images import open_image
    from phi3v.data.video import read_frames

    pipe = fifo(tmp_path / "pipe")
    for read in (open_image, lambda path: read_frames(path, 2)):
        outcome = []

        def attempt(read=read, outcome=outcome):
            try:
                read(pipe)
            except Exception as error:
                outcome.append(error)

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(1)
        if thread.is_alive():
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # unblock the reader, then fail
            thread.join(5)
            pytest.fail(f"{read} blocked on a named pipe")
        assert isinstance(outcome[0], ValueError) and "not a regular file" in str(outcome[0])


def test_read_only_output_dir_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """(chmod cannot make a folder read-only for root, so the permission answer is what is replaced here)"""
    import phi3v.train.parsing

    monkeypatch.setattr(phi3v.train.parsing.os, "access", lambda path, mode: path != tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_main(ucf101.main, ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --output_dir {tmp_path / 'out'}: {tmp_path} is not writable (read-only or another user's); pass a "
        "folder you can write to")
    assert snapshot(tmp_path) == before
