"""The DocVQA, NLVR2 and Hateful Memes recipes on tiny datasets built in the exact hub schemas, saved locally."""

from __future__ import annotations

import json
import logging

import datasets
import pytest

import finetune_hf_trainer_docvqa as docvqa
import finetune_hf_trainer_hateful_memes as hateful_memes
import finetune_hf_trainer_nlvr2 as nlvr2
from phi3v.data.conversation import render
from tests.conftest import make_image

CAULDRON_FEATURES = datasets.Features({
    "images": datasets.List(datasets.Image()),
    "texts": datasets.List({"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                            "source": datasets.Value("string")}),
})
MINI_DOCVQA_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "image": datasets.Image(),
    "query": {lang: datasets.Value("string") for lang in ("de", "en", "es", "fr", "it")},
    "answers": datasets.List(datasets.Value("string")),
    "words": datasets.List(datasets.Value("string")),
    "bounding_boxes": datasets.List(datasets.List(datasets.Value("float32"))),
    "answer": {"match_score": datasets.Value("float64"), "matched_text": datasets.Value("string"),
               "start": datasets.Value("int64"), "text": datasets.Value("string")},
})


def page(seed: int):
    return make_image(612 + 10 * seed, 792, seed=seed)  # a letter-size page at 72 dpi


@pytest.fixture(scope="session")
def hub_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")

    def mini_row(i):
        question = f"What is the total on page {i}?"
        return {"id": f"q{i}", "image": page(i), "query": {lang: question for lang in ("de", "en", "es", "fr", "it")},
                "answers": [f"{10 * i} USD", f"{10 * i}"], "words": ["total", str(10 * i)],
                "bounding_boxes": [[0.1, 0.1, 0.2, 0.2]], "answer": {"match_score": 1.0, "matched_text": str(10 * i),
                                                                      "start": 1, "text": str(10 * i)}}

    mini = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([mini_row(i) for i in range(6)], features=MINI_DOCVQA_FEATURES),
        "test": datasets.Dataset.from_list([mini_row(i) for i in range(6, 9)], features=MINI_DOCVQA_FEATURES),
    })
    mini.save_to_disk(root / "docvqa_mini")

    def cauldron(rows):
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=CAULDRON_FEATURES)})

    cauldron([{"images": [page(i)], "texts": [
        {"user": f"What is the date on page {i}?", "assistant": f"{i} May", "source": "docvqa"},
        {"user": "Who signed it?", "assistant": "J. Doe", "source": "docvqa"}]} for i in range(4)]
    ).save_to_disk(root / "cauldron_docvqa")
    cauldron([{"images": [make_image(400, 300, seed=i), make_image(300, 400, seed=i + 50)], "texts": [
        {"user": f"The left image has {i} dogs. True or False?", "assistant": "True" if i % 2 else "False",
         "source": "nlvr2"},
        {"user": "Are there cats?", "assistant": "no", "source": "nlvr2"}]} for i in range(8)]
    ).save_to_disk(root / "cauldron_nlvr2")
    memes = cauldron([{"images": [make_image(500, 500, seed=i)], "texts": [
        {"user": "Is this meme hateful? Answer yes or no.", "assistant": "yes" if i % 3 == 0 else "no",
         "source": "hateful_memes"}]} for i in range(9)])
    memes["train"].to_parquet(str(root / "cauldron_memes_parquet" / "hateful_memes" / "train-00000-of-00001.parquet"))
    return root


def run_args(tiny_dir, out, *extra):
    return ["--model_name_or_path", str(tiny_dir), "--output_dir", str(out), "--num_crops", "1", "--batch_size", "4",
            "--batch_size_per_gpu", "2", "--max_steps", "2", "--dataloader_num_workers", "0", "--no-tqdm",
            "--report_to", "none", "--max_new_tokens", "6", "--learning_rate", "1e-3", "--warmup_steps", "0", *extra]


def read_results(out) -> dict:
    return json.loads((out / "all_results.json").read_text())


@pytest.mark.parametrize("mode", [["--use_lora"], []], ids=["lora", "full"])
def test_docvqa(mode, tiny_dir, hub_dirs, tmp_path):
    out = tmp_path / "out"
    docvqa.main(run_args(tiny_dir, out, "--dataset_path", str(hub_dirs / "docvqa_mini"), *mode))
    results = read_results(out)
    for key in ("eval_before_anls", "eval_after_anls", "eval_after_anls_case_sensitive", "train_loss"):
        assert key in results, key
    predictions = json.loads((out / "eval_after.json").read_text())["predictions"]
    assert [p["reference"] for p in predictions] == [["60 USD", "60"], ["70 USD", "70"], ["80 USD", "80"]]


def test_docvqa_full_train_uses_every_question(tiny_dir, hub_dirs, tmp_path):
    out = tmp_path / "out"
    args = run_args(tiny_dir, out, "--full_train", "--dataset_path", str(hub_dirs / "docvqa_mini"),
                    "--full_train_dataset_path", str(hub_dirs / "cauldron_docvqa"))
    assert docvqa.main(args + ["--validate_only"]) == {}
    from phi3v.train.loading import load_processor

    model_args, data_args, _ = docvqa.parse_args(docvqa.DataArguments, args)
    train = docvqa.load_splits(data_args, load_processor(model_args))["train"]
    assert len(train) == 8  # 4 pages x 2 questions
    assert train.conversation(3).turns[0].assistant == "J. Doe"


@pytest.mark.parametrize("mode", [["--use_lora"], []], ids=["lora", "full"])
def test_nlvr2(mode, tiny_dir, hub_dirs, tmp_path):
    out = tmp_path / "out"
    nlvr2.main(run_args(tiny_dir, out, "--dataset_path", str(hub_dirs / "cauldron_nlvr2"), "--eval_rows", "3", *mode))
    results = read_results(out)
    assert {"eval_before_accuracy", "eval_after_accuracy", "train_loss"} <= set(results)
    assert results["eval_after_samples"] == 3


@pytest.mark.parametrize("mode", [["--use_lora"], []], ids=["lora", "full"])
def test_hateful_memes_from_parquet(mode, tiny_dir, hub_dirs, tmp_path):
    out = tmp_path / "out"
    hateful_memes.main(run_args(tiny_dir, out, "--dataset_path", str(hub_dirs / "cauldron_memes_parquet"),
                                "--eval_rows", "6", *mode))
    results = read_results(out)
    assert {"eval_before_accuracy", "eval_after_accuracy", "eval_after_roc_auc"} <= set(results)
    assert 0 <= results["eval_after_roc_auc"] <= 1
    predictions = json.loads((out / "eval_after.json").read_text())["predictions"]
    assert all(len(p["scores"]) == 2 and 0 <= sum(p["scores"]) <= 1 + 1e-6 for p in predictions)


def test_nlvr2_trains_all_turns_as_one_conversation(processor, hub_dirs):
    data_args = nlvr2.parse_args(nlvr2.DataArguments, ["--dataset_path", str(hub_dirs / "cauldron_nlvr2"),
                                                       "--eval_rows", "3"])[1]
    splits = nlvr2.load_splits(data_args, processor)
    conversation = splits["train"].conversation(0)
    assert [len(t.images) for t in conversation.turns] == [2, 0]
    example = splits["train"][0]
    assert (example["input_ids"] == -1).any() and (example["input_ids"] == -2).any()
    labelled = processor.decode(example["labels"][example["labels"] != -100])
    assert "True" in labelled and "no" in labelled  # both answers supervised
    assert splits["train"].where(0) == "HuggingFaceM4/the_cauldron/nlvr2[train] row 3"


def conversations_for(script, rows):
    """(training view, evaluation view) of row 0, as each script builds them."""
    if script is docvqa:
        return docvqa.mini_conversation(0, rows, False), docvqa.mini_conversation(0, rows, True)
    if script is nlvr2:
        return nlvr2.nlvr2_conversation(0, rows, False), nlvr2.nlvr2_conversation(0, rows, True)
    return hateful_memes.meme_conversation(0, rows), hateful_memes.meme_conversation(0, rows)


@pytest.mark.parametrize("script,path,config", [
    (docvqa, "docvqa_mini", None), (nlvr2, "cauldron_nlvr2", "nlvr2"),
    (hateful_memes, "cauldron_memes_parquet", "hateful_memes"),
])
def test_prompts_are_identical_at_train_and_eval_time(script, path, config, processor, hub_dirs):
    from phi3v.data.hub_datasets import load_hf_split

    rows = load_hf_split("unused", config, "train", str(hub_dirs / path))
    train, evaluation = conversations_for(script, rows)
    prompt_text = render(processor, evaluation, for_generation=True)[0]
    assert render(processor, train)[0].startswith(prompt_text)
    if script is docvqa:
        assert train.turns[0].user == "<|image_1|>\nWhat is the total on page 0?\nAnswer briefly."
        cauldron = load_hf_split("unused", "docvqa", "train", str(hub_dirs / "cauldron_docvqa"))
        assert docvqa.cauldron_conversation((0, 0), cauldron).turns[0].user == \
            "<|image_1|>\nWhat is the date on page 0?\nAnswer briefly."  # --full_train trains with the eval prompt


@pytest.mark.parametrize("script,args", [
    (docvqa, ["--dataset_path", "{hub}/docvqa_mini"]),
    (docvqa, ["--dataset_path", "{hub}/docvqa_mini", "--full_train",
              "--full_train_dataset_path", "{hub}/cauldron_docvqa"]),
    (nlvr2, ["--dataset_path", "{hub}/cauldron_nlvr2", "--eval_rows", "3"]),
    (hateful_memes, ["--dataset_path", "{hub}/cauldron_memes_parquet", "--eval_rows", "3"]),
], ids=["docvqa", "docvqa_full", "nlvr2", "hateful_memes"])
def test_a_second_start_reuses_the_validation_of_hub_splits(script, args, processor, hub_dirs, tmp_path, monkeypatch):
    """A hub split is keyed in the validation cache by its arrow files, as a jsonl split by its file: the second start
    of a recipe renders no sample again (each split was rendered and tokenized in full before)."""
    import phi3v.data.validation as validation

    renders = []
    monkeypatch.setattr(validation, "render", lambda *a, **k: renders.append(1) or render(*a, **k))
    data_args = script.parse_args(script.DataArguments, [a.format(hub=hub_dirs) for a in args])[1]

    def start():
        renders.clear()
        splits = script.load_splits(data_args, processor)
        lengths = {name: validation.prepare_dataset(dataset, name, None, False, tmp_path, workers=1,
                                                    disable_tqdm=True, cache_dir=tmp_path).lengths
                   for name, dataset in splits.items()}
        return lengths, len(renders), sum(len(dataset) for dataset in splits.values())

    first = start()
    assert first[1] == first[2] > 0
    assert start() == (first[0], 0, first[2])


@pytest.mark.parametrize("script", [docvqa, nlvr2, hateful_memes])
def test_offline_hub_default_names_dataset_path(script, tiny_dir, tmp_path):
    with pytest.raises(OSError, match="--dataset_path"):
        script.main(run_args(tiny_dir, tmp_path / "out", "--validate_only"))


ORIGINAL_README_COMMANDS = [  # every command of the original README for these scripts (launcher flags dropped)
    (docvqa, ""),
    (nlvr2, ""),
    (docvqa, "--full_train --bf16 --use_flash_attention --batch_size 64 --output_dir out --learning_rate 5e-6 "
             "--num_train_epochs 2"),
    (nlvr2, "--bf16 --use_flash_attention --batch_size 64 --output_dir out --learning_rate 1e-5 --num_train_epochs 3"),
    (hateful_memes, "--output_dir out --batch_size 64 --use_flash_attention --bf16"),
    (hateful_memes, "--output_dir out --batch_size 64"),
    (hateful_memes, "--output_dir out --batch_size 64 --use_lora"),
    (hateful_memes, "--output_dir out --batch_size 64 --use_lora --use_qlora"),
    (hateful_memes, "--bf16 --use_flash_attention --batch_size 64 --output_dir out --learning_rate 5e-5 "
                    "--num_train_epochs 2"),
]


@pytest.mark.parametrize("script,command", ORIGINAL_README_COMMANDS)
def test_original_readme_commands_parse(script, command):
    model_args, data_args, training_args = script.parse_args(script.DataArguments, command.split(), num_crops=16)
    assert model_args.num_crops == 16 and model_args.model_name_or_path == "microsoft/Phi-3.5-vision-instruct"
    assert training_args.batch_size == (64 if "--batch_size 64" in command else 16)
    if "--use_flash_attention" in command:
        assert model_args.attn_implementation == "flash_attention_2" and training_args.bf16
    if "--use_qlora" in command:
        assert model_args.tuning_mode == "qlora"


def test_hateful_memes_warns_when_references_are_spelled_unlike_the_scored_answers(caplog):
    predictions = [{"prediction": "Yes", "reference": "Yes", "scores": [0.6, 0.4]},
                   {"prediction": "no", "reference": "No", "scores": [0.2, 0.8]}]
    data_args = hateful_memes.DataArguments()
    with caplog.at_level(logging.WARNING, logger="phi3v"):
        metrics = hateful_memes.compute_task_metric(predictions, data_args)
    assert metrics["accuracy"] == 1.0 and metrics["roc_auc"] == 1.0
    assert "references are spelled No, Yes: pass --positive_answer / --negative_answer" in caplog.text
    caplog.clear()
    matching = hateful_memes.DataArguments(positive_answer="Yes", negative_answer="No")
    hateful_memes.compute_task_metric(predictions, matching)
    assert "spelled" not in caplog.text
