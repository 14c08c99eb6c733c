"""Config files: `script.py run.yaml|json` and `--config FILE` give the same arguments as the flags, and flags win."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest

from phi3v.common.errors import UserError
from phi3v.train.parsing import parse_args

REPO = Path(__file__).resolve().parents[1]
SCRIPT_OF = {"hateful_memes": "finetune_hf_trainer_hateful_memes", "docvqa": "finetune_hf_trainer_docvqa",
             "nlvr2": "finetune_hf_trainer_nlvr2", "ucf101": "finetune_hf_trainer_ucf101"}

SETTINGS = {  # one of each kind of value: numbers, booleans both ways, lists, a choice, a default-True flag off
    "output_dir": "runs/x", "learning_rate": 1.0e-4, "num_train_epochs": 3, "use_lora": True, "lora_rank": 8,
    "lora_target_modules": ["qkv_proj", "o_proj"], "freeze_vision_tower": True, "eval_before_training": False,
    "report_to": ["tensorboard"], "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3,
    "lr_scheduler_type": "cosine", "vision_lr": None, "no_tqdm": True, "max_new_tokens": 16,
}
FLAGS = ["--output_dir", "runs/x", "--learning_rate", "1e-4", "--num_train_epochs", "3", "--use_lora", "--lora_rank",
         "8", "--lora_target_modules", "qkv_proj", "o_proj", "--freeze_vision_tower", "--no_eval_before_training",
         "--report_to", "tensorboard", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3",
         "--lr_scheduler_type", "cosine", "--no-tqdm", "--max_new_tokens", "16"]


def script(name: str):
    return importlib.import_module(name)


def as_dicts(parsed) -> list[dict]:
    model, data, training = parsed
    return [dataclasses.asdict(model), dataclasses.asdict(data), training.to_dict()]


def write(path: Path, settings: dict) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        import yaml

        path.write_text(yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_and_the_same_flags_give_identical_arguments(suffix, tmp_path):
    data_class = script(SCRIPT_OF["docvqa"]).DataArguments
    config = write(tmp_path / f"run{suffix}", SETTINGS)
    from_flags = parse_args(data_class, FLAGS, num_crops=16)
    from_file = parse_args(data_class, [str(config)], num_crops=16)
    with_option = parse_args(data_class, ["--config", str(config)], num_crops=16)
    assert as_dicts(from_file) == as_dicts(from_flags) == as_dicts(with_option)
    _, _, training = from_file
    assert (training.learning_rate, training.gradient_accumulation_steps, training.lr_scheduler_type) == (
        1e-4, 3, "cosine")
    assert from_file[0].lora_target_modules == ["qkv_proj", "o_proj"] and not from_file[1].eval_before_training


def test_flags_on_the_command_line_override_the_file(tmp_path):
    data_class = script(SCRIPT_OF["docvqa"]).DataArguments
    config = write(tmp_path / "run.yaml", SETTINGS)
    model, data, training = parse_args(data_class, [str(config), "--learning_rate", "3e-5", "--lora_rank", "16",
                                                    "--eval_before_training", "true"])
    assert (training.learning_rate, model.lora_rank, data.eval_before_training) == (3e-5, 16, True)
    assert training.num_train_epochs == 3  # the rest still comes from the file
    model, _, training = parse_args(data_class, ["--learning_rate", "3e-5", f"--config={config}"])
    assert training.learning_rate == 3e-5 and model.use_lora


@pytest.mark.parametrize("content,name,message", [
    ("learning_rate: 1e-4\nlerning_rate: 2e-4\n", "run.yaml", "unknown setting\\(s\\) lerning_rate"),
    ("[1, 2]", "run.json", "must hold a mapping of flag names to values, got list"),
    ("a: [1, 2\n", "run.yaml", "could not be read"),
    ("{\"learning_rate\": }", "run.json", "could not be read"),
])
def test_bad_config_files_are_user_errors(content, name, message, tmp_path):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message):
        parse_args(script(SCRIPT_OF["docvqa"]).DataArguments, [str(tmp_path / name)])


def test_a_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_args(script(SCRIPT_OF["docvqa"]).DataArguments, ["--config", str(tmp_path / "absent.yaml")])


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").iterdir()))
def test_every_example_config_parses_with_its_script(config):
    """Each file in configs/ is read by the script its name starts with, and every setting arrives as written."""
    path = REPO / "configs" / config
    task = next(task for task in SCRIPT_OF if config.startswith(task))
    settings = json.loads(path.read_text()) if path.suffix == ".json" else __import__("yaml").safe_load(
        path.read_text())
    groups = parse_args(script(SCRIPT_OF[task]).DataArguments, [str(path)])
    for key, value in settings.items():
        got = next(getattr(g, key) for g in groups if hasattr(g, key))
        value = [value] if isinstance(got, list) and not isinstance(value, list) else value  # one-item list flags
        assert got == value, (config, key, got, value)


@pytest.mark.parametrize("task", sorted(SCRIPT_OF))
def test_help_lists_the_settings_file_in_both_forms(task, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one help line per sentence part, whatever the terminal
    with pytest.raises(SystemExit) as exited:
        parse_args(script(SCRIPT_OF[task]).DataArguments, ["--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "settings file: --config FILE Settings from a YAML or JSON file" in help_text
    assert "YAML: one `learning_rate: 1.0e-4` a line" in help_text
    assert 'JSON: {"learning_rate": 1e-4, "use_lora": true}' in help_text
    assert "also as the first argument: script.py run.yaml [flags]" in help_text


@pytest.mark.parametrize("argv,expected", [
    (["run.yaml", "--bf16"], ("run.yaml", ["--bf16"])),
    (["--config", "run.yaml", "--bf16"], ("run.yaml", ["--bf16"])),
    (["--bf16", "--config=run.yml"], ("run.yml", ["--bf16"])),
    (["RUN.JSON"], ("RUN.JSON", [])),
    (["--debug", "--output_dir", "x.json"], (None, ["--debug", "--output_dir", "x.json"])),  # a value, not a file
])
def test_the_settings_file_is_taken_out_of_the_command_line(argv, expected):
    from phi3v.train.parsing import split_config_file

    assert split_config_file(argv) == expected


@pytest.mark.parametrize("argv,message", [
    (["run.yaml", "--config", "other.yaml"], "give one config file (as the first argument or with --config), not two"),
    (["--config", "a.yaml", "--config", "b.yaml"],
     "give one config file (as the first argument or with --config), not two"),
    (["--bf16", "--config"], "--config needs a file: --config run.yaml"),
    (["--conf", "run.yaml"],
     "write --config in full: an abbreviation of it is not read as a settings file; --help lists the flags"),
])
def test_settings_file_mistakes_are_one_line(argv, message, tmp_path):
    for name in ("run.yaml", "other.yaml", "a.yaml", "b.yaml"):
        (tmp_path / name).write_text("learning_rate: 1.0e-4\n")
    argv = [str(tmp_path / arg) if arg.endswith(".yaml") else arg for arg in argv]
    with pytest.raises(UserError) as raised:
        parse_args(script(SCRIPT_OF["docvqa"]).DataArguments, argv)
    assert str(raised.value) == message
