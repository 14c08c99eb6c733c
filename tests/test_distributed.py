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


def torchrun(args: list[str], timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "finetune_hf_trainer_ucf101.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
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


# ------------------------------------------------------------------------------------------------- Phi-4


@pytest.fixture(scope="module")
def phi4_merged(phi4_dir, tmp_path_factory):
    """The tiny Phi-4 with its vision-lora/ merged (`python -m phi3v.models.phi4_mm.merge_vision_lora`)."""
    from phi3v.models.phi4_mm.merge_vision_lora import main

    out = tmp_path_factory.mktemp("phi4-merged") / "merged"
    main([str(phi4_dir), str(out)])
    return out


def phi4_args(base, data, out, *extra: str) -> list[str]:
    """2 samples per step (1 per process), 2 steps, 4 training samples, no evaluation."""
    return ucf_args(base, data, out, "--batch_size", "2", "--batch_size_per_gpu", "1", "--max_steps", "2",
                    "--train_samples", "4", "--no_eval_before_training", "--no_eval_after_training", *extra)


def check_phi4_output(out, base, result, trained_key: str):
    """Finite loss, 2 processes, and the saved weights load with the native class with `trained_key` changed."""
    import math

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    results = json.loads((out / "all_results.json").read_text())
    assert math.isfinite(results["train_loss"]) and results["train_loss"] > 0
    assert "x 2 process(es) x 1 accumulation" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__module__.startswith("transformers.")
    saved = load_file(out / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    before = load_file(base / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in before.items()}  # whole, not shards
    assert not torch.equal(before[trained_key], saved[trained_key])
    return saved


PHI4_TRAINED = "model.layers.0.self_attn.o_proj.weight"


def test_phi4_ddp_full(phi4_dir, ucf_data, tmp_path):
    out = tmp_path / "out"
    result = torchrun(phi4_args(phi4_dir, ucf_data, out, "--deepspeed", "none"))
    check_phi4_output(out, phi4_dir, result, PHI4_TRAINED)


def test_phi4_ddp_lora(phi4_dir, ucf_data, tmp_path):
    import math

    import torch
    from safetensors.torch import load_file

    out = tmp_path / "out"
    result = torchrun(phi4_args(phi4_dir, ucf_data, out, "--deepspeed", "none", "--use_lora"))
    assert "x 2 process(es) x 1 accumulation" in result.stdout
    assert math.isfinite(json.loads((out / "all_results.json").read_text())["train_loss"])
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(torch.isfinite(v).all() for v in adapter.values())
    assert any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: trained


def test_phi4_zero2_full(phi4_dir, ucf_data, tmp_path):
    out = tmp_path / "out"
    result = torchrun(phi4_args(phi4_dir, ucf_data, out, "--deepspeed", "ds_configs/zero2.json"))
    check_phi4_output(out, phi4_dir, result, PHI4_TRAINED)


def test_phi4_zero3_needs_the_merged_base(phi4_dir, phi4_merged, ucf_data, tmp_path):
    refused = torchrun(phi4_args(phi4_dir, ucf_data, tmp_path / "refused", "--deepspeed", "ds_configs/zero3.json"),
                       check=False)
    assert refused.returncode != 0
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("error: ")]
    # one line per process, the same on both (run_main prints on every rank; torchrun does not merge them); no
    # worker traceback (torchrun adds its own ChildFailedError one)
    assert len(errors) == 2 and len(set(errors)) == 1, refused.stderr[-3000:]
    assert errors[0] == (f"error: {phi4_dir} has a built-in vision LoRA (vision-lora/), which cannot be merged into "
                         "quantized or ZeRO-3-partitioned weights: merge it once with `python -m "
                         f"phi3v.models.phi4_mm.merge_vision_lora {phi4_dir} MERGED_DIR` and train on MERGED_DIR")
    assert "UserError" not in refused.stderr and not (tmp_path / "refused" / "all_results.json").exists()
    out = tmp_path / "out"
    result = torchrun(phi4_args(phi4_merged, ucf_data, out, "--deepspeed", "ds_configs/zero3.json"))
    check_phi4_output(out, phi4_merged, result, PHI4_TRAINED)
