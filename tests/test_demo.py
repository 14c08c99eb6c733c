"""The README's first command: the embedded demo learns (accuracy clearly above chance) on CPU."""

from __future__ import annotations

import json

import pytest

import demo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_demo_learns(tmp_path):
    summary = demo.main(["--out_dir", str(tmp_path / "demo")])
    assert summary["accuracy_before"] <= 0.2
    assert summary["accuracy_after"] >= 0.6 and summary["test_accuracy"] >= 0.6  # chance: 0.1
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text()) == summary
    assert (tmp_path / "demo" / "run" / "training_curves.png").exists()
