"""The one error type a user can act on, and the handler every entry point runs `main` under.

A `UserError` (a bad flag, file or dataset row) is printed as one line and exits with status 2; anything else is a
bug and keeps its traceback. Ctrl-C exits with status 130. `--debug`, or PHI3V_DEBUG=1, shows every traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import stat
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input the user can fix: the message says what and where, and what to do."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class BadValue(UserError, ValueError):
    """A flag or data value that cannot be used (also a ValueError, for callers that catch those)."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError)."""


class Unavailable(UserError, OSError):
    """A model or dataset that cannot be reached or read, e.g. offline (also an OSError)."""


USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C


def require_regular_file(path: str | os.PathLike) -> None:
    """Raise unless `path` is a regular file (as open() would for a missing file or a folder): opening a named pipe
    or a device could block forever."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a directory")
    if not stat.S_ISREG(mode):
        raise ValueError("not a regular file (a named pipe, socket or device): refused, reading it could block")


def run_main(main: Callable, argv: list[str] | None = None):
    """Call `main(argv)`; a UserError becomes one line on stderr and exit status 2, Ctrl-C `interrupted` and 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PHI3V_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        return main(argv)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None


class OneLineErrors:
    """Mixin for argparse parsers: a bad command line is a UserError, one line, not the whole usage text."""

    def error(self, message: str):
        raise UserError(f"{message}; --help lists the flags")


class Parser(OneLineErrors, argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line (the entry points that are not recipes)."""


def unknown_arguments(extra: list[str], parser: argparse.ArgumentParser, stray: str = "flags start with --"
                      ) -> UserError:
    """One line for what the parser did not take: misspelt flags (with the closest real one) or stray values."""
    options = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    flags = [arg for arg in extra if arg.startswith("-") and arg != "-"]
    if not flags:
        return UserError(f"unexpected argument{'s' if len(extra) > 1 else ''} {' '.join(extra)}: {stray}")
    said = []
    for flag in flags:
        name = flag.split("=", 1)[0]
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
        said.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    return UserError(f"unknown flag{'s' if len(flags) > 1 else ''} {', '.join(said)}; --help lists the flags")


def parse_checked(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, but unknown arguments are a UserError (one line, with "did you mean")."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise unknown_arguments(extra, parser)
    return args
