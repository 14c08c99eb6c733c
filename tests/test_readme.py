"""Every command shown in the README parses with our scripts (or is run by CI: make targets), and its Python example
runs against a tiny checkpoint."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PLACEHOLDERS = {"<output_dir>": "out", "<lr>": "1e-5", "<epochs>": "2", "<num_nodes>": "1"}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    found = []
    for block in code_blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        found += [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return found


def script_and_args(command: str) -> tuple[str, list[str]]:
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    words = shlex.split(command)
    while words and "=" in words[0] and not words[0].startswith("-"):
        words = words[1:]  # VAR=value prefixes
    if words[:2] == ["python", "-m"]:
        return words[2], words[3:]
    for i, word in enumerate(words):
        if word.endswith(".py"):
            return word, words[i + 1:]  # after `python` or `torchrun <launcher flags>`
    return words[0], words[1:]


def test_the_readme_starts_with_the_two_commands():
    assert code_blocks("bash")[0] == "make demo\nmake test\n"


def checkpoint_to_resume(folder: Path) -> None:
    """`--resume_from_checkpoint last` is resolved when the flags are checked: a full-mode checkpoint to find."""
    (folder / "output" / "checkpoint-1").mkdir(parents=True)
    (folder / "output" / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (folder / "output" / "checkpoint-1" / "model.safetensors").write_text("")


@pytest.mark.parametrize("command", commands())
def test_readme_command(command, tmp_path, monkeypatch):
    program, args = script_and_args(command)
    if "--resume_from_checkpoint" in args:
        monkeypatch.chdir(tmp_path)
        checkpoint_to_resume(tmp_path)
    if program == "make":
        makefile = (REPO / "Makefile").read_text()
        assert all(re.search(rf"^{target}:", makefile, flags=re.M) for target in args), command
    elif program == "pip":
        for i, word in enumerate(args):
            if word == "-r":
                assert (REPO / args[i + 1]).is_file(), command
    elif program == "vllm":  # not installed here: the serving command of the official layout (tests/test_serving.py)
        assert args[:2] == ["serve", "output/merged"] and "--trust-remote-code" in args, command
    elif program.startswith("finetune_hf_trainer_"):
        script = importlib.import_module(program.removesuffix(".py"))
        model_args, data_args, training_args = script.parse_args(script.DataArguments, args)
        assert training_args.output_dir
    elif program == "phi3v-train":  # the installed command: --task picks the script
        from phi3v_cli import task_and_rest

        task, rest = task_and_rest(args)
        script = importlib.import_module(f"finetune_hf_trainer_{task}")
        assert script.parse_args(script.DataArguments, rest)[2].output_dir
    elif program.endswith(".py") or program.startswith("phi3v."):
        name = program.removesuffix(".py").replace("/", ".")
        package = importlib.util.find_spec(name).submodule_search_locations is not None
        module = importlib.import_module(name + ".__main__" if package else name)  # python -m phi3v.data
        module.build_parser().parse_args(args)
    else:
        pytest.fail(f"README command not covered by this test: {command}")


def test_readme_python_example_runs(tiny_dir, tmp_path):
    from tests.conftest import make_image

    (example,) = code_blocks("python")
    make_image(640, 480).save(tmp_path / "photo.jpg")
    code = example.replace('"microsoft/Phi-3.5-vision-instruct"', repr(str(tiny_dir)))
    code = code.replace('"photo.jpg"', repr(str(tmp_path / "photo.jpg")))
    (tmp_path / "example.py").write_text(code)
    result = subprocess.run([sys.executable, str(tmp_path / "example.py")], capture_output=True, text=True,
                            cwd=REPO, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": ""},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_readme_data_examples_are_valid_for_our_readers(tmp_path):
    from phi3v.data.formats import READERS, detect_format, read_records

    examples = code_blocks("json")
    assert len(examples) >= 4  # ours, LLaVA, messages, a video record
    formats = []
    for number, example in enumerate(examples):
        path = tmp_path / f"example{number}.{'json' if example.startswith('[') else 'jsonl'}"
        path.write_text(example)
        records, problems = read_records(path)
        assert problems == [] and len(records) == 1, example
        formats.append(detect_format(path))
        conversation = READERS[formats[-1]](records[0], image_root=tmp_path, num_frames=2)
        assert conversation.turns and all(isinstance(t.assistant, str) for t in conversation.turns), example
    assert {"ours", "llava", "messages"} <= set(formats)


def test_the_knob_recipes_parse():
    """Every flag combination of the README's table of VLM recipes is accepted as written."""
    import finetune_hf_trainer_docvqa as docvqa

    table = README.split("| recipe | flags |")[1].split("\n\n")[0]
    combinations = [shlex.split(code) for row in table.splitlines()[2:]
                    for code in re.findall(r"`([^`]+)`", row.split(" | ")[-1])]
    assert len(combinations) == 11
    for argv in combinations:
        model_args, _, training_args = docvqa.parse_args(docvqa.DataArguments, argv)
        assert training_args.output_dir, argv
