"""Every entry point run as a real process twice in a row, with a flag given twice: both runs end the same way (a
state one run leaves behind, as a cache of the parser once did, must not change the next), the expected way, and
say nothing of bitsandbytes' missing optional CPU kernel."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_image

REPO = Path(__file__).resolve().parents[1]
NOISE = "gemm_4bit_forward"  # bitsandbytes' import-time notice about an optional CPU kernel (issue 22)


def command(entry: str) -> list[str]:
    """How a user starts it: a script, a module, or an installed console command (which exits with what it returns,
    as the wrapper pip writes does)."""
    if entry.startswith("phi3v-"):
        name = entry.removeprefix("phi3v-").replace("-", "_")
        return [sys.executable, "-c", f"import sys; from phi3v_cli import {name}; sys.exit({name}())"]
    return [sys.executable, str(REPO / entry)] if entry.endswith(".py") else [sys.executable, "-m", entry]


def run_twice(entry: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The first run, after checking that the second ended the same (stderr compared without progress bars, whose
    timings vary) and that neither printed the notice."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "100",
           "PYTHONPATH": str(REPO)}
    first, second = (subprocess.run([*command(entry), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                                    timeout=300) for _ in range(2))
    assert (second.returncode, second.stdout, without_bars(second.stderr)) == (
        first.returncode, first.stdout, without_bars(first.stderr)), second.stderr[-3000:]
    assert NOISE not in first.stderr + second.stderr
    return first


def without_bars(stderr: str) -> str:
    return re.sub(r"[^\n]*\d+it/s\]", "", stderr)


@pytest.mark.parametrize("entry", ["predict.py", pytest.param("phi3v-predict", marks=pytest.mark.slow)])
def test_predict_twice_with_two_images(entry, tiny_dir, tmp_path):
    """The run that once failed from its second time on (the flag index rebuilt --image's `append` wrongly)."""
    for name, seed in (("a.png", 0), ("b.png", 1)):
        make_image(64, 48, seed=seed).save(tmp_path / name)
    first = run_twice(entry, [str(tiny_dir), "--image", "a.png", "--image", "b.png", "--question", "Same?",
                              "--max_new_tokens", "3", "--no-stream"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.strip() and "Traceback" not in first.stderr


def test_only_the_kernel_notice_of_bitsandbytes_is_hidden(caplog):
    """The filter phi3v installs drops that one import-time message (bitsandbytes' wording, 0.50) and no other."""
    import phi3v  # noqa: F401 (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("Failed to load CPU 4-bit kernels: libbitsandbytes_cpu.so not found")
    assert [record.getMessage() for record in caplog.records] == [
        "Failed to load CPU 4-bit kernels: libbitsandbytes_cpu.so not found"]


# entry point, argv (in a fresh folder), exit status, what stdout starts with or stderr is
CASES = [
    ("finetune_hf_trainer_docvqa.py", ["--help", "--help"], 0, "usage:"),
    ("finetune_hf_trainer_nlvr2.py", ["--lora_target_modules", "qkv_proj", "--lora_target_modules", "o_proj"], 2,
     "error: --lora_target_modules need(s) --use_lora (or --use_qlora)\n"),
    ("finetune_hf_trainer_hateful_memes.py", ["--lerning_rate", "1e-4", "--lerning_rate", "2e-4"], 2,
     "error: unknown flags --lerning_rate (did you mean --learning_rate?), --lerning_rate (did you mean "
     "--learning_rate?); --help lists the flags\n"),
    ("finetune_hf_trainer_ucf101.py", ["--num_crops", "4", "--num_crops", "0"], 2,
     "error: --num_crops must be between 1 and 16, got 0\n"),
    ("predict.py", ["model", "--image", "a.png", "--image", "a.png", "--question", "q"], 2,
     "error: --image a.png: file not found\n"),
    ("demo.py", ["--seed", "1", "--seed", "2", "--help"], 0, "usage:"),
    ("phi3v.export", ["adapter", "merged", "--dtype", "float16", "--dtype", "float32"], 2,
     "error: adapter holds no LoRA adapter (adapter_config.json is missing)\n"),
    ("convert_ucf101.py", ["--src", "videos", "--out_dir", "data", "--num_frames", "2", "--num_frames", "3"], 2,
     "error: --src videos: no such file or folder\n"),
    ("phi3v-train", ["--task", "ucf101", "--num_crops", "4", "--num_crops", "0"], 2,
     "error: --num_crops must be between 1 and 16, got 0\n"),
    ("phi3v-predict", ["model", "--image", "a.png", "--image", "b.png", "--question", "q"], 2,
     "error: --image a.png: file not found\n"),
    ("phi3v-export", ["--help", "--help"], 0, "usage:"),
    ("phi3v-convert-ucf101", ["--src", "videos", "--out_dir", "data", "--src", "videos"], 2,
     "error: --src videos: no such file or folder\n"),
]


@pytest.mark.slow
@pytest.mark.parametrize("entry,argv,status,said", CASES, ids=[case[0] for case in CASES])
def test_every_entry_point_twice(entry, argv, status, said, tmp_path):
    first = run_twice(entry, argv, tmp_path)
    assert first.returncode == status, first.stderr[-3000:]
    if status == 0:
        assert first.stdout.startswith(said) and first.stderr == ""
    else:
        assert (first.stdout, first.stderr) == ("", said)
    assert list(tmp_path.iterdir()) == []  # nothing written
