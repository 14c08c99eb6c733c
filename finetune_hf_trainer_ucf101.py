"""Fine-tune Phi-3.5-vision on your own data: any jsonl/json file pair; here, video classification on UCF-101.

Data: --train_file, --eval_file and optionally --test_file, in our jsonl, LLaVA json/jsonl or messages jsonl (the
format is recognised from the content; images and videos relative to --image_root, default: beside each file), or
Hugging Face datasets with messages + images columns; or --data_dir DIR holding ucf101_{train,val}.jsonl, optional
ucf101_test.jsonl and images/, as written by convert_ucf101.py. Trains on train, evaluates on val before and after
training and on test (if given) at the end, by generation, with accuracy (exact match).

    python convert_ucf101.py --out_dir /path/to/converted_ucf101
    torchrun --nproc_per_node=4 finetune_hf_trainer_ucf101.py --data_dir /path/to/converted_ucf101
    torchrun --nproc_per_node=8 finetune_hf_trainer_ucf101.py --data_dir DIR --bf16 --use_flash_attention  # A100/H100
    python finetune_hf_trainer_ucf101.py --data_dir DIR --use_lora --batch_size_per_gpu 2  # one GPU
    python finetune_hf_trainer_ucf101.py --train_file train.jsonl --eval_file val.jsonl --image_root images/

Modes: full fine-tuning (default; DeepSpeed ZeRO-2 on GPUs, --deepspeed ds_configs/zero3.json for ZeRO-3),
--freeze_vision_model, --use_lora (LM and vision tower), --use_lora --freeze_vision_model (LM only),
--use_lora --use_qlora (4-bit base). Checkpoints every --save_steps; --resume_from_checkpoint last continues.
num_crops defaults to 4 for video frames (8 frames x 757 tokens at 320x240).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

# phi3v before transformers: importing it hides bitsandbytes' import-time notice (see phi3v/__init__.py)
from phi3v.common.errors import UserError, run_main

# isort: split
from transformers import set_seed

from phi3v.common.metrics import accuracy
from phi3v.data.formats import FORMATS, detect_format, is_hub_id, load_data
from phi3v.data.validation import prepare_splits
from phi3v.serve.export import export_merged
from phi3v.train.arguments import BaseDataArguments
from phi3v.train.checkpoints import prepare_resume
from phi3v.train.loading import load_model, load_processor
from phi3v.train.parsing import parse_args
from phi3v.train.reporting import finish, log_config, setup_logging, start_summary
from phi3v.train.trainer import Phi3VTrainer

# ------------------------------------------------------------------------------------------------- task data


@dataclass
class DataArguments(BaseDataArguments):
    data_dir: str | None = field(default=None, metadata={
        "help": "Folder with ucf101_{train,val}.jsonl, optional ucf101_test.jsonl, and images/ (the output of "
                "convert_ucf101.py). Or name the files with --train_file/--eval_file/--test_file."})
    train_file: str | None = field(default=None, metadata={"help": "Training data (jsonl/json file)."})
    eval_file: str | None = field(default=None, metadata={
        "help": "Evaluation data, asked before and after training (its last answers are the references)."})
    test_file: str | None = field(default=None, metadata={"help": "Optional test data, evaluated at the end."})
    image_root: str | None = field(default=None, metadata={
        "help": "Folder the image and video paths of --train_file/--eval_file/--test_file are relative to "
                "(default: the folder of each file)."})
    data_format: str = field(default="auto", metadata={
        "help": "auto (recognised from the content), ours, llava, messages or hf (a Hugging Face dataset: hub id, "
                "save_to_disk folder, parquet files).", "choices": FORMATS})
    num_frames: int = field(default=8, metadata={"help": "Frames per video for records naming a video file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Config of a Hugging Face dataset."})
    train_split: str | None = field(default=None, metadata={
        "help": "Split of a Hugging Face --train_file (default train)."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Split of a Hugging Face --eval_file (default test; row ranges work: train[-200:])."})
    test_split: str | None = field(default=None, metadata={
        "help": "Split of a Hugging Face --test_file (default test)."})


def data_files(data_args: DataArguments) -> dict:
    """{split: (file, image root)} for train, val and, when there is one, test."""
    if data_args.data_dir is not None:
        if data_args.train_file or data_args.eval_file or data_args.test_file:
            raise UserError("pass either --data_dir or --train_file/--eval_file/--test_file, not both")
        root = Path(data_args.data_dir)
        files = {split: root / f"ucf101_{split}.jsonl" for split in ("train", "val", "test")}
        if not files["test"].is_file():
            del files["test"]  # the test split is optional
        roots = dict.fromkeys(files, root / "images")
    else:
        if not (data_args.train_file and data_args.eval_file):
            raise UserError("pass --train_file and --eval_file (and optionally --test_file), or --data_dir: the "
                            "folder convert_ucf101.py wrote (see --help)")
        files = {"train": data_args.train_file, "val": data_args.eval_file, "test": data_args.test_file}
        files = {split: Path(file) for split, file in files.items() if file}
        roots = {split: Path(data_args.image_root) if data_args.image_root else file.parent
                 for split, file in files.items()}
    for file in files.values():
        if not file.exists() and not (data_args.data_dir is None and is_hub_id(str(file))):
            hint = ": run convert_ucf101.py first" if data_args.data_dir is not None else ""
            raise UserError(f"{file} not found{hint}")
    return {split: (file, roots[split]) for split, file in files.items()}


SPLIT_FLAGS = {"train": "train_split", "val": "eval_split", "test": "test_split"}


def check_hub_flags(data_args: DataArguments, files: dict) -> None:
    """Refuse the flags that pick the data of a Hugging Face dataset where they would be ignored: a split flag for
    a jsonl/json file (or for no file), --dataset_config when no file is a Hugging Face dataset."""
    given = {split: getattr(data_args, name) for split, name in SPLIT_FLAGS.items()}
    if all(value is None for value in [*given.values(), data_args.dataset_config]):
        return  # (nothing read: the format is found when the data loads)
    formats = {split: detect_format(file) if data_args.data_format == "auto" else data_args.data_format
               for split, (file, _) in files.items()}
    for split, value in given.items():
        if value is not None and formats.get(split) != "hf":
            what = (f"{files[split][0]} is a jsonl/json file ({formats[split]} format)" if split in files
                    else f"there is no {split} data")
            raise UserError(f"--{SPLIT_FLAGS[split]} applies to Hugging Face datasets only, and {what}: leave it out")
    if data_args.dataset_config is not None and "hf" not in formats.values():
        raise UserError("--dataset_config applies to Hugging Face datasets only, and no data file is one: leave it "
                        "out")


def load_splits(data_args: DataArguments, processor) -> dict:
    """{"train", "val"[, "test"]}: train yields training sequences, val and test prompts with reference answers."""
    files = data_files(data_args)
    check_hub_flags(data_args, files)
    hub_splits = {"train": data_args.train_split or "train", "val": data_args.eval_split or "test",
                  "test": data_args.test_split or "test"}
    return {split: load_data(file, processor, root, data_args.data_format, split != "train", hub_splits[split],
                             data_args.dataset_config, data_args.num_frames, data_args.max_image_pixels,
                             data_args.train_samples if split == "train" else data_args.eval_samples)
            for split, (file, root) in files.items()}


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
