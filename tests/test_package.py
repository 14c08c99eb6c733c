"""The package installs with pip and its commands run; every package the code imports is declared."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def declared(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def imported_top_level(paths: list[Path]) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_imported_package_is_declared():
    project = PYPROJECT["project"]
    modules = PYPROJECT["tool"]["setuptools"]["py-modules"]
    code = [*sorted((REPO / "phi3v").rglob("*.py")), *(REPO / f"{m}.py" for m in modules)]
    local = {"phi3v", *modules}
    third_party = {name for name in imported_top_level(code) - local if name not in sys.stdlib_module_names}
    distributions = importlib.metadata.packages_distributions()
    needed = {distributions[name][0].lower().replace("_", "-") for name in third_party}
    everything = declared(project["dependencies"]) | {
        name for extra in project["optional-dependencies"].values() for name in declared(extra)}
    assert needed <= everything, needed - everything
    requirements = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert everything - {"phi3v-finetune"} <= declared([r for r in requirements if r])  # make install has them all


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_gives_working_commands(tmp_path):
    """`pip install .` of a copy of the package files (nothing written into the checkout), into a venv that sees
    this environment's packages (pip and setuptools included) through a .pth file and installs nothing else
    (--no-deps, no index); then the commands run from elsewhere, where the checkout is not importable."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", *(f"{m}.py" for m in PYPROJECT["tool"]["setuptools"]["py-modules"])):
        shutil.copy(REPO / name, source / name)
    for folder in ("phi3v", "ds_configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "shared_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                              "--quiet", str(source)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]

    def run(*command):
        return subprocess.run([str(venv / "bin" / command[0]), *command[1:]], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})

    result = run("phi3v-train", "--task", "docvqa", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--full_train", "--freeze_llm", "--lora_target_modules", "--batch_size"):
        assert flag in result.stdout, flag
    assert run("phi3v-train", "--help").stdout.startswith("usage: phi3v-train --task")
    wrong = run("phi3v-train", "--task", "nope")
    assert wrong.returncode == 2 and "error: --task must be one of docvqa, nlvr2, hateful_memes, ucf101" in \
        wrong.stderr
    for command in ("phi3v-predict", "phi3v-export", "phi3v-convert-ucf101"):
        assert (venv / "bin" / command).is_file(), command
    where = run("python", "-c", "import phi3v_cli, predict, convert_ucf101, phi3v.export, finetune_hf_trainer_ucf101; "
                "from phi3v.train.arguments import DS_CONFIGS; print(phi3v_cli.__file__, predict.__file__); "
                "print(DS_CONFIGS / 'zero2.json')")
    assert where.returncode == 0, where.stderr[-3000:]
    paths = where.stdout.split()
    assert all(path.startswith(site) for path in paths), paths  # the installed copies, with their ds_configs
    assert Path(paths[-1]).is_file()


@pytest.mark.parametrize("command,argv", [("train", ["--task", "ucf101", "--help"]), ("predict", ["--help"]),
                                          ("export", ["--help"]), ("convert_ucf101", ["--help"])])
def test_the_commands_answer_help(command, argv, capsys):
    import phi3v_cli as cli

    with pytest.raises(SystemExit) as exit_:
        getattr(cli, command)(argv)
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def test_train_without_a_task_says_which_exist(capsys):
    import phi3v_cli as cli

    with pytest.raises(SystemExit) as exit_:
        cli.train(["--use_lora"])
    assert exit_.value.code == 2
    assert "error: --task must be one of docvqa, nlvr2, hateful_memes, ucf101" in capsys.readouterr().err
