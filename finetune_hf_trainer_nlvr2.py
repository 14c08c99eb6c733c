"""Fine-tune Phi-3.5-vision on NLVR2: is a statement about two images true? Multi-image, scored with accuracy.

Data: `HuggingFaceM4/the_cauldron` `nlvr2`; as the original, rows 500 onwards of its train split for training and the
first 500 rows for evaluation (before and after training). Every example has two images; all of its questions are
trained as one multi-turn conversation (the images in the first turn, tags numbered across the conversation);
evaluation asks the first question. Offline, pass a local copy with --dataset_path (save_to_disk or parquet).

    torchrun --nproc_per_node=8 finetune_hf_trainer_nlvr2.py                                 # the original example
    torchrun --nproc_per_node=4 finetune_hf_trainer_nlvr2.py --bf16 --use_flash_attention --batch_size 64 \
        --output_dir <output_dir> --learning_rate <lr> --num_train_epochs <epochs>
    python finetune_hf_trainer_nlvr2.py --use_lora --batch_size_per_gpu 2                    # one GPU

Modes: full (default; DeepSpeed ZeRO-2 on GPUs), --freeze_vision_model, --use_lora, --use_lora --use_qlora.
Published (Phi-3.5-vision, 4 GPUs, bf16 + flash attention, batch 64): full fine-tuning lr 1e-5 3 epochs 89.40;
frozen vision lr 2e-5 2 epochs 89.20. num_crops defaults to 16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

# phi3v before transformers: importing it hides bitsandbytes' import-time notice (see phi3v/__init__.py)
from phi3v.common.errors import run_main

# isort: split
from transformers import set_seed

from phi3v.common.metrics import accuracy
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

CAULDRON = "HuggingFaceM4/the_cauldron"


@dataclass
class DataArguments(BaseDataArguments):
    dataset_path: str | None = field(default=None, metadata={
        "help": f"Local copy of {CAULDRON} nlvr2 (save_to_disk folder or parquet files), used offline."})
    eval_rows: int = field(default=500, metadata={
        "help": "The first N rows of the train split are the evaluation set, the rest is trained on (original: 500)."})


def nlvr2_conversation(index: int, rows, for_generation: bool) -> Conversation:
    row = rows[index]
    if len(expect(row["images"], "list", '"images"')) != 2:
        raise ValueError(f"expected 2 images, found {len(row['images'])}")
    texts = cauldron_texts(row)
    texts = texts[:1] if for_generation else texts  # evaluation asks the first question only
    if not texts:
        raise ValueError("the row has no questions")
    images = [hub_image(image) for image in row["images"]]
    turns = [Turn(t["user"], t["assistant"], images if n == 0 else []) for n, t in enumerate(texts)]
    return Conversation(str(index), turns)


def load_splits(data_args: DataArguments, processor) -> dict:
    """{"train", "val"}: rows eval_rows.. and the first eval_rows rows of the Cauldron's nlvr2 train split."""
    def split(rows_range, limit, for_generation):
        rows = load_hf_split(CAULDRON, "nlvr2", f"train[{rows_range}]", data_args.dataset_path,
                             ("images", "texts"))
        indices = list(range(len(rows)))[:limit]
        offset = data_args.eval_rows if rows_range.startswith(str(data_args.eval_rows)) else 0
        return ConversationDataset(indices, functools.partial(nlvr2_conversation, rows=rows,
                                                              for_generation=for_generation), processor,
                                   [f"{CAULDRON}/nlvr2[train] row {offset + i}" for i in indices], for_generation,
                                   data_args.max_image_pixels, sources=arrow_files(rows))

    return {"train": split(f"{data_args.eval_rows}:", data_args.train_samples, False),
            "val": split(f":{data_args.eval_rows}", data_args.eval_samples, True)}


def compute_task_metric(predictions: list[dict], data_args: DataArguments) -> dict:
    return {"accuracy": accuracy([p["prediction"] for p in predictions], [p["reference"] for p in predictions])}


def score_token_ids(data_args: DataArguments, processor) -> None:
    return None  # accuracy needs no token probabilities


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
