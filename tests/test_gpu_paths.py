"""Fixes for the CUDA paths that can be reached on CPU: per-row LongRoPE, evaluation precision and batch size,
fp32 master weights, distributed evaluation settings (issue 10). bench/gpu_check.py covers what needs a GPU."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from phi3v import Phi3VForCausalLM
from phi3v.models.phi3_v.tiny import tiny_config

SWITCH = 48  # original_max_position_embeddings of the small-switch model: prompts of a few dozen tokens cross it


@pytest.fixture(scope="module")
def switch_model():
    torch.manual_seed(0)
    # weights 10x the usual init: attention sharp enough that the RoPE factors visibly move the logits
    config = tiny_config(original_max_position_embeddings=SWITCH, max_position_embeddings=SWITCH * 32,
                         initializer_range=0.2)
    return Phi3VForCausalLM(config).eval()


def test_rotary_factors_are_chosen_per_row(switch_model):
    """cos/sin of each row follow the spec's LongRoPE formula (6.2) with the factors of that row's own length."""
    rotary = switch_model.model.rotary_emb
    rope = switch_model.config.to_dict()["rope_scaling"]
    head_dim = switch_model.config.hidden_size // switch_model.config.num_attention_heads
    scale = math.sqrt(1 + math.log(32) / math.log(SWITCH))
    short_row = torch.cat([torch.zeros(20, dtype=torch.long), torch.arange(40)])  # left padding, 40 tokens
    long_row = torch.arange(60)  # 60 tokens > 48
    positions = torch.stack([short_row, long_row])
    cos, sin = rotary(torch.zeros(2, 60, head_dim), positions)
    for row, factors in ((0, rope["short_factor"]), (1, rope["long_factor"])):
        inv = 1.0 / (np.array(factors) * 10000.0 ** (np.arange(0, head_dim, 2) / head_dim))
        angles = positions[row].numpy()[:, None] * inv[None]
        expected = np.concatenate([angles, angles], -1)
        np.testing.assert_allclose(cos[row].numpy(), np.cos(expected) * scale, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sin[row].numpy(), np.sin(expected) * scale, rtol=1e-5, atol=1e-5)


def greedy(model, rows: list[list[int]], steps: int, use_cache: bool = True):
    """Left-padded greedy generation of `steps` tokens: (tokens, first-to-last step scores) per row."""
    width = max(map(len, rows))
    ids = torch.tensor([[32000] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=32000,
                             use_cache=use_cache)
    scores = torch.stack(out.scores, 1)  # (B, steps, vocab)
    return out.sequences[:, width:], scores


def test_a_sample_does_not_depend_on_its_batch_mates_across_the_rope_switch(switch_model):
    """A batch straddling the switch: one row crosses it while generating, one starts past it, one never reaches
    it. Each row's scores equal those of the row generated alone, and those equal generation without a cache, where
    every step recomputes all keys with the factors of the current length (what the official cache reset is for)."""
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 900, (n,), generator=generator).tolist() for n in (40, 56, 20)]
    steps = 12  # row 0 passes 48 tokens at its 9th new token
    tokens, scores = greedy(switch_model, rows, steps)
    for i, row in enumerate(rows):
        alone_tokens, alone_scores = greedy(switch_model, [row], steps)
        assert torch.equal(tokens[i], alone_tokens[0]), i
        torch.testing.assert_close(scores[i], alone_scores[0], atol=2e-4, rtol=1e-4)
        no_cache_tokens, no_cache_scores = greedy(switch_model, [row], steps, use_cache=False)
        assert torch.equal(alone_tokens, no_cache_tokens), i
        torch.testing.assert_close(alone_scores, no_cache_scores, atol=2e-4, rtol=1e-4)


def test_a_training_row_does_not_depend_on_its_batch_mates_across_the_rope_switch(switch_model):
    """Right-padded training batch with a 40-token row and a 60-token row: the short row's loss is its loss alone."""
    generator = torch.Generator().manual_seed(2)
    short, long = (torch.randint(3, 900, (n,), generator=generator) for n in (40, 60))
    ids = torch.stack([torch.cat([short, torch.full((20,), 32000)]), long])
    mask = torch.stack([torch.cat([torch.ones(40), torch.zeros(20)]), torch.ones(60)]).long()
    labels = ids.clone()
    labels[0, 40:] = -100
    labels[1] = -100  # only the short row counts
    with torch.no_grad():
        batched = switch_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        alone = switch_model(input_ids=short[None], attention_mask=torch.ones(1, 40).long(), labels=short[None]).loss
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- evaluation


def test_kv_cache_size_by_hand():
    from phi3v import Phi3VConfig
    from phi3v.eval.generation import eval_batch_size, kv_cache_bytes_per_token

    official = Phi3VConfig.official()
    assert kv_cache_bytes_per_token(official, torch.bfloat16) == 2 * 32 * 32 * 96 * 2 == 393_216
    assert kv_cache_bytes_per_token(official, torch.float32) == 786_432
    # 10 GiB / (393,216 B x (2,500 + 64) tokens = 1,008,205,824 B) = 10.65 -> 10 DocVQA prompts
    assert eval_batch_size(official, 2500, 64, torch.bfloat16, 10 * 2**30) == 10
    assert eval_batch_size(official, 2500, 64, torch.float32, 10 * 2**30) == 5
    assert eval_batch_size(official, 100_000, 64, torch.bfloat16, 10 * 2**30) == 1  # never 0
    assert eval_batch_size(official, 10, 1, torch.bfloat16, 10 * 2**30) == 64  # capped


@pytest.fixture(scope="module")
def eval_set(processor, ucf_data):
    from phi3v.data.jsonl import jsonl_dataset

    return jsonl_dataset(ucf_data / "ucf101_val.jsonl", ucf_data / "images", processor, for_generation=True)


def record_generation(model):
    """Wrap model.generate to record (batch size, dtype of the decoder's qkv output) per call."""
    seen, dtypes = [], []
    hook = model.model.layers[0].self_attn.qkv_proj.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    generate = model.generate

    def recording(**inputs):
        seen.append(inputs["input_ids"].shape[0])
        return generate(**inputs)

    model.generate = recording
    return seen, dtypes, hook


def test_generation_runs_under_autocast_in_the_given_precision(tiny_dir, eval_set):
    from phi3v.eval.generation import generate_predictions

    model = Phi3VForCausalLM.from_pretrained(tiny_dir).eval()
    for dtype, expected in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
        seen, dtypes, hook = record_generation(model)
        predictions = generate_predictions(model, eval_set, batch_size=2, max_new_tokens=3, autocast_dtype=dtype)
        hook.remove()
        assert len(predictions) == 3 and seen == [2, 1]
        assert set(dtypes) == {expected}  # keys/values (and so the KV cache) in that dtype
    assert next(model.parameters()).dtype == torch.float32  # the weights stay fp32 master weights


def make_trainer(tiny_dir, eval_set, tmp_path, eval_batch_size=None, **args):
    from phi3v.train.trainer import Phi3VTrainer
    from phi3v.train.training_arguments import RecipeTrainingArguments

    model = Phi3VForCausalLM.from_pretrained(tiny_dir)
    training_args = RecipeTrainingArguments(output_dir=str(tmp_path), report_to="none", disable_tqdm=True,
                                            dataloader_num_workers=0, batch_size=1, **args)
    return Phi3VTrainer(model=model, args=training_args, eval_dataset=eval_set, max_new_tokens=4,
                        eval_batch_size=eval_batch_size, task_metric=lambda predictions: {"n": len(predictions)})


def test_trainer_evaluates_in_bf16_with_the_batch_the_kv_budget_allows(tiny_dir, eval_set, tmp_path):
    from phi3v.eval.generation import prompt_lengths

    longest = max(prompt_lengths(eval_set))
    per_token = 2 * 2 * 4 * 16 * 2  # bf16 K+V of the tiny model: 2 layers x 4 kv heads x head dim 16 x 2 bytes
    budget_gb = 2.5 * per_token * (longest + 4) / 2**30  # room for 2.5 prompts -> batches of 2
    trainer = make_trainer(tiny_dir, eval_set, tmp_path, bf16=True, eval_kv_cache_gb=budget_gb)
    seen, dtypes, hook = record_generation(trainer.model)
    metrics = trainer.evaluate(metric_key_prefix="eval_before")
    assert metrics["eval_before_n"] == 3 and seen == [2, 1] and set(dtypes) == {torch.bfloat16}
    trainer = make_trainer(tiny_dir, eval_set, tmp_path, eval_batch_size=3, eval_kv_cache_gb=budget_gb)
    seen, dtypes, hook = record_generation(trainer.model)
    trainer.evaluate()
    assert seen == [3] and set(dtypes) == {torch.float32}  # the override wins; fp32 training, fp32 evaluation


# ------------------------------------------------------------------------------------------------- master weights


def parse_flags(tiny_dir, tmp_path, *flags):
    from transformers import HfArgumentParser

    from phi3v.train.arguments import ModelArguments
    from phi3v.train.training_arguments import RecipeTrainingArguments

    return HfArgumentParser((ModelArguments, RecipeTrainingArguments)).parse_args_into_dataclasses(
        args=["--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path), *flags])


@pytest.mark.parametrize("flags, expected", [
    (["--attn_implementation", "flash_attention_2", "--deepspeed", "none"], torch.float32),  # full FT, DDP/FSDP
    (["--attn_implementation", "flash_attention_2", "--freeze_vision_model"], torch.float32),
    (["--attn_implementation", "flash_attention_2", "--deepspeed", "zero2"], torch.bfloat16),
    (["--attn_implementation", "flash_attention_2", "--use_lora"], torch.bfloat16),  # frozen base, fp32 adapters
    (["--torch_dtype", "bfloat16", "--use_lora"], torch.bfloat16),
    (["--torch_dtype", "float32"], torch.float32),
])
def test_full_fine_tuning_without_deepspeed_keeps_fp32_master_weights(tiny_dir, tmp_path, flags, expected):
    from phi3v.train.loading import model_dtype

    deepspeed = "--deepspeed" in flags and flags[flags.index("--deepspeed") + 1] == "zero2"
    if deepspeed:  # set after parsing: parsing a DeepSpeed run would set up torch.distributed in this process
        flags = flags[:flags.index("--deepspeed")]
    model_args, training_args = parse_flags(tiny_dir, tmp_path, "--bf16", *flags)
    training_args.deepspeed = "ds_configs/zero2.json" if deepspeed else training_args.deepspeed
    assert model_dtype(model_args, training_args) == expected


def test_half_precision_weights_for_full_fine_tuning_without_deepspeed_are_refused(tiny_dir, tmp_path):
    from phi3v.common.errors import UserError
    from phi3v.train.loading import load_model

    model_args, training_args = parse_flags(tiny_dir, tmp_path, "--bf16", "--torch_dtype", "bfloat16")
    with pytest.raises(UserError, match="loses small updates"):
        load_model(model_args, training_args)


# ------------------------------------------------------------------------------------------------- distributed


def test_weights_go_to_this_gpu_except_under_fsdp_and_zero3(tiny_dir, tmp_path):
    from phi3v.train.loading import weights_device_map

    _, ddp = parse_flags(tiny_dir, tmp_path, "--deepspeed", "none")
    _, fsdp = parse_flags(tiny_dir, tmp_path, "--deepspeed", "none", "--fsdp", "full_shard auto_wrap",
                          "--fsdp_config", "ds_configs/fsdp_config.json")
    assert weights_device_map(False, ddp, cuda=True, zero3=False) == {"": 0}
    assert weights_device_map(False, fsdp, cuda=True, zero3=False) is None
    assert weights_device_map(False, ddp, cuda=True, zero3=True) is None
    assert weights_device_map(True, fsdp, cuda=True, zero3=False) == {"": 0}  # bitsandbytes quantizes on the GPU
    assert weights_device_map(False, ddp, cuda=False, zero3=False) is None


def test_deepspeed_without_a_launcher_gets_a_single_process_group():
    from phi3v.train.training_arguments import single_process_launch_env

    env = single_process_launch_env({})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536
    assert single_process_launch_env({"RANK": "1", "WORLD_SIZE": "2"}) == {}  # a launcher's values are kept


def test_repeated_and_multi_line_warnings_print_one_line_each():
    code = (
        "import warnings\n"
        "from phi3v.train.reporting import one_line_warnings\n"
        "one_line_warnings()\n"
        "def deprecated():\n"
        "    warnings.warn('torch.distributed.foo is deprecated\\n  use bar\\n  see docs', FutureWarning)\n"
        "for _ in range(5):\n"
        "    deprecated()\n"
        "    warnings.warn('torch.distributed.foo is deprecated\\n  use bar\\n  see docs', FutureWarning)\n"
        "    warnings.warn('no gradient', UserWarning)\n"
        "    warnings.warn('unclosed file', ResourceWarning)\n"  # hidden by default: stays hidden
        "    with warnings.catch_warnings():\n"  # torch and DeepSpeed enter these every step; 'once' resets there
        "        pass\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400,
                            env={**os.environ, "PYTHONWARNINGS": ""})
    ours = ("foo", "bar", "gradient", "unclosed")
    lines = [line for line in result.stderr.splitlines() if any(word in line for word in ours)]
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("FutureWarning: torch.distributed.foo is deprecated (")
    assert lines[1].startswith("UserWarning: no gradient (")


def test_a_deepspeed_compile_is_announced_once_and_only_when_not_built(monkeypatch, caplog):
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder.builder import OpBuilder

    from phi3v.train import reporting

    reporting.announce_deepspeed_compiles()
    compiled = []
    monkeypatch.setattr(reporting, "_jit_load", lambda builder, verbose: compiled.append(builder.name) or "module")
    builder = type("Builder", (), {"name": "cpu_adam"})()
    for built in (False, True):
        monkeypatch.setattr(reporting, "extension_is_built", lambda name, built=built: built)
        caplog.clear()
        with caplog.at_level("INFO", logger="phi3v"):
            assert OpBuilder.jit_load(builder) == "module"
        notices = [r.message for r in caplog.records if "compiling" in r.message]
        assert notices == ([] if built else [notices[0]]) and (built or "cpu_adam extension" in notices[0])
    assert compiled == ["cpu_adam", "cpu_adam"]


# ------------------------------------------------------------------------------------------------- bench/gpu_check.py


def test_gpu_check_plans_every_mode_precision_and_attention():
    from bench.gpu_check import recipe_checks

    checks = {c["name"]: c for c in recipe_checks(dry_run=False, flash=True)}
    matrix = [f"{m} {p} {a}" for m in ("full", "frozen_vision", "lora", "qlora") for p in ("bf16", "fp16")
              for a in ("sdpa", "flash_attention_2")]
    assert list(checks) == matrix + ["ZeRO-2, no launcher", "ZeRO-3, no launcher", "5 steps, eval before/after"]
    assert "--fp16" in checks["qlora fp16 flash_attention_2"]["flags"]
    assert checks["full bf16 sdpa"]["flags"][-2:] == ["--deepspeed", "none"]  # fp32 master weights, no DeepSpeed
    assert "eval_before_accuracy" in checks["5 steps, eval before/after"]["expect"]
    assert len(recipe_checks(dry_run=False, flash=False)) == 8 + 3  # no flash-attn: sdpa only


def test_gpu_check_fails_when_any_check_fails(monkeypatch, tmp_path, capsys):
    import bench.gpu_check as gpu_check

    monkeypatch.setattr(gpu_check, "build_checkpoint", lambda directory, dry_run: directory)
    monkeypatch.setattr(gpu_check, "run_recipe_check", lambda check, *args: {
        "name": check["name"], "ok": check["name"] != "lora bf16 sdpa", "error": "CUDA error: boom"})
    assert gpu_check.main(["--dry_run", "--skip_gpu_train", "--skip_phi4", "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "2 of 3 checks work" in out and "| lora bf16 sdpa | error: CUDA error: boom |" in out


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The one-shot GPU script end to end on CPU: recipes in their own processes (DeepSpeed ZeRO-2 with plain python,
    no launcher), the 5-step run with evaluation before and after, gpu_train's table."""
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry_run", "--skip_phi4", "--json",
                             str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]["checks"]}
    assert {"lora bf16 sdpa", "ZeRO-2, no launcher", "5 steps, eval before/after",
            "gpu_train full (tiny, sdpa)", "gpu_train lora (tiny, sdpa)"} == set(rows)
    assert all(r["ok"] and r["images_per_second"] > 0 for r in rows.values())


@pytest.mark.slow
def test_fsdp2_on_cpu_wraps_trains_generates_in_step_and_saves_the_official_layout(tiny_dir, ucf_data, tmp_path):
    """torch's FSDP2 under torchrun with gloo (accelerate runs --fsdp as DDP on CPU; see tests/fsdp2_cpu.py)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "tests/fsdp2_cpu.py", str(tiny_dir), str(ucf_data), str(tmp_path / "fsdp2.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "fsdp2.json").read_text())
    assert report["wrapped"] == ["CLIPEncoderLayer"] * 2 + ["Phi3DecoderLayer"] * 2  # every layer of both towers
    assert report["sharded"] == "DTensor" and math.isfinite(report["loss"])
    assert report["generated_steps"] == [3, 7] and report["predictions"] == 3  # ranks in step, no hang
    assert report["state_dict_keys_match"] and report["state_dict_values_match"]
