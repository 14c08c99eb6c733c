"""The recipes' command line: (ModelArguments, DataArguments, RecipeTrainingArguments) from flags and settings files.

    script.py [flags]   script.py run.yaml [flags]   script.py --config run.json [flags]

Command-line errors are one line; settings files hold flag names without the dashes, command-line flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser
from transformers.integrations import is_deepspeed_available

from phi3v.common.errors import BadValue, OneLineErrors, UserError, unknown_arguments
from phi3v.train.arguments import DS_CONFIGS, ModelArguments
from phi3v.train.checkpoints import check_resume_setup, recorded, resolve_checkpoint
from phi3v.train.training_arguments import RecipeTrainingArguments


def parse_args(data_class: type, argv: list[str] | None = None, **defaults):
    """Parse (ModelArguments, DataArguments, RecipeTrainingArguments); `defaults` are the script's own, and `argv`
    may start with a settings file or name one with --config (`with_config_file`).

    As in the original recipe, flash attention implies --bf16, and full fine-tuning on GPUs runs under DeepSpeed
    ZeRO-2 unless --deepspeed is given (--deepspeed none: plain DDP); so the model flags are read first.
    """
    argv = with_config_file(sys.argv[1:] if argv is None else list(argv),
                            (ModelArguments, data_class, RecipeTrainingArguments))
    try:
        model_args, data_args, training_args = _parse(data_class, argv, defaults)
    except ValueError as error:  # a __post_init__ check of any group: the user's flags, said in one line
        raise BadValue(str(error).strip()) from error
    check_lora_values_used(argv, model_args)
    check_output_dir(training_args.output_dir)
    resumed = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    training_args.resume_from_checkpoint = resumed  # `last` resolved once, here, before anything loads
    check_not_a_source(training_args.output_dir, model_args.model_name_or_path, resumed)
    if resumed:
        check_resume_setup(resumed, model_args)
    return model_args, data_args, training_args


def check_lora_values_used(argv: list[str], model_args: ModelArguments) -> None:
    """Refuse LoRA values given without LoRA, looked for in the command line (with the settings file's flags): their
    defaults hide whether they were given (ModelArguments refuses the other LoRA flags itself)."""
    given = {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    ignored = [f"--{name}" for name in ("lora_rank", "lora_alpha", "lora_alpha_ratio", "lora_dropout")
               if name in given]
    if ignored and not model_args.use_lora:
        raise BadValue(f"{', '.join(ignored)} need(s) --use_lora (or --use_qlora)")


def check_output_dir(output_dir: str) -> None:
    """Refuse an --output_dir that cannot be written, before anything is loaded (it is created later, on save)."""
    path = Path(output_dir).absolute()
    if path.exists() and not path.is_dir():
        raise BadValue(f"--output_dir {output_dir} is an existing file, not a folder: pass a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BadValue(f"--output_dir {output_dir}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadValue(f"--output_dir {output_dir}: {existing} is not writable (read-only or another user's); pass "
                       "a folder you can write to")


def check_not_a_source(output_dir: str, base: str, resumed: str | None) -> None:
    """Refuse an --output_dir that is, or is inside, the model the run starts from (--model_name_or_path, or a
    resumed adapter's base): saving would write over the base checkpoint's own files. Paths compared resolved."""
    sources = {f"--model_name_or_path {base}": base}
    if resumed:
        adapter_base = recorded(Path(resumed) / "adapter_config.json").get("base_model_name_or_path")
        sources[f"{resumed}/adapter_config.json names {adapter_base} as its base"] = adapter_base
    out = Path(output_dir).resolve()
    for what, source in sources.items():
        if isinstance(source, str) and Path(source).is_dir():
            folder = Path(source).resolve()
            if out == folder or folder in out.parents:
                raise BadValue(f"--output_dir {output_dir} is {'' if out == folder else 'inside '}the base model "
                               f"folder ({what}): the run would write {'over' if out == folder else 'into'} the "
                               "checkpoint it starts from; pass a folder outside it")


class RecipeParser(OneLineErrors, HfArgumentParser):
    """HfArgumentParser whose command-line errors are one line, and whose --help shows the settings file."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.add_argument_group("settings file").add_argument(
            "--config", metavar="FILE", action=AbbreviatedConfig, default=argparse.SUPPRESS,
            help="Settings from a YAML or JSON file, named as the flags without the dashes (YAML: one "
                 "`learning_rate: 1.0e-4` a line, a list for several values; JSON: {\"learning_rate\": 1e-4, "
                 "\"use_lora\": true}); also as the first argument: script.py run.yaml [flags]. Flags given on "
                 "the command line win over the file's.")


class AbbreviatedConfig(argparse.Action):
    """--config is taken out of the command line before parsing (split_config_file), so the parser meets it only
    abbreviated (--conf FILE), which argparse would accept and the file then be ignored: refused."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("write --config in full: an abbreviation of it is not read as a settings file")


def _parse(data_class: type, argv: list[str], defaults: dict):
    parser = RecipeParser((ModelArguments, data_class, RecipeTrainingArguments))
    parser.set_defaults(**defaults)
    if not {"-h", "--help"} & set(argv):  # the model-only pre-parse would answer --help with its flags alone
        model_args, _ = RecipeParser(ModelArguments).parse_args_into_dataclasses(args=argv,
                                                                                 return_remaining_strings=True)
        if model_args.attn_implementation == "flash_attention_2":
            parser.set_defaults(bf16=True)
        if model_args.tuning_mode in ("full", "frozen_vision") and torch.cuda.is_available() and \
                is_deepspeed_available():
            parser.set_defaults(deepspeed=str(DS_CONFIGS / "zero2.json"))
    model_args, data_args, training_args, extra = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if extra:
        raise unknown_arguments(extra, parser, "flags start with --, and a settings file (first argument or "
                                f"--config) ends in {', '.join(CONFIG_SUFFIXES)}")
    training_args.run_record = run_record(data_class, argv, model_args, data_args)
    return model_args, data_args, training_args


def run_record(data_class: type, argv: list[str], model_args: ModelArguments, data_args) -> dict:
    """What the model card says about a run: base model, mode, data flags given, and the command line."""
    module = data_class.__module__
    script = Path(sys.argv[0]).name if module == "__main__" else f"{module.replace('.', '/')}.py"
    data = {f.name: getattr(data_args, f.name) for f in dataclasses.fields(data_args)
            if f.init and getattr(data_args, f.name) != f.default}
    return {"base_model": model_args.model_name_or_path, "mode": model_args.tuning_mode,
            "frozen": sorted(model_args.frozen_parts), "data": data, "command": shlex.join(["python", script, *argv])}


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def with_config_file(argv: list[str], groups: tuple[type, ...]) -> list[str]:
    """`script.py run.yaml [flags]` or `script.py --config run.yaml [flags]` (as transformers' examples and TRL):
    the file's settings become flags placed before the command line's, so flags given on the command line win."""
    path, argv = split_config_file(argv)
    if path is None:
        return argv
    return config_flags(read_config(path), path, groups) + argv


def split_config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """(settings file, the other arguments): the file is the first argument (.yaml, .yml or .json) or --config's."""
    argv = list(argv)
    path = None
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
        path = argv.pop(0)
    flags = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    if len(flags) + (path is not None) > 1:
        raise UserError("give one config file (as the first argument or with --config), not two")
    if flags:
        i, arg = flags[0], argv[flags[0]]
        path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
        if not path:
            raise UserError("--config needs a file: --config run.yaml")
        del argv[i: i + (1 if "=" in arg else 2)]
    return path, argv


def read_config(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path}: no such file")
    text = file.read_text()
    try:
        settings = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError
        raise UserError(f"config file {path} could not be read: {str(error).splitlines()[0]}") from None
    if not isinstance(settings, dict | None):  # None: an empty file
        raise UserError(f"config file {path} must hold a mapping of flag names to values, "
                        f"got {type(settings).__name__}")
    return settings or {}


def config_flags(settings: dict, path: str, groups: tuple[type, ...]) -> list[str]:
    """{name: value} -> ["--name", "value", ...]: booleans as true/false, lists as several values, null left out.
    Names are the flags' (a leading "--" and dashes accepted); unknown names are an error listing them."""
    known = {f.name for group in groups for f in dataclasses.fields(group) if f.init}
    flags, unknown = [], []
    for key, value in settings.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name not in known:
            unknown.append(str(key))
            continue
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        flags += [f"--{name}", *(json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool)
                                 else str(v) for v in values)]
    if unknown:
        raise UserError(f"config file {path}: unknown setting(s) {', '.join(unknown)} (names are the flags of "
                        "--help, without the dashes)")
    return flags
