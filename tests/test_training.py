"""Trainer pieces: length grouping, checkpoint completeness, resume resolution, non-finite loss handling."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import finetune_hf_trainer_ucf101 as ucf101
from phi3v.train.checkpoints import COMPLETE_MARKER, is_complete, mark_complete, resolve_checkpoint
from phi3v.train.sampler import LengthGroupedSampler
from phi3v.train.trainer import NonFiniteError
from tests.conftest import ucf_args


def test_sampler_is_a_deterministic_permutation_per_epoch():
    lengths = [random.Random(i).randint(100, 3000) for i in range(500)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(500))
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=3)) == first  # same seed and epoch: same order
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_sampler_groups_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(1000, 3000) for _ in range(2000)]
    order = list(LengthGroupedSampler(lengths, batch_size=8, seed=0))
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded / sum(lengths) - 1 < 0.05
    first = batches[0]
    assert max(lengths[i] for i in first) == max(lengths[i] for i in order[:400])  # longest first: OOM shows early


def test_sampler_keeps_nearly_equal_lengths_shuffled():
    # answers of different token counts (a class name's length) must not sort the data into single-class batches
    lengths = [700 + (i % 5) for i in range(400)]
    order = list(LengthGroupedSampler(lengths, batch_size=8, seed=0))
    batch_classes = [len({i % 5 for i in order[b:b + 8]}) for b in range(0, 400, 8)]
    assert sum(batch_classes) / len(batch_classes) > 3


def make_checkpoint(root, step, files=None):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name, content in (files or {"model.safetensors": b"x" * 100, "trainer_state.json": b"{}"}).items():
        (folder / name).write_bytes(content)
    return folder


def test_checkpoint_completeness(tmp_path):
    folder = make_checkpoint(tmp_path, 10)
    assert not is_complete(folder)
    mark_complete(folder, 10)
    assert is_complete(folder)
    size, mtime = json.loads((folder / COMPLETE_MARKER).read_text())["files"]["model.safetensors"]
    assert size == 100 and mtime == (folder / "model.safetensors").stat().st_mtime_ns
    (folder / "model.safetensors").write_bytes(b"x" * 50)  # truncated after the fact
    assert not is_complete(folder)


def test_every_file_reaches_the_disk_before_the_marker(tmp_path, monkeypatch):
    """mark_complete must fsync each checkpoint file, and the marker itself, before the marker gets its final name:
    after a power cut a marker must never vouch for data still in the page cache."""
    import phi3v.train.checkpoints as training

    folder = make_checkpoint(tmp_path, 3)
    (folder / "sub").mkdir()
    (folder / "sub" / "optimizer.pt").write_bytes(b"y" * 5)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(training.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                          real_fsync(fd)))
    monkeypatch.setattr(training.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    mark_complete(folder, 3)
    synced = [path for kind, path in events if kind == "fsync"]
    assert events[-1] == ("replace", str(folder / COMPLETE_MARKER))
    assert [kind for kind, _ in events].count("replace") == 1
    for name in ("model.safetensors", "sub/optimizer.pt", "trainer_state.json", COMPLETE_MARKER + ".tmp"):
        assert str(folder / name) in synced, name


def test_resolve_last_skips_changed_and_unreadable_checkpoints(tmp_path, caplog):
    for step in (5, 10):
        mark_complete(make_checkpoint(tmp_path, step), step)
    damaged = make_checkpoint(tmp_path, 15)
    mark_complete(damaged, 15)
    (damaged / "model.safetensors").write_bytes(b"y" * 100)  # same size, rewritten: not what was marked
    make_checkpoint(tmp_path, 20, {"notes.txt": b"?"})  # foreign and unreadable
    assert resolve_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-10")
    assert f"ignoring {damaged}: its files changed" in caplog.text
    assert "checkpoint-20: not written by this recipe and not a readable checkpoint" in caplog.text
    with pytest.raises(ValueError, match="checkpoint-15 is not a complete checkpoint"):
        resolve_checkpoint(str(damaged), tmp_path)
    with pytest.raises(ValueError, match="checkpoint-20 is not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "checkpoint-20"), tmp_path)
    assert resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint("last", tmp_path / "empty")


def test_nan_loss_stops_with_step_samples_and_last_checkpoint(tiny_dir, ucf_data, tmp_path, monkeypatch):
    import phi3v.models.phi3_v.modeling

    calls = {"n": 0}
    real = phi3v.models.phi3_v.modeling.supervised_lm_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss  # the 5th micro-batch: step 3, first half

    monkeypatch.setattr(phi3v.models.phi3_v.modeling, "supervised_lm_loss", poisoned)
    out = tmp_path / "out"
    args = ucf_args(tiny_dir, ucf_data, out, "--max_steps", "4", "--save_steps", "1", "--no_eval_before_training",
                    "--train_sampling_strategy", "sequential")
    with pytest.raises(NonFiniteError) as error:
        ucf101.main(args)
    message = str(error.value)
    assert message.startswith("non-finite loss nan at step 3 (samples ['train-0000000008', 'train-0000000009'])")
    assert f"Last good checkpoint: {out / 'checkpoint-2'}." in message
    assert "--skip_nonfinite_steps" in message


def test_nan_loss_can_be_skipped(tiny_dir, ucf_data, tmp_path, monkeypatch, caplog):
    import phi3v.models.phi3_v.modeling

    calls = {"n": 0}
    real = phi3v.models.phi3_v.modeling.supervised_lm_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("inf") if calls["n"] == 3 else loss

    monkeypatch.setattr(phi3v.models.phi3_v.modeling, "supervised_lm_loss", poisoned)
    out = tmp_path / "out"
    ucf101.main(ucf_args(tiny_dir, ucf_data, out, "--max_steps", "3", "--no_eval_before_training",
                         "--no_eval_after_training", "--skip_nonfinite_steps"))
    assert "skipping non-finite loss inf at step 2" in caplog.text and "(1 skipped so far)" in caplog.text
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 3 and all(loss == loss and loss < 1e30 for loss in losses)  # finite throughout


def poisoned_gradients(monkeypatch, bad_call: int):
    """lm_head's gradient becomes NaN in the `bad_call`-th backward pass (loss stays finite)."""
    real = ucf101.load_model

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        calls = {"n": 0}

        def poison(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == bad_call else grad

        model.lm_head.weight.register_hook(poison)
        return model

    monkeypatch.setattr(ucf101, "load_model", load)


def test_nan_gradient_stops_the_run(tiny_dir, ucf_data, tmp_path, monkeypatch):
    poisoned_gradients(monkeypatch, bad_call=3)  # step 2, first micro-batch
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient norm nan at step 2 \(samples \["):
        ucf101.main(ucf_args(tiny_dir, ucf_data, tmp_path / "out", "--max_steps", "3", "--no_eval_before_training"))


def test_nan_gradient_step_can_be_skipped(tiny_dir, ucf_data, tmp_path, monkeypatch, caplog):
    poisoned_gradients(monkeypatch, bad_call=3)
    out = tmp_path / "out"
    ucf101.main(ucf_args(tiny_dir, ucf_data, out, "--max_steps", "3", "--no_eval_before_training",
                         "--no_eval_after_training", "--skip_nonfinite_steps"))
    assert "skipping non-finite gradient norm nan at step 2" in caplog.text
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())
