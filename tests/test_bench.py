"""The benchmarks' core functions on tiny shapes: same results between variants, crop and padding arithmetic, FLOP
counting, the memory measurement itself, and gpu_train's --dry_run end to end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import common

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- common


def test_time_alternating_flips_the_order_every_round():
    calls = []
    samples = common.time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                      repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3}


def test_markdown_table_and_ratio():
    assert common.markdown_table(["x", "y"], [[1, "2"]]) == "| x | y |\n|---|---|\n| 1 | 2 |"
    assert common.ratio(10, 4) == "2.5x" and common.ratio(1, 0) == "inf"


def allocate_64_mib():
    """A step that keeps 64 MiB alive at its peak (the setup for the peak_memory test, run in a fresh process)."""

    def step():
        block = torch.ones(16 * 2**20)  # 16 Mi float32, written so every page is resident
        return float(block[-1])

    return step


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak-RSS reset)")
def test_peak_memory_sees_what_a_step_allocates():
    growth = common.peak_memory("tests.test_bench:allocate_64_mib", {}) / 2**20
    assert 63 <= growth <= 72  # 64 MiB plus at most a few MiB of one-off allocations


# ------------------------------------------------------------------------------------------------- lm_head_loss

TINY_LM = dict(positions=40, supervised=3, hidden_size=16, vocab_size=50)


@pytest.mark.parametrize("trainable_head", [True, False])
def test_lm_head_variants_give_the_same_loss_and_gradients(trainable_head):
    from bench.lm_head_loss import check_same, make_steps

    steps = make_steps(**TINY_LM, trainable_head=trainable_head)
    results = {name: step() for name, step in steps.items()}
    diffs = check_same(results)
    assert diffs["max_abs_diff_loss"] < 1e-6
    assert (results["ours"][2] is None) == (not trainable_head)


def test_lm_head_check_catches_a_wrong_loss():
    from bench.lm_head_loss import check_same, make_steps

    results = {name: step() for name, step in make_steps(**TINY_LM).items()}
    loss, hidden_grad, weight_grad = results["ours"]
    results["ours"] = (loss * 1.01, hidden_grad, weight_grad)
    with pytest.raises(AssertionError):
        check_same(results)


def test_lm_head_run_and_report():
    from bench.lm_head_loss import report, run

    shape = {**TINY_LM, "dtype": "float32", "device": "cpu"}
    cases = run(shape, repeats=1, measure_memory=False)
    assert [case["trainable_head"] for case in cases] == [True, False]
    assert all(set(case["median_seconds"]) == {"ours", "full logits"} for case in cases)
    assert "speed-up" in report(cases, shape)


# ------------------------------------------------------------------------------------------------- decoder_layer

# head_dim 96 as in Phi-3, so the official LongRoPE factors fit; otherwise small
TINY_LAYER = dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256)


def test_decoder_layer_sdpa_and_eager_agree():
    from bench.decoder_layer import check_same, make_steps

    steps = make_steps(24, **TINY_LAYER)
    diffs = check_same({name: step() for name, step in steps.items()})
    assert diffs["max_abs_diff_output"] < 1e-5


def test_decoder_layer_masks_are_what_phi3model_builds():
    from bench.decoder_layer import build, causal_mask

    _, config, hidden, position_ids, _, _ = build(8, **TINY_LAYER)
    config._attn_implementation = "sdpa"
    assert causal_mask(config, hidden, position_ids) is None  # SDPA runs is_causal=True
    config._attn_implementation = "eager"
    mask = causal_mask(config, hidden, position_ids)
    assert mask.shape == (1, 1, 8, 8) and mask[0, 0, 0, 1] < -1e30 and mask[0, 0, 1, 0] == 0


def test_decoder_layer_check_catches_non_causal_attention(monkeypatch):
    import bench.decoder_layer as decoder_layer

    monkeypatch.setattr(decoder_layer, "causal_mask", lambda *args: None)  # eager without a mask sees the future
    steps = decoder_layer.make_steps(24, **TINY_LAYER)
    with pytest.raises(AssertionError):
        decoder_layer.check_same({name: step() for name, step in steps.items()})


# ------------------------------------------------------------------------------------------------- clip_crops


@pytest.mark.parametrize("width, height, num_crops, expected", [
    (1700, 2200, 16, (17, 17)),  # US letter: 4x4, nothing saved
    (1654, 2339, 16, (13, 17)),  # A4: 4x3
    (640, 480, 16, (13, 17)),  # 4:3 photo: 3x4
    (1920, 1080, 16, (16, 17)),  # 16:9 frame: 3x5
    (640, 480, 4, (5, 5)),
    (6000, 2000, 4, (4, 5)),  # 3:1 panorama: 1x3
])
def test_crops_per_image(width, height, num_crops, expected):
    from bench.clip_crops import crops_per_image

    assert crops_per_image(width, height, num_crops) == expected


def test_clip_crops_summary_and_report():
    from bench.clip_crops import category_summary, report, run

    summary = category_summary([("a", 1700, 2200), ("b", 1654, 2339)], 16)
    assert summary["ours"] == 15 and summary["official"] == 17 and summary["saved_crops"] == 2
    result = run(per_crop=0.5)
    text = report(result)
    assert "documents" in text and "0.50 s per crop" in text
    assert result["summary"]["documents@16"]["saving"] > 1


# ------------------------------------------------------------------------------------------------- padding


def test_padded_share_by_hand():
    from bench.padding import padded_share

    lengths = [10, 8, 6, 6]
    assert padded_share(lengths, [0, 1, 2, 3], 2) == pytest.approx(1 - 30 / 32)  # [10, 8] -> 20, [6, 6] -> 12
    assert padded_share(lengths, [0, 2, 1, 3], 2) == pytest.approx(1 - 30 / 36)  # [10, 6] -> 20, [8, 6] -> 16
    assert padded_share(lengths, [3, 2, 1, 0], 1) == 0


def test_length_grouping_pads_less_on_docvqa_like_lengths():
    from bench.padding import compare, docvqa_like_lengths

    lengths = docvqa_like_lengths(num_pages=400)
    assert 2300 < sum(lengths) / len(lengths) < 2550  # near the published mean of 2,443
    rows = {row["batch_size"]: row for row in compare(lengths, batch_sizes=(1, 8))}
    assert rows[1]["random"] == rows[1]["grouped"] == 0
    assert rows[8]["grouped"] < min(rows[8]["random"], 0.05)


# ------------------------------------------------------------------------------------------------- processor


def test_processor_measurement_on_small_pages(processor):
    from bench.processor_throughput import document_page, jpeg_bytes, measure

    page = jpeg_bytes(document_page(400, 520))
    seconds = measure(processor, [page], num_images=2)
    assert set(seconds) == {"decode", "image processor", "dataset item"}
    assert all(value > 0 for value in seconds.values())


def test_processor_speedup_compares_with_the_reference_and_asserts_equal_outputs(rng_image, monkeypatch):
    import bench.processor_throughput as bench_module
    from bench.processor_throughput import compare

    images = {"portrait": rng_image(300, 700), "landscape": rng_image(500, 210, seed=1)}
    rows = compare(images, crop_counts=(2, 5), repeats=1)
    assert [(row["image"], row["num_crops"]) for row in rows] == [
        ("portrait", 2), ("landscape", 2), ("portrait", 5), ("landscape", 5)]
    assert all(row["reference_s"] > 0 and row["package_s"] > 0 for row in rows)
    # a reference that differs in one value must stop the benchmark
    original = bench_module.reference_image_processor

    def off_by_one_bit(images, num_crops):
        out = original(images, num_crops)
        out["pixel_values"].view(-1)[7] = torch.nextafter(out["pixel_values"].view(-1)[7], torch.tensor(9.0))
        return out

    monkeypatch.setattr(bench_module, "reference_image_processor", off_by_one_bit)
    with pytest.raises(AssertionError):
        compare({"portrait": images["portrait"]}, crop_counts=(2,), repeats=1)


# ------------------------------------------------------------------------------------------------- generation


def test_generation_bench_times_both_variants_on_the_same_tokens(tiny_model):
    from bench.generation import measure

    row = measure(tiny_model, batch_size=1, new_tokens=3, repeats=1, device="cpu")
    assert row["batch_size"] == 1 and row["speedup"] > 0 and row["decode_speedup"] > 0
    for variant in ("previous", "package"):
        assert 0 < row[variant]["prefill_s"] < row[variant]["seconds"]
        assert row[variant]["tokens_per_s"] > 0 and row[variant]["decode_ms_per_token"] > 0


# ------------------------------------------------------------------------------------------------- gpu_train


def test_gpu_train_batch_has_the_processor_layout():
    from bench.gpu_train import make_batch
    from phi3v.models.phi3_v.image_processing import num_image_tokens
    from phi3v.models.phi3_v.tiny import tiny_config

    batch = make_batch(tiny_config(), 2, (1200, 2040), 2443, 10, 16, "cpu")
    assert batch["input_ids"].shape == (2, 2443)
    assert int((batch["input_ids"][0] == -1).sum()) == num_image_tokens(1200, 2040, 16) == 2377
    assert int((batch["labels"][:, 1:] != -100).sum()) == 2 * 10
    assert batch["image_sizes"].tolist() == [[5 * 336, 3 * 336]] * 2
    assert batch["pixel_values"][:, 16:].abs().sum() == 0 and batch["pixel_values"][:, 15].abs().sum() > 0


def test_gpu_train_flops_follow_the_stated_rules():
    from bench.gpu_train import CLIP_TOKENS, make_batch, training_flops
    from phi3v.models.phi3_v.modeling import Phi3VForCausalLM
    from phi3v.models.phi3_v.tiny import tiny_config

    config = tiny_config()
    model = Phi3VForCausalLM(config)
    batch = make_batch(config, 1, (1200, 2040), 2443, 10, 16, "cpu")
    h, i, layers, tokens = config.hidden_size, config.intermediate_size, config.num_hidden_layers, 2443
    linear = layers * (h * 3 * h + h * h + h * 2 * i + i * h)  # qkv, o, gate_up, down (no GQA in the tiny config)
    attention = 2 * tokens**2 * h * layers
    full = training_flops(model, batch, 16)
    assert full["decoder"] == 6 * linear * tokens + 3 * attention  # 6 x parameters x tokens, attention 3x forward
    assert full["lm_head"] == 6 * h * config.vocab_size * 10  # only at the supervised positions

    model.model.vision_embed_tokens.requires_grad_(False)  # frozen vision: forward only
    frozen = training_flops(model, batch, 16)
    assert frozen["clip"] == pytest.approx(full["clip"] / 3)
    assert frozen["projector"] == pytest.approx(full["projector"] / 3)
    vision = config.vision_config
    clip_linear = 4 * vision.hidden_size**2 + 2 * vision.hidden_size * vision.intermediate_size
    used = model.model.vision_embed_tokens.num_layers_used
    assert frozen["clip"] == 2 * clip_linear * used * 16 * CLIP_TOKENS + 4 * CLIP_TOKENS**2 * vision.hidden_size \
        * used * 16

    model.requires_grad_(False)  # a frozen decoder weight costs 4x, not 6x
    assert training_flops(model, batch, 16)["decoder"] == 4 * linear * tokens + 3 * attention


def test_gpu_train_one_configuration_on_cpu(tmp_path):
    from bench.gpu_train import build_random_checkpoint, parse_args, run_configuration

    checkpoint = build_random_checkpoint(tmp_path / "random", dry_run=True)
    args = parse_args(["--dry_run"])
    result = run_configuration(checkpoint, "lora", True, args, str(tmp_path / "out"))
    assert "error" not in result and result["images_per_second"] > 0
    assert 0 < result["trainable_parameters"] < result["total_parameters"]
    assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_train_dry_run_end_to_end(tmp_path):
    out = tmp_path / "gpu_train.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_train.py"), "--dry_run", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]["configurations"]
    assert [(r["mode"], r["checkpointing"]) for r in results] == [
        (mode, on) for mode in ("full", "frozen_vision", "lora", "qlora") for on in (True, False)]
    assert all("error" not in r and r["images_per_second"] > 0 for r in results)
    assert "| qlora | off |" in done.stdout


# ------------------------------------------------------------------------------------------------- run_all


def test_run_all_summary_collects_the_tables(tmp_path):
    from bench.run_all import record, summary

    environment = {**common.environment(), "date": "2026-01-01 00:00:00"}
    (tmp_path / "padding.json").write_text(json.dumps({"markdown": "| a |\n|---|\n| 1 |", "environment": environment}))
    record(tmp_path, [{"name": "decoder_layer", "command": "python bench/decoder_layer.py", "seconds": 1.0,
                       "ok": False}])
    runs = record(tmp_path, [{"name": "padding", "command": "python bench/padding.py", "seconds": 2.0, "ok": True}])
    assert [run["name"] for run in runs] == ["padding", "decoder_layer"]  # merged, in the benchmarks' order
    text = summary(runs, tmp_path)
    assert "## padding" in text and "| 1 |" in text and "**failed**" in text
    assert "`python bench/padding.py` (2 s, 2026-01-01 00:00:00)" in text


def test_gpu_train_peaks_are_the_datasheets_dense_bf16():
    from bench.gpu_train import peak_tflops

    # NVIDIA datasheets, dense bf16 (half the "with sparsity" figure): H200 NVL 1,671/2, H200 SXM 1,979/2
    assert peak_tflops(None, "NVIDIA H200 NVL") == 835.5
    assert peak_tflops(None, "NVIDIA H200") == 989.5
    assert peak_tflops(None, "NVIDIA H100 80GB HBM3") == 989.5
    assert peak_tflops(None, "NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops(123.0, "NVIDIA H200 NVL") == 123.0


def test_gpu_train_uses_the_recipes_optimizer_and_weights(tmp_path, monkeypatch):
    from bench.gpu_train import build_random_checkpoint, parse_args, run_configuration

    created = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: created.append(kw) or adamw(params, **kw))
    checkpoint = build_random_checkpoint(tmp_path / "random", dry_run=True)
    result = run_configuration(checkpoint, "full", True, parse_args(["--dry_run"]), str(tmp_path / "out"))
    assert "error" not in result and result["weights_dtype"] == "float32"  # fp32 master weights, as the recipes
    assert created == [{"lr": 4e-5, "betas": (0.9, 0.95), "eps": 1e-7, "weight_decay": 0.01}]  # original recipe


# ------------------------------------------------------------------------------------------------- phi4_speedups


def test_phi4_speedups_quick_parts_and_report():
    from bench.phi4_speedups import QUICK_IMAGES, part_a, part_b, part_c, report

    a = part_a(tokens=32, repeats=1, memory=False)
    b = part_b(1, QUICK_IMAGES)
    c = part_c(num_samples=200, timed_samples=8, batch_size=4, repeats=1, max_crops=2)
    assert a["check"]["max_abs_diff_loss"] < 1e-5 and a["logits_bytes"] == 32 * 200064 * 4
    assert b["crops_encoded"] == {"ours": 5, "native": 6}  # 2 + 3 real crops; the small image padded to 3
    assert b["check"]["max_abs_diff_features"] == 0
    assert c["padded_share"]["grouped"] < c["padded_share"]["random"]
    text = report(a, b, c)
    assert text.count("native / ours") == 2 and "random / grouped" in text and "Same summed loss" in text


def test_phi4_real_crop_check_catches_a_dropped_crop(monkeypatch):
    import bench.phi4_speedups as bench_module
    from phi3v.models.phi4_mm import modeling

    original = modeling.real_crops

    def one_crop_short(image_sizes, crops, crop_size):  # forgets each image's last tile
        real = original(image_sizes, crops, crop_size)
        last = real.sum(1) - 1
        real[torch.arange(len(real)), last] = False
        return real

    monkeypatch.setattr(modeling, "real_crops", one_crop_short)
    with pytest.raises(AssertionError):
        bench_module.part_b(1, bench_module.QUICK_IMAGES)


def test_check_full_size_phi4_meta_stage(capsys):
    from bench.check_full_size import stage_phi4_meta

    stage_phi4_meta()
    assert "1536 tensors (1535 saved, lm_head tied)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_phi4_dry_run():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry_run", "--only", "phi4"],
                          capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "phi4 lora (tiny, sdpa) | works" in done.stdout and "phi4 qlora (tiny, sdpa), merged in" in done.stdout
