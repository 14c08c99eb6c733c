"""Answer `--help` and mistyped flags in a fraction of a second, before a script's slow imports.

A recipe's parser is built from `transformers.TrainingArguments`, whose import pulls in torch, peft and
bitsandbytes: about 5 s before argparse can say a word. So whenever a script builds its real parser it also
writes a *flag index* (every option's strings, nargs, choices, default and help, as JSON) to
~/.cache/phi3v/flags. The next run of the same code (same script, same phi3v package, same transformers and
Python versions) rebuilds a plain argparse parser from that index as its first step, before its imports, and:
  - prints `--help` (the same text as the real parser) and exits;
  - refuses unknown flags and stray arguments in one line (with "did you mean"), as the real parse would;
  - refuses a value argparse would refuse (a bad choice, an int or float that is not one), with argparse's message.
Errors are one line (`OneLineErrors`), on the real parsers too, so both paths say the same.
A valid command line goes on to the real parser, which checks everything again. With no usable index (first run,
changed code, unwritable cache) nothing is answered early: the index is only ever a shortcut. Standard library only.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

from phi3v.common.errors import UserError, run_main

ACTIONS = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
           argparse._StoreFalseAction: "store_false", argparse._StoreConstAction: "store_const",
           argparse._AppendAction: "append", argparse._CountAction: "count", argparse._HelpAction: "help"}
TYPES = {int: "int", float: "float"}  # the value checks worth making early; other types are checked by the real parse
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def cache_dir() -> Path:
    """$PHI3V_CACHE_DIR/flags, else ~/.cache/phi3v/flags (or under $XDG_CACHE_HOME)."""
    root = os.environ.get("PHI3V_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phi3v"
    return Path(root) / "flags"


def index_path(script: str | os.PathLike) -> Path:
    """Where the index of `script` lives; the name changes with anything that can change its flags."""
    key = hashlib.sha256()
    for source in [Path(script), *sorted(Path(__file__).parent.glob("*.py"))]:
        key.update(source.read_bytes())
    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = "none"
    key.update(f"{transformers} {sys.version_info[:2]}".encode())
    return cache_dir() / f"{Path(script).stem}-{key.hexdigest()[:16]}.json"


def describe(parser: argparse.ArgumentParser) -> dict | None:
    """The parser as JSON-able data, or None if it uses something the index does not reproduce."""
    if parser._mutually_exclusive_groups or parser.formatter_class.__module__ != "argparse":
        return None
    groups = []
    for group in parser._action_groups:
        actions = []
        for action in group._group_actions:
            kind = ACTIONS.get(type(action))
            if kind is None:
                return None
            actions.append({
                "action": kind, "option_strings": action.option_strings, "dest": action.dest,
                "nargs": action.nargs, "const": None if action.const is None else str(action.const),
                "default": str(action.default), "type": TYPES.get(action.type),
                "choices": None if action.choices is None else [str(choice) for choice in action.choices],
                "required": action.required, "help": action.help, "metavar": action.metavar,
            })
        groups.append({"title": group.title, "description": group.description, "actions": actions})
    return {"usage": parser.usage, "description": parser.description, "epilog": parser.epilog,
            "formatter_class": parser.formatter_class.__name__, "allow_abbrev": parser.allow_abbrev,
            "groups": groups}


def save_index(parser: argparse.ArgumentParser, script: str | os.PathLike) -> None:
    """Write the index of `script`'s parser (replacing older ones) unless it is there already: its name is the
    fingerprint of everything that shapes the parser. Any failure only means no shortcut."""
    try:
        path = index_path(script)
        description = None if path.exists() else describe(parser)
        if description is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(description))
        os.replace(temporary, path)  # atomic: torchrun's processes may all write it at once
        for old in path.parent.glob(f"{Path(script).stem}-*.json"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass


class OneLineErrors:
    """Mixin for argparse parsers: a bad command line is a UserError, one line, not the whole usage text."""

    def error(self, message: str):
        raise UserError(f"{message}; --help lists the flags")


class Parser(OneLineErrors, argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line (for the argparse scripts and the rebuilt index)."""


class Shown:
    """A default as the help text shows it. Not a str, so argparse never converts it with the option's type."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text


def rebuild(description: dict) -> argparse.ArgumentParser:
    """A plain argparse parser with the options, help text and value checks of the described one."""
    parser = Parser(usage=description["usage"], description=description["description"],
                    epilog=description["epilog"], allow_abbrev=description["allow_abbrev"],
                    formatter_class=getattr(argparse, description["formatter_class"]), add_help=False)
    groups = {group.title: group for group in parser._action_groups}
    for spec in description["groups"]:
        group = groups.get(spec["title"]) or parser.add_argument_group(spec["title"], spec["description"])
        for action in spec["actions"]:
            kwargs = {"action": action["action"], "help": action["help"]}
            if action["action"] != "help":
                kwargs["dest"] = action["dest"]
                kwargs["default"] = argparse.SUPPRESS if action["default"] == argparse.SUPPRESS \
                    else Shown(action["default"])
            if action["action"] in ("store", "append"):
                value_type = {"int": int, "float": float}.get(action["type"])
                kwargs.update(nargs=action["nargs"], type=value_type, metavar=action["metavar"])
                if action["nargs"] == "?":
                    kwargs["const"] = action["const"]
                if action["choices"] is not None:
                    kwargs["choices"] = [(value_type or str)(choice) for choice in action["choices"]]
                if isinstance(action["metavar"], list):
                    kwargs["metavar"] = tuple(action["metavar"])
            if action["action"] == "store_const":
                kwargs["const"] = action["const"]
            if action["option_strings"]:
                if action["action"] != "help":
                    kwargs["required"] = action["required"]
                group.add_argument(*action["option_strings"], **kwargs)
            else:
                kwargs.pop("dest")
                group.add_argument(action["dest"], **kwargs)
    return parser


def load_index(script: str | os.PathLike) -> argparse.ArgumentParser | None:
    path = index_path(script)
    try:
        return rebuild(json.loads(path.read_text()))
    except OSError:  # none yet (first run, changed code) or no cache folder: no shortcut
        return None
    except (ValueError, KeyError, TypeError):  # unreadable: no shortcut; removed, so that the next parse rewrites it
        path.unlink(missing_ok=True)
        return None


def unknown_arguments(extra: list[str], parser: argparse.ArgumentParser) -> UserError:
    """One line for what the parser did not take: misspelt flags (with the closest real one) or stray values."""
    options = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    flags = [arg for arg in extra if arg.startswith("-") and arg != "-"]
    if not flags:
        return UserError(f"unexpected argument{'s' if len(extra) > 1 else ''} {' '.join(extra)}: flags start with "
                         f"--, and a settings file (first argument or --config) ends in {', '.join(CONFIG_SUFFIXES)}")
    said = []
    for flag in flags:
        name = flag.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
        said.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    return UserError(f"unknown flag{'s' if len(flags) > 1 else ''} {', '.join(said)}; --help lists the flags")


def split_config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """(settings file, the other arguments): the file is the first argument (.yaml, .yml or .json) or --config's."""
    argv = list(argv)
    path = None
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
        path = argv.pop(0)
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            if path is not None:
                raise UserError("give one config file (as the first argument or with --config), not two")
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            if not path:
                raise UserError("--config needs a file: --config run.yaml")
            del argv[i: i + (1 if "=" in arg else 2)]
            break
    return path, argv


def answer_early(script: str | os.PathLike, argv: list[str]) -> None:
    """A script's first step: answer --help or a bad command line from the index and exit; else return."""
    parser = load_index(script)
    if parser is None:
        return

    # --help prints and exits; a UserError is one line and exit status 2
    run_main(lambda argv: parse_checked(parser, split_config_file(argv)[1]), argv)


def parse_checked(parser: argparse.ArgumentParser, argv: list[str] | None, script: str | os.PathLike | None = None):
    """`parser.parse_args(argv)`, but unknown arguments are a UserError (one line, with "did you mean"); with
    `script`, the script's index is written first."""
    if script is not None:
        save_index(parser, script)
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise unknown_arguments(extra, parser)
    return args
