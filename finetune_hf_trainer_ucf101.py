"""Fine-tune Phi-3.5-vision on your own data in the jsonl format: here, video classification on UCF-101 frames.

Data: DATA_DIR/ucf101_{train,val,test}.jsonl and DATA_DIR/images/..., as written by convert_ucf101.py (any data
converted to this format works; see the README). Trains on train, evaluates on val before and after training and
on test at the end, by generation, with accuracy.

    python convert_ucf101.py --out_dir /path/to/converted_ucf101
    torchrun --nproc_per_node=4 finetune_hf_trainer_ucf101.py --data_dir /path/to/converted_ucf101
    torchrun --nproc_per_node=8 finetune_hf_trainer_ucf101.py --data_dir DIR --bf16 --use_flash_attention  # A100/H100
    python finetune_hf_trainer_ucf101.py --data_dir DIR --use_lora --batch_size_per_gpu 2  # one GPU

Modes: full fine-tuning (default; DeepSpeed ZeRO-2 on GPUs, --deepspeed ds_configs/zero3.json for ZeRO-3),
--freeze_vision_model, --use_lora (LM and vision tower), --use_lora --freeze_vision_model (LM only),
--use_lora --use_qlora (4-bit base). Checkpoints every --save_steps; --resume_from_checkpoint last continues.
num_crops defaults to 4 for video frames (8 frames x 757 tokens at 320x240).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed

from phi3v.args import BaseDataArguments, parse_args
from phi3v.collator import Phi3VCollator
from phi3v.data import jsonl_dataset
from phi3v.errors import UserError, run_main
from phi3v.export import export_merged
from phi3v.metrics import accuracy
from phi3v.model_loading import load_model, load_processor
from phi3v.reporting import finish, log_config, setup_logging, start_summary
from phi3v.training import Phi3VTrainer, prepare_resume
from phi3v.validation import prepare_splits

# ------------------------------------------------------------------------------------------------- task data


@dataclass
class DataArguments(BaseDataArguments):
    data_dir: str | None = field(default=None, metadata={
        "help": "Folder with ucf101_{train,val,test}.jsonl and images/ (the output of convert_ucf101.py)."})


def load_splits(data_args: DataArguments, processor) -> dict:
    """{"train", "val", "test"}: train yields training sequences, val and test prompts with reference answers."""
    if data_args.data_dir is None:
        raise UserError("--data_dir is required: the folder convert_ucf101.py wrote (see --help)")
    root = Path(data_args.data_dir)
    for split in ("train", "val", "test"):
        if not (root / f"ucf101_{split}.jsonl").is_file():
            raise UserError(f"{root / f'ucf101_{split}.jsonl'} not found: run convert_ucf101.py first")

    def split(name, limit, for_generation):
        return jsonl_dataset(root / f"ucf101_{name}.jsonl", root / "images", processor, for_generation,
                             data_args.max_image_pixels, limit)

    return {"train": split("train", data_args.train_samples, False), "val": split("val", data_args.eval_samples, True),
            "test": split("test", data_args.eval_samples, True)}


def compute_task_metric(predictions: list[dict], data_args: DataArguments) -> dict:
    return {"accuracy": accuracy([p["prediction"] for p in predictions], [p["reference"] for p in predictions])}


def score_token_ids(data_args: DataArguments, processor) -> None:
    return None  # accuracy needs no token probabilities


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(DataArguments, argv, num_crops=4)
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
        data_collator=Phi3VCollator(processor.tokenizer.pad_token_id), processing_class=processor,
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
