"""Fine-tune Phi-3.5-vision on DocVQA (document question answering), scored with ANLS.

Data: `nielsr/docvqa_1200_examples` (1,000 train / 200 test, the original's "mini" split) by default; with
--full_train, every question of `HuggingFaceM4/the_cauldron` `docvqa` (all QA pairs of each page, not one random
pair per page per epoch). Evaluation is always on the 200-example test split, before and after training. Offline,
pass local copies with --dataset_path (and --full_train_dataset_path): `save_to_disk` folders or parquet files.

    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py                       # the original quick start
    torchrun --nproc_per_node=4 finetune_hf_trainer_docvqa.py --full_train --bf16 --use_flash_attention \\
        --batch_size 64 --output_dir <output_dir> --learning_rate <lr> --num_train_epochs <epochs>
    python finetune_hf_trainer_docvqa.py --use_lora --use_qlora --batch_size_per_gpu 2   # one smaller GPU

Modes: full (default; DeepSpeed ZeRO-2 on GPUs), --freeze_vision_model, --use_lora, --use_lora --use_qlora.
The prompt is "<|image_1|>\\n{question}\\nAnswer briefly." for training and evaluation alike. Metrics: ANLS in the
standard form (case-insensitive, whitespace-normalised, best over the reference answers; threshold 0.5) and, to
compare with the original script's numbers, its case-sensitive variant (anls_case_sensitive).
num_crops defaults to 16 (documents need the resolution: ~2,400 tokens per page).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

# phi3v before transformers: importing it hides bitsandbytes' import-time notice (see phi3v/__init__.py)
from phi3v.common.errors import run_main

# isort: split
from transformers import set_seed

from phi3v.common.metrics import anls
from phi3v.data.conversation import Conversation, Turn
from phi3v.data.dataset import ConversationDataset
from phi3v.data.hub_datasets import arrow_files, cauldron_texts, expect, hub_image, load_hf_split
from phi3v.data.validation import prepare_splits
from phi3v.serve.export import export_merged
from phi3v.train.arguments import BaseDataArguments
from phi3v.train.checkpoints import prepare_resume
from phi3v.train.loading import load_model, load_processor
from phi3v.train.parsing import parse_args
from phi3v.train.reporting import finish, log_config, setup_logging, start_summary
from phi3v.train.trainer import Phi3VTrainer

# ------------------------------------------------------------------------------------------------- task data

MINI, CAULDRON = "nielsr/docvqa_1200_examples", "HuggingFaceM4/the_cauldron"


@dataclass
class DataArguments(BaseDataArguments):
    full_train: bool = field(default=False, metadata={
        "help": f"Train on every QA pair of {CAULDRON} docvqa instead of the 1,000-example mini split."})
    dataset_path: str | None = field(default=None, metadata={
        "help": f"Local copy of {MINI} (save_to_disk folder or parquet files), used offline."})
    full_train_dataset_path: str | None = field(default=None, metadata={
        "help": f"Local copy of {CAULDRON} docvqa for --full_train (save_to_disk folder or parquet files)."})


def prompt(question: str) -> str:
    """The user message, identical at training and evaluation time."""
    return f"<|image_1|>\n{question.strip()}\nAnswer briefly."


def mini_conversation(index: int, rows, for_generation: bool) -> Conversation:
    row = rows[index]
    answers = expect(row["answers"], "texts", '"answers"')  # several spellings; train on the first, score on all
    if not answers:
        raise ValueError("the row has no answers")
    question = expect(expect(row["query"], "dict", '"query"').get("en"), "text", '"query" "en"')
    turn = Turn(prompt(question), answers if for_generation else answers[0], [hub_image(row["image"])])
    return Conversation(str(row.get("id", index)), [turn])


def cauldron_conversation(item: tuple[int, int], rows) -> Conversation:
    index, qa = item
    row = rows[index]
    text = cauldron_texts(row)[qa]
    images = expect(row["images"], "list", '"images"')
    if not images:
        raise ValueError("the row has no image")
    turn = Turn(prompt(text["user"]), text["assistant"], [hub_image(images[0])])
    return Conversation(f"{index}-{qa}", [turn])


def load_splits(data_args: DataArguments, processor) -> dict:
    """{"train", "val"}: the mini train split (or every Cauldron QA pair) and the 200-example test split."""
    def mini(split, limit, for_generation):
        rows = load_hf_split(MINI, None, split, data_args.dataset_path, columns=("query", "answers", "image"))
        indices = list(range(len(rows)))[:limit]
        return ConversationDataset(indices, functools.partial(mini_conversation, rows=rows,
                                                              for_generation=for_generation), processor,
                                   [f"{MINI}[{split}] row {i}" for i in indices], for_generation,
                                   data_args.max_image_pixels, sources=arrow_files(rows))

    if data_args.full_train:
        rows = load_hf_split(CAULDRON, "docvqa", "train", data_args.full_train_dataset_path, ("images", "texts"))
        items = [(i, qa) for i, count in enumerate(len(t) if isinstance(t, list) else 1 for t in rows["texts"])
                 for qa in range(count)]  # a row whose texts are not a list is one item, reported by validation
        items = items[:data_args.train_samples]
        train = ConversationDataset(items, functools.partial(cauldron_conversation, rows=rows), processor,
                                    [f"{CAULDRON}/docvqa[train] row {i} question {qa + 1}" for i, qa in items],
                                    max_image_pixels=data_args.max_image_pixels, sources=arrow_files(rows))
    else:
        train = mini("train", data_args.train_samples, False)
    return {"train": train, "val": mini("test", data_args.eval_samples, True)}


def compute_task_metric(predictions: list[dict], data_args: DataArguments) -> dict:
    answers, references = [p["prediction"] for p in predictions], [p["reference"] for p in predictions]
    return {"anls": anls(answers, references), "anls_case_sensitive": anls(answers, references, case_sensitive=True)}


def score_token_ids(data_args: DataArguments, processor) -> None:
    return None  # ANLS needs no token probabilities


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(DataArguments, argv, num_crops=16)
    setup_logging(training_args)
    log_config(model_args, data_args, training_args)
    processor = load_processor(model_args)

    # data: every split validated in full before anything is trained
    splits = prepare_splits(load_splits(data_args, processor), data_args, training_args)
    if data_args.validate_only:
        return {}

    # model and trainer
    set_seed(training_args.seed)
    model = load_model(model_args, training_args)
    trainer = Phi3VTrainer(
        model=model, args=training_args, train_dataset=splits["train"], eval_dataset=splits["val"],
        data_collator=processor.collator(), processing_class=processor,
        task_metric=functools.partial(compute_task_metric, data_args=data_args),
        max_new_tokens=data_args.max_new_tokens,
        eval_batch_size=data_args.eval_batch_size, score_token_ids=score_token_ids(data_args, processor),
    )
    resume = prepare_resume(trainer, training_args.resume_from_checkpoint)
    started = start_summary(model, model_args, training_args, splits)

    # evaluate -> train -> save -> evaluate
    metrics = {}
    if data_args.eval_before_training and resume is None:
        metrics.update(trainer.evaluate(metric_key_prefix="eval_before"))
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    if model_args.save_merged_model and model_args.use_lora and training_args.should_save:
        export_merged(training_args.output_dir, Path(training_args.output_dir) / "merged")
    if data_args.eval_after_training:
        metrics.update(trainer.evaluate(metric_key_prefix="eval_after"))
        if "test" in splits:
            metrics.update(trainer.evaluate(splits["test"], metric_key_prefix="test"))
    finish(trainer, metrics, started)
    return metrics


if __name__ == "__main__":
    run_main(main)
