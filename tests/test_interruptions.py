"""A run killed with SIGKILL while writing a checkpoint resumes from the last complete one and ends where an
uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_hf_trainer_ucf101 as ucf101
from tests.conftest import ucf_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[1]

KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import finetune_hf_trainer_ucf101 as ucf101
from phi3v.train.trainer import Phi3VTrainer

save_optimizer = Phi3VTrainer._save_optimizer_and_scheduler

def killed_midway(self, output_dir):
    if self.state.global_step == 4:  # the model weights of checkpoint-4 are on disk, the optimizer is not
        os.kill(os.getpid(), signal.SIGKILL)
    return save_optimizer(self, output_dir)

Phi3VTrainer._save_optimizer_and_scheduler = killed_midway
ucf101.main(sys.argv[1:])
"""


def test_sigkill_while_saving_then_resume_last(tiny_dir, ucf_data, tmp_path, caplog):
    common = ["--max_steps", "6", "--save_steps", "2", "--no_eval_before_training", "--no_eval_after_training",
              "--seed", "3"]
    ucf101.main(ucf_args(tiny_dir, ucf_data, tmp_path / "whole", *common))

    out = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(script), *ucf_args(tiny_dir, ucf_data, out, *common)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert (out / ".saving" / "checkpoint-4" / "model.safetensors").exists()  # half written, staged ...
    assert not (out / "checkpoint-4").exists()  # ... so no checkpoint-4 to mistake for a whole one
    assert (out / "checkpoint-2" / "checkpoint_complete.json").exists()

    ucf101.main(ucf_args(tiny_dir, ucf_data, out, *common, "--resume_from_checkpoint", "last"))
    assert f"resuming from {out / 'checkpoint-2'}: step 2 of 6" in caplog.text
    assert f"removing {out / '.saving' / 'checkpoint-4'}: left incomplete by an interrupted save" in caplog.text
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)
