"""Shipped DeepSpeed/FSDP configs are data: they load, and every value the Trainer owns is "auto"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CONFIGS = sorted(Path("ds_configs").glob("zero*.json"))
TRAINER_OWNED = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping"]


def test_the_expected_configs_exist():
    assert [p.name for p in CONFIGS] == ["zero2.json", "zero3.json", "zero3_offload.json"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_trainer_owned_values_are_auto(path):
    config = json.loads(path.read_text())
    for key in TRAINER_OWNED:
        assert config[key] == "auto", key
    assert config["fp16"]["enabled"] == "auto" and config["bf16"]["enabled"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config  # the Trainer's AdamW and linear schedule


def test_zero2_keeps_the_original_settings():
    zero = json.loads(Path("ds_configs/zero2.json").read_text())["zero_optimization"]
    assert zero == {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8, "overlap_comm": True,
                    "reduce_scatter": True, "reduce_bucket_size": 5e8, "contiguous_gradients": True,
                    "round_robin_gradients": True}


def test_zero3_variants():
    zero3 = json.loads(Path("ds_configs/zero3.json").read_text())["zero_optimization"]
    offload = json.loads(Path("ds_configs/zero3_offload.json").read_text())["zero_optimization"]
    assert zero3["stage"] == offload["stage"] == 3
    assert zero3["stage3_gather_16bit_weights_on_model_save"]  # save_model writes full weights, not shards
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"


def test_deepspeed_accepts_them(tmp_path):
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfTrainerDeepSpeedConfig

    for path in CONFIGS:
        config = HfTrainerDeepSpeedConfig(str(path))
        assert config.is_zero3() == ("zero3" in path.name)


def test_fsdp_example_names_our_layer_classes():
    text = Path("ds_configs/fsdp.yaml").read_text()
    assert "Phi3DecoderLayer,CLIPEncoderLayer" in text
    config = json.loads(Path("ds_configs/fsdp_config.json").read_text())
    assert config["transformer_layer_cls_to_wrap"] == ["Phi3DecoderLayer", "CLIPEncoderLayer"]
