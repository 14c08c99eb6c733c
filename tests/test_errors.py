"""The user-facing error handler: one line (plus the problems) and exit 2 for a UserError, a traceback otherwise,
and every entry point runs its `main` under it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v.common.errors import USER_ERROR_EXIT, BadValue, MissingFile, Unavailable, UserError, run_main

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ["finetune_hf_trainer_docvqa.py", "finetune_hf_trainer_nlvr2.py",
                "finetune_hf_trainer_hateful_memes.py", "finetune_hf_trainer_ucf101.py", "convert_ucf101.py",
                "predict.py", "demo.py", "phi3v/export.py", "phi3v/tiny.py"]


def failing(error: BaseException):
    def main(argv):
        main.argv = argv
        raise error
    return main


def test_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_main(failing(UserError("--data_dir /x: no such folder")), ["--flag", "1"])
    assert exit_info.value.code == USER_ERROR_EXIT == 2
    assert capsys.readouterr().err == "error: --data_dir /x: no such folder\n"


def test_problems_are_listed_under_the_line(capsys, monkeypatch):
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)
    with pytest.raises(SystemExit):
        run_main(failing(UserError("train: 2 problems", ["a.jsonl:3: bad", "a.jsonl:9: worse"])), [])
    assert capsys.readouterr().err == "error: train: 2 problems\n  a.jsonl:3: bad\n  a.jsonl:9: worse\n"


@pytest.mark.parametrize("error", [BadValue("v"), MissingFile("f"), Unavailable("u")])
def test_kinds_are_user_errors_and_their_builtin(error, capsys, monkeypatch):
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)
    assert isinstance(error, (ValueError, FileNotFoundError, OSError))
    with pytest.raises(SystemExit) as exit_info:
        run_main(failing(error), [])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {error}\n"


def test_internal_errors_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)
    with pytest.raises(KeyError):
        run_main(failing(KeyError("bug")), [])
    with pytest.raises(ValueError):  # a plain ValueError is a bug, not the user's input
        run_main(failing(ValueError("bug")), [])


def test_debug_flag_and_env_keep_the_traceback(monkeypatch):
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)
    main = failing(UserError("bad"))
    with pytest.raises(UserError):
        run_main(main, ["--x", "1", "--debug"])
    assert main.argv == ["--x", "1"]  # --debug never reaches the script's parser
    monkeypatch.setenv("PHI3V_DEBUG", "1")
    with pytest.raises(UserError):
        run_main(main, [])
    monkeypatch.setenv("PHI3V_DEBUG", "0")
    with pytest.raises(SystemExit):
        run_main(main, [])


def exit_status(command) -> int:
    """The status `command()` exits with; a KeyboardInterrupt let through fails the test (instead of stopping
    pytest, as a real Ctrl-C would)."""
    try:
        command()
    except SystemExit as exited:
        return exited.code
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt went through")
    pytest.fail("no exit")


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    monkeypatch.delenv("PHI3V_DEBUG", raising=False)
    assert exit_status(lambda: run_main(failing(KeyboardInterrupt()), [])) == 130
    assert capsys.readouterr().err == "interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # --debug: where it was stopped
        run_main(failing(KeyboardInterrupt()), ["--debug"])


def test_the_commands_import_their_script_under_the_handler(capsys, monkeypatch):
    """Ctrl-C while a console command imports its script (seconds: torch, transformers) is one line too."""
    import importlib

    import phi3v_cli as cli

    monkeypatch.delenv("PHI3V_DEBUG", raising=False)

    def slow_import(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", slow_import)
    for command, argv in ((cli.predict, ["out"]), (cli.export, ["a", "b"]), (cli.train, ["--task", "nlvr2"]),
                          (cli.convert_ucf101, [])):
        assert exit_status(lambda: command(argv)) == 130, command  # noqa: B023 (called at once, in the loop)
        assert capsys.readouterr().err == "interrupted\n", command


def test_success_returns_the_result(monkeypatch):
    assert run_main(lambda argv: argv, ["a"]) == ["a"]
    monkeypatch.setattr(sys, "argv", ["prog", "--y"])
    assert run_main(lambda argv: argv) == ["--y"]


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_every_entry_point_runs_main_under_the_handler(path):
    """The one `if __name__ == "__main__":` block of each entry point is exactly `run_main(main)`."""
    tree = ast.parse((ROOT / path).read_text())
    blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert [[ast.unparse(statement) for statement in block.body] for block in blocks] == [["run_main(main)"]], path


def test_a_script_from_the_command_line(tmp_path):
    """End to end through a real process: a bad flag value is one line on stderr and exit status 2."""
    result = subprocess.run([sys.executable, "convert_ucf101.py", "--src", str(tmp_path / "nowhere"), "--out_dir",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"error: --src {tmp_path / 'nowhere'}: no such file or folder\n"
    assert list(tmp_path.iterdir()) == []
