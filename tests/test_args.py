"""The command-line contract: original flags and defaults, derived values, and clear errors on bad combinations."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from phi3v.train.arguments import BaseDataArguments
from phi3v.train.parsing import parse_args


@dataclass
class Data(BaseDataArguments):
    pass


def parse(*argv, **defaults):
    return parse_args(Data, list(argv), **defaults)


def test_original_defaults():
    model, data, training = parse(num_crops=16)
    assert (model.model_name_or_path, model.tuning_mode, model.num_crops) == ("microsoft/Phi-3.5-vision-instruct",
                                                                                "full", 16)
    assert (model.lora_rank, model.lora_alpha, model.lora_dropout) == (64, 128, 0.0)
    assert (training.batch_size, training.batch_size_per_gpu, training.gradient_accumulation_steps) == (16, 1, 16)
    assert (training.learning_rate, training.weight_decay, training.num_train_epochs) == (4e-5, 0.01, 1)
    assert (training.adam_beta1, training.adam_beta2, training.adam_epsilon) == (0.9, 0.95, 1e-7)
    assert (training.warmup_steps, training.max_grad_norm, training.lr_scheduler_type) == (50, 1.0, "linear")
    assert training.gradient_checkpointing and training.output_dir == "./output/"
    assert not training.ddp_find_unused_parameters and model.attn_implementation == "sdpa"


@pytest.mark.parametrize("argv,mode,vision_frozen", [
    ([], "full", False), (["--freeze_vision_model"], "frozen_vision", True), (["--use_lora"], "lora", False),
    (["--use_lora", "--freeze_vision_model"], "lora", True), (["--use_qlora"], "qlora", False),
    (["--use_lora", "--use_qlora"], "qlora", False), (["--tuning_mode", "frozen_vision"], "frozen_vision", True),
])
def test_original_mode_flags_map_to_one_mode(argv, mode, vision_frozen):
    model, _, _ = parse(*argv)
    assert (model.tuning_mode, model.freeze_vision_model) == (mode, vision_frozen)


def test_original_spellings():
    _, _, training = parse("--wd", "0.2", "--no-tqdm", "--use_lora", "--lora_alpha_ratio", "0.5", "--lora_rank", "32")
    assert training.weight_decay == 0.2 and training.disable_tqdm
    model, _, _ = parse("--use_lora", "--lora_rank", "32", "--lora_alpha_ratio", "0.5")
    assert model.lora_alpha == 16  # the README's "rank 32 / alpha 16"


def test_flash_attention_implies_bf16():
    model, _, training = parse("--use_flash_attention")
    assert model.attn_implementation == "flash_attention_2" and training.bf16


@pytest.mark.parametrize("argv,message", [
    (["--use_flash_attention", "--fp16"],
     r"--fp16 cannot be combined with --bf16 \(flash attention runs only in bf16"),
    (["--batch_size", "10", "--batch_size_per_gpu", "4"],
     r"--batch_size 10 is the global batch: it must be a multiple of --batch_size_per_gpu \(4\) x the number of "
     r"processes \(1\) = 4"),
    (["--num_crops", "17"], "--num_crops must be between 1 and 16, got 17"),
    (["--fp32", "--bf16"], "--fp32 cannot be combined with --bf16 or --fp16"),
    (["--use_flash_attention", "--attn_implementation", "eager"], "--use_flash_attention conflicts with"),
])
def test_bad_combinations_are_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_world_size_enters_gradient_accumulation(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"x the number of processes \(4\) = 8"):
        parse("--batch_size", "12", "--batch_size_per_gpu", "2")
    # transformers' own checks would start a 4-process group here; the recipe's values are set before them
    import transformers

    monkeypatch.setattr(transformers.TrainingArguments, "__post_init__", lambda self: None)
    training = parse("--batch_size", "64", "--batch_size_per_gpu", "2")[2]
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (2, 8)  # 64 / (2 x 4)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse("--batch_size", "64", "--batch_size_per_gpu", "2")[2].gradient_accumulation_steps == 32


def test_help_from_the_command_line_lists_every_group():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "finetune_hf_trainer_docvqa.py", "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0
    for flag in ("--use_lora", "--full_train", "--save_steps", "--batch_size_per_gpu"):
        assert flag in result.stdout, flag


@pytest.mark.parametrize("argv,world,expected", [  # (per GPU, accumulation, global batch)
    ([], 1, (1, 16, 16)),
    (["--batch_size", "32", "--batch_size_per_gpu", "4"], 2, (4, 4, 32)),
    (["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "3"], 1, (4, 3, 12)),
    (["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "5"], 4, (2, 5, 40)),
    (["--per_device_train_batch_size", "2"], 2, (2, 4, 16)),  # the original global default still holds
    (["--gradient_accumulation_steps", "7"], 1, (1, 7, 7)),
    (["--batch_size", "8", "--per_device_train_batch_size", "2"], 2, (2, 2, 8)),
    (["--batch_size", "12", "--gradient_accumulation_steps", "3", "--batch_size_per_gpu", "4"], 1, (4, 3, 12)),
])
def test_hf_batch_flags_are_honoured(argv, world, expected):
    from types import SimpleNamespace

    from phi3v.train.training_arguments import RecipeTrainingArguments

    if world == 1:  # the whole parse
        _, _, training = parse(*argv)
    else:  # several processes: the rule alone (a real WORLD_SIZE would make accelerate wait for the others)
        flags = dict(zip(argv[::2], argv[1::2]))
        training = SimpleNamespace(**{name: int(flags[f"--{name}"]) if f"--{name}" in flags else None for name in (
            "batch_size", "batch_size_per_gpu", "per_device_train_batch_size", "gradient_accumulation_steps")})
        RecipeTrainingArguments.resolve_batch_sizes(training, world)
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps, training.batch_size) \
        == expected
    assert training.batch_size_per_gpu == expected[0]


@pytest.mark.parametrize("argv,message", [
    (["--batch_size", "16", "--gradient_accumulation_steps", "4"],
     r"--batch_size 16 \(the global batch\) disagrees with --gradient_accumulation_steps 4 x 1 per GPU x 1 "
     r"process\(es\) = 4"),
    (["--batch_size_per_gpu", "2", "--per_device_train_batch_size", "4"],
     "--batch_size_per_gpu 2 and --per_device_train_batch_size 4 are the same setting"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0"),
])
def test_batch_flags_that_disagree_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_output_dir_in_the_base_model_is_found_through_relative_paths(tmp_path, monkeypatch):
    """Compared resolved: `./base/../base` is the base; `base-run` (same prefix) and `runs/x` are other folders."""
    from phi3v.common.errors import BadValue

    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    for output_dir in ("base/../base", "./base/run"):
        with pytest.raises(BadValue, match="the base model folder"):
            parse("--model_name_or_path", "base", "--output_dir", output_dir)
    for output_dir in ("base-run", "runs/x"):
        parse("--model_name_or_path", "base", "--output_dir", output_dir)


# argv, and what the parser says: None (accepted) or its one-line error (moved here with the flag index's removal)
COMMAND_LINES = [
    ([], None),
    (["--learning_rate", "1e-4", "--bf16", "--no_eval_before_training", "--use_lora", "--lora_target_modules",
      "o_proj", "fc1"], None),
    (["--learning-rate", "1e-4", "--learning_r", "2e-4"], None),  # dashes, and a prefix as argparse allows
    (["--lerning_rate", "1e-4"],
     "unknown flag --lerning_rate (did you mean --learning_rate?); --help lists the flags"),
    (["--bogus=1", "--use_lora"], "unknown flag --bogus=1; --help lists the flags"),
    (["stray"], "unexpected argument stray: flags start with --, and a settings file (first argument or --config) "
                "ends in .yaml, .yml, .json"),
    (["--num_crops", "x"], "argument --num_crops/--num-crops: invalid int value: 'x'; --help lists the flags"),
    (["--learning_rate", "fast"],
     "argument --learning_rate/--learning-rate: invalid float value: 'fast'; --help lists the flags"),
    (["--tuning_mode", "ful"], "argument --tuning_mode/--tuning-mode: invalid choice: 'ful' (choose from 'full', "
                               "'frozen_vision', 'lora', 'qlora'); --help lists the flags"),
    (["--learning_rate"], "argument --learning_rate/--learning-rate: expected one argument; --help lists the flags"),
    (["--bf16", "maybe"], "argument --bf16: Truthy value expected: got maybe but expected one of yes/no, true/false, "
                          "t/f, y/n, 1/0 (case insensitive).; --help lists the flags"),
]


@pytest.mark.parametrize("argv,message", COMMAND_LINES)
def test_command_line_errors_are_one_line(argv, message, tmp_path, monkeypatch):
    from finetune_hf_trainer_docvqa import DataArguments
    from phi3v.common.errors import UserError

    monkeypatch.chdir(tmp_path)  # --output_dir's default is relative
    try:
        parse_args(DataArguments, argv, num_crops=16)
        said = None
    except UserError as error:
        said = str(error)
    assert said == message


@pytest.mark.parametrize("module,argv,message", [
    ("predict", ["--imgae", "x.png"], "unknown flag --imgae (did you mean --image?); --help lists the flags"),
    ("predict", ["out", "extra"], "unexpected argument extra: flags start with --"),
    ("phi3v.export", ["a", "b", "--dtpye", "float16"],
     "unknown flag --dtpye (did you mean --dtype?); --help lists the flags"),
    ("demo", ["--epochs", "many"], "argument --epochs: invalid float value: 'many'; --help lists the flags"),
])
def test_the_argparse_entry_points_say_command_line_errors_in_one_line(module, argv, message):
    import importlib

    from phi3v.common.errors import UserError

    with pytest.raises(UserError) as raised:
        importlib.import_module(module).main(argv)
    assert str(raised.value) == message
