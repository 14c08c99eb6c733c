"""Untrusted files: no remote code, no pickled weights, no paths or archives that escape their folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from phi3v import Phi3VForCausalLM

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for p in REPO.rglob("*.py")
           if not any(part.startswith(".venv") for part in p.parts) and "tests" not in p.parts]  # .venv-compat too


def test_pickled_weights_are_refused(tiny_dir, tmp_path):
    for name in ("config.json", "generation_config.json"):
        (tmp_path / name).write_text((tiny_dir / name).read_text())
    torch.save({"lm_head.weight": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"holds pickle weights \(\*\.bin\) only"):
        Phi3VForCausalLM.from_pretrained(tmp_path)


DANGEROUS = [r"trust_remote_code\s*=\s*True", r"torch\.load\(", r"import pickle|pickle\.load", r"(?<![.\w])eval\(",
             r"(?<![.\w])exec\(", r"extractall\((?![^)]*filter=)"]


@pytest.mark.parametrize("pattern", DANGEROUS)
def test_no_dangerous_calls_in_the_code(pattern):
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES
                 for n, line in enumerate(p.read_text().splitlines(), start=1) if re.search(pattern, line)]
    assert offenders == []
