"""Multi-process training on CPU: torchrun DDP, DeepSpeed ZeRO-2 and ZeRO-3 (gloo), on the tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ucf_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "finetune_hf_trainer_ucf101.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.parametrize("launch", [
    ["--deepspeed", "none"],  # DDP (gloo on CPU), with find_unused_parameters=False
    ["--deepspeed", "ds_configs/zero2.json"],
    ["--deepspeed", "ds_configs/zero3.json"],
], ids=["ddp", "zero2", "zero3"])
def test_two_processes(launch, tiny_dir, ucf_data, tmp_path):
    out = tmp_path / "out"
    result = torchrun(ucf_args(tiny_dir, ucf_data, out, "--max_steps", "3", "--save_steps", "2", *launch))
    results = json.loads((out / "all_results.json").read_text())
    assert {"train_loss", "eval_before_accuracy", "eval_after_accuracy", "test_accuracy"} <= set(results)
    assert results["eval_after_samples"] == 3  # every prompt evaluated once across the two ranks
    assert "1 process(es)" not in result.stdout  # the summary reports 2 processes
    assert "x 2 process(es) x 1 accumulation" in result.stdout  # batch 4 = 2 per GPU x 2 processes
    assert (out / "checkpoint-2" / "checkpoint_complete.json").exists()
    assert (out / "model.safetensors").exists()


def test_ddp_lora_with_text_only_batches(tiny_dir, ucf_data, tmp_path):
    """A rank whose batch has no image still touches the vision LoRA weights (no DDP unused-parameter error)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(ucf_data / "images")
    lines = (ucf_data / "ucf101_train.jsonl").read_text().splitlines()
    text_only = [json.dumps({"id": f"t{i}", "conversations": [{"user": "Say yes.", "assistant": "yes"}]})
                 for i in range(len(lines))]
    (data / "ucf101_train.jsonl").write_text("\n".join(text_only[:4] + lines) + "\n")
    for split in ("val", "test"):
        (data / f"ucf101_{split}.jsonl").write_text((ucf_data / f"ucf101_{split}.jsonl").read_text())
    torchrun(ucf_args(tiny_dir, data, tmp_path / "out", "--max_steps", "3", "--use_lora", "--deepspeed", "none",
                      "--train_sampling_strategy", "sequential", "--no_eval_before_training"))
