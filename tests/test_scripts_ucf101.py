"""finetune_hf_trainer_ucf101.py end to end on a tiny converted video set: modes, outputs, resume, README commands."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import finetune_hf_trainer_ucf101 as ucf101
from phi3v.common.errors import BadValue
from tests.conftest import ucf_args


def losses(output_dir) -> dict[int, float]:
    final = output_dir / "trainer_state.json"
    newest = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    state = json.loads((final if final.exists() else newest[-1]).read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.mark.parametrize("mode", [["--use_lora"], []])
def test_trains_and_writes_results(mode, tiny_dir, ucf_data, tmp_path):
    out = tmp_path / "out"
    metrics = ucf101.main(ucf_args(tiny_dir, ucf_data, out, "--max_steps", "2", *mode))
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_before_accuracy", "eval_after_accuracy", "test_accuracy", "train_loss"):
        assert key in results, key
    assert results["eval_after_accuracy"] == metrics["eval_after_accuracy"]
    after = json.loads((out / "eval_after.json").read_text())
    assert after["metrics"]["eval_after_accuracy"] == results["eval_after_accuracy"]
    assert len(after["predictions"]) == 3 and {"id", "prediction", "reference"} <= set(after["predictions"][0])
    assert (out / "preprocessor_config.json").exists() and (out / "tokenizer.json").exists()
    assert (out / ("adapter_config.json" if mode else "model.safetensors")).exists()
    assert (out / "training_curves.png").exists()
    assert (out / "checkpoint-2" / "checkpoint_complete.json").exists()
    # the checkpoint records its mode; resumed in the other one, it is refused before loading, naming the flags
    record = json.loads((out / "checkpoint-2" / "run_info.json").read_text())
    assert (record["mode"], record["frozen"]) == ("lora" if mode else "full", [])
    with pytest.raises(BadValue) as refused:
        ucf101.main(ucf_args(tiny_dir, ucf_data, out, "--max_steps", "4", *([] if mode else ["--use_lora"]),
                             "--resume_from_checkpoint", "last"))
    assert str(refused.value) == f"--resume_from_checkpoint {out / 'checkpoint-2'} was written in " + (
        "lora mode, this run is full mode: resume it with --use_lora" if mode else
        "full mode, this run is lora mode: resume it with no --use_lora, --use_qlora or --freeze_* flag")


def test_every_lora_flag_reaches_the_trained_adapter(tiny_dir, ucf_data, tmp_path):
    """Each LoRA flag, set away from its default, read back from the adapter_config.json the run wrote. The expected
    targets are worked out by hand from the tiny model (2 decoder layers; CLIP's layer 1 is after the feature layer,
    so unused): the names given, minus the exclusion."""
    out = tmp_path / "out"
    ucf101.main(ucf_args(tiny_dir, ucf_data, out, "--max_steps", "1", "--no_eval_before_training",
                         "--no_eval_after_training", "--use_lora", "--lora_rank", "4", "--lora_alpha_ratio", "3",
                         "--lora_dropout", "0.25", "--lora_target_modules", "qkv_proj", "o_proj", "fc1",
                         "--lora_exclude_modules", "layers.1.self_attn.o_proj", "--lora_modules_to_save",
                         "img_projection", "--use_dora", "--use_rslora"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 12, 0.25)
    assert (config["use_dora"], config["use_rslora"]) == (True, True)
    assert sorted(config["target_modules"]) == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj",
        "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1"]
    assert config["modules_to_save"] == ["model.vision_embed_tokens.img_projection"]


def test_resume_gives_the_same_losses(tiny_dir, ucf_data, tmp_path, monkeypatch):
    from phi3v.train.trainer import Phi3VTrainer

    common = ["--max_steps", "6", "--save_steps", "3", "--no_eval_before_training", "--no_eval_after_training",
              "--seed", "7"]
    ucf101.main(ucf_args(tiny_dir, ucf_data, tmp_path / "whole", *common))
    reference = losses(tmp_path / "whole")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    class Interrupted(Exception):
        pass

    save = Phi3VTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 3:
            raise Interrupted

    monkeypatch.setattr(Phi3VTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        ucf101.main(ucf_args(tiny_dir, ucf_data, tmp_path / "split", *common))
    monkeypatch.setattr(Phi3VTrainer, "_save_checkpoint", save)
    ucf101.main(ucf_args(tiny_dir, ucf_data, tmp_path / "split", *common, "--resume_from_checkpoint", "last"))
    resumed = losses(tmp_path / "split")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == pytest.approx(reference, abs=1e-6)
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # and so are the final weights


def test_resume_into_a_finished_run_is_refused(tiny_dir, ucf_data, tmp_path):
    args = ucf_args(tiny_dir, ucf_data, tmp_path, "--max_steps", "2", "--no_eval_before_training",
                    "--no_eval_after_training")
    ucf101.main(args)
    with pytest.raises(ValueError, match="that run is finished and there is nothing to resume"):
        ucf101.main(args + ["--resume_from_checkpoint", "last"])


ORIGINAL_README_COMMANDS = [  # the ucf101 recipe's commands, as the original README gives them (torchrun part dropped)
    "--data_dir /path/to/converted_ucf101",
]


@pytest.mark.parametrize("command", ORIGINAL_README_COMMANDS)
def test_original_readme_commands_parse(command):
    from phi3v.train.parsing import parse_args

    model_args, data_args, training_args = parse_args(ucf101.DataArguments, command.split(), num_crops=4)
    assert data_args.data_dir == "/path/to/converted_ucf101"
    assert model_args.num_crops == 4 and model_args.tuning_mode == "full"
    assert training_args.batch_size == 16 and training_args.learning_rate == 4e-5


def test_convert_readme_command_parses():
    import convert_ucf101

    with pytest.raises(SystemExit) as exit_info:
        convert_ucf101.main(["--help"])
    assert exit_info.value.code == 0
