"""Fine-tune Phi-3.5-vision on Hateful Memes: is this meme hateful? Scored with accuracy and ROC AUC.

Data: `HuggingFaceM4/the_cauldron` `hateful_memes`; as the original, rows 500 onwards of its train split for
training and the first 500 rows for evaluation (before and after training). Accuracy is the original's exact match
after normalisation; ROC AUC, the task's standard metric, ranks the evaluation memes by the model's probability
of the positive answer's first token (against the negative one's) at the first generated position.
Offline, pass a local copy with --dataset_path (save_to_disk folder or parquet files).

    torchrun --nproc_per_node=8 --nnodes=<num_nodes> --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT \
        --node_rank=$NODE_RANK finetune_hf_trainer_hateful_memes.py --output_dir <output_dir> --batch_size 64 \
        --use_flash_attention --bf16                                  # A100/H100: full fine-tuning
    torchrun --nproc_per_node=8 ... finetune_hf_trainer_hateful_memes.py --output_dir <output_dir> --batch_size 64
                                                                      # V100: fp16, sdpa attention
    torchrun --nproc_per_node=2 finetune_hf_trainer_hateful_memes.py --output_dir <output_dir> --batch_size 64 \
        --use_lora [--use_qlora]                                      # consumer GPUs

Modes: full (default; DeepSpeed ZeRO-2 on GPUs), --freeze_vision_model, --use_lora, --use_lora --use_qlora.
num_crops defaults to 16.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

# phi3v before transformers: importing it hides bitsandbytes' import-time notice (see phi3v/__init__.py)
from phi3v.common.errors import run_main

# isort: split
from transformers import set_seed

from phi3v.common.metrics import accuracy, normalize_answer, roc_auc
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

logger = logging.getLogger("phi3v")

# ------------------------------------------------------------------------------------------------- task data

CAULDRON = "HuggingFaceM4/the_cauldron"


@dataclass
class DataArguments(BaseDataArguments):
    dataset_path: str | None = field(default=None, metadata={
        "help": f"Local copy of {CAULDRON} hateful_memes (save_to_disk folder or parquet files), used offline."})
    eval_rows: int = field(default=500, metadata={
        "help": "The first N rows of the train split are the evaluation set, the rest is trained on (original: 500)."})
    positive_answer: str = field(default="yes", metadata={"help": "The answer meaning hateful (for ROC AUC)."})
    negative_answer: str = field(default="no", metadata={"help": "The answer meaning not hateful (for ROC AUC)."})


def meme_conversation(index: int, rows) -> Conversation:
    row = rows[index]
    if not expect(row["images"], "list", '"images"') or not cauldron_texts(row):
        raise ValueError("the row needs an image and a question")
    text = row["texts"][0]
    return Conversation(str(index), [Turn(text["user"], text["assistant"], [hub_image(row["images"][0])])])


def load_splits(data_args: DataArguments, processor) -> dict:
    """{"train", "val"}: rows eval_rows.. and the first eval_rows rows of the Cauldron's hateful_memes train split."""
    def split(rows_range, limit, for_generation):
        rows = load_hf_split(CAULDRON, "hateful_memes", f"train[{rows_range}]", data_args.dataset_path,
                             ("images", "texts"))
        indices = list(range(len(rows)))[:limit]
        offset = data_args.eval_rows if rows_range.startswith(str(data_args.eval_rows)) else 0
        return ConversationDataset(indices, functools.partial(meme_conversation, rows=rows), processor,
                                   [f"{CAULDRON}/hateful_memes[train] row {offset + i}" for i in indices],
                                   for_generation, data_args.max_image_pixels, sources=arrow_files(rows))

    return {"train": split(f"{data_args.eval_rows}:", data_args.train_samples, False),
            "val": split(f":{data_args.eval_rows}", data_args.eval_samples, True)}


def compute_task_metric(predictions: list[dict], data_args: DataArguments) -> dict:
    answers, references = [p["prediction"] for p in predictions], [p["reference"] for p in predictions]
    metrics = {"accuracy": accuracy(answers, references)}
    labels = [int(normalize_answer(r) == normalize_answer(data_args.positive_answer)) for r in references]
    spelled_otherwise = sorted({r.strip() for r in references if normalize_answer(r) in (
        normalize_answer(data_args.positive_answer), normalize_answer(data_args.negative_answer))
        and r.strip() not in (data_args.positive_answer, data_args.negative_answer)})
    if spelled_otherwise:  # accuracy ignores case; the ROC AUC scores exactly the spelled tokens
        logger.warning(f"ROC AUC scores the first tokens of {data_args.positive_answer!r} / "
                       f"{data_args.negative_answer!r}, but references are spelled {', '.join(spelled_otherwise)}: "
                       "pass --positive_answer / --negative_answer spelled as the answers are")
    if "scores" in predictions[0] and 0 < sum(labels) < len(labels):
        p_positive, p_negative = zip(*(p["scores"] for p in predictions))
        metrics["roc_auc"] = roc_auc([a / (a + b) if a + b > 0 else 0.5 for a, b in zip(p_positive, p_negative)],
                                     labels)
    else:
        logger.warning("ROC AUC skipped: the evaluation set needs both positive and negative references")
    return metrics


def score_token_ids(data_args: DataArguments, processor) -> list[int]:
    """First token of the positive and of the negative answer, as the model writes them after the prompt."""
    def first(answer):
        before = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
        return processor.tokenizer("\n" + answer, add_special_tokens=False)["input_ids"][len(before)]

    return [first(data_args.positive_answer), first(data_args.negative_answer)]


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
