"""No checkpoint is lost or mixed: checkpoints are staged and renamed into place, foreign ones (no marker of ours)
are never deleted, a checkpoint whose files changed after it was marked is never resumed, and a failed save says
which earlier checkpoint is intact."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

import finetune_hf_trainer_ucf101 as ucf101
from phi3v.common.errors import run_main
from phi3v.train.checkpoints import (
    COMPLETE_MARKER,
    STAGING,
    clear_staging,
    is_complete,
    mark_complete,
    move_into_place,
    resolve_checkpoint,
    rotate,
)
from phi3v.train.trainer import Phi3VTrainer
from tests.conftest import ucf_args


def checkpoint(root, step, marked=True, content=b"w"):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(content * 64)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marked:
        mark_complete(folder, step)
    return folder


def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_foreign_checkpoint_is_renamed_aside_never_deleted(tmp_path):
    foreign = checkpoint(tmp_path, 4, marked=False, content=b"f")
    staged = checkpoint(tmp_path / STAGING, 4, content=b"n")
    move_into_place(staged, tmp_path / "checkpoint-4")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("kept-checkpoint-4-")]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").read_bytes() == b"f" * 64
    assert (foreign / "model.safetensors").read_bytes() == b"n" * 64 and is_complete(foreign)


def test_our_checkpoint_is_replaced_whole(tmp_path):
    target = checkpoint(tmp_path, 4, content=b"o")
    (target / "optimizer.pt").write_bytes(b"old optimizer")
    move_into_place(checkpoint(tmp_path / STAGING, 4, content=b"n"), target)
    assert not (target / "optimizer.pt").exists()  # nothing of the old one mixes into the new one
    assert (target / "model.safetensors").read_bytes() == b"n" * 64 and is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [STAGING, "checkpoint-4"]  # STAGING: the test's own


def test_rotation_and_cleanup_touch_only_ours(tmp_path):
    foreign = [checkpoint(tmp_path, step, marked=False) for step in (1, 2)]
    ours = [checkpoint(tmp_path, step) for step in (3, 4, 5)]
    debris = tmp_path / STAGING / "checkpoint-6"
    debris.mkdir(parents=True)
    rotate(tmp_path, 1)
    clear_staging(tmp_path)
    assert all(p.is_dir() for p in foreign) and [p.is_dir() for p in ours] == [False, False, True]
    assert not (tmp_path / STAGING).exists()


def test_a_rewritten_file_of_the_same_size_is_never_resumed(tmp_path):
    first, second = checkpoint(tmp_path, 2), checkpoint(tmp_path, 4)
    (second / "model.safetensors").write_bytes(b"z" * 64)  # new weights over old optimizer/RNG state
    assert json.loads((second / COMPLETE_MARKER).read_text())["files"]["model.safetensors"][0] == 64
    assert resolve_checkpoint("last", tmp_path) == str(first)
    with pytest.raises(ValueError, match="its files differ from checkpoint_complete.json"):
        resolve_checkpoint(str(second), tmp_path)


def test_a_readable_foreign_checkpoint_can_be_resumed(tmp_path):
    checkpoint(tmp_path, 2)
    foreign = checkpoint(tmp_path, 8, marked=False)
    assert resolve_checkpoint("last", tmp_path) == str(foreign)


@pytest.mark.slow
def test_runs_keep_foreign_checkpoints_and_never_mix_a_crashed_save(tiny_dir, ucf_data, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "out"
    far = checkpoint(out, 50, marked=False, content=b"s")  # the stock Trainer's, from another run
    before = tree(far)
    common = ["--max_steps", "2", "--save_steps", "1", "--save_total_limit", "1", "--no_eval_before_training",
              "--no_eval_after_training"]
    ucf101.main(ucf_args(tiny_dir, ucf_data, out, *common))
    assert tree(far) == before and is_complete(out / "checkpoint-2") and not (out / "checkpoint-1").exists()
    first = tree(out / "checkpoint-2")

    # a second run from scratch crashes while saving step 2, after its new weights are written
    save = Phi3VTrainer._save_optimizer_and_scheduler

    def crash(self, output_dir):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return save(self, output_dir)

    monkeypatch.setattr(Phi3VTrainer, "_save_optimizer_and_scheduler", crash)
    with pytest.raises(KeyboardInterrupt):
        ucf101.main(ucf_args(tiny_dir, ucf_data, out, *common, "--seed", "7"))
    assert tree(out / "checkpoint-2") == first and is_complete(out / "checkpoint-2")  # the old one, whole
    assert (out / STAGING / "checkpoint-2" / "model.safetensors").exists()  # the new weights stay staged
    assert resolve_checkpoint("last", out) == str(far)  # the newest readable one is the foreign step 50

    # disk full while saving: one line that names the intact checkpoint, exit 2
    def full(self, output_dir):
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, output_dir)

    monkeypatch.setattr(Phi3VTrainer, "_save_optimizer_and_scheduler", full)
    capsys.readouterr()
    out = tmp_path / "fresh"
    with pytest.raises(SystemExit) as exit_info:
        run_main(ucf101.main, ucf_args(tiny_dir, ucf_data, out, *common))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: could not write {out / 'checkpoint-2'} (OSError: [Errno 28] No space left on device); is the disk "
        f"full or read-only? The earlier checkpoint {out / 'checkpoint-1'} is intact: free space and continue with "
        "--resume_from_checkpoint last.")
    assert is_complete(out / "checkpoint-1") and not (out / STAGING).exists()

    # a checkpoint file holding a pickled object, not tensors: refused in one line, nothing unpickled
    evil = tmp_path / "evil"
    shutil.copytree(tmp_path / "out" / "checkpoint-2", evil)
    (evil / COMPLETE_MARKER).unlink()  # a foreign checkpoint, readable: accepted for resuming
    torch.save({"python": Planted()}, evil / "rng_state.pth")
    monkeypatch.setattr(Phi3VTrainer, "_save_optimizer_and_scheduler", save)
    with pytest.raises(SystemExit):
        run_main(ucf101.main, ucf_args(tiny_dir, ucf_data, tmp_path / "third", "--max_steps", "4",
                                       "--no_eval_before_training", "--no_eval_after_training",
                                       "--resume_from_checkpoint", str(evil)))
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {evil}: a file of this checkpoint holds pickled objects other than tensors and was refused "
        "(unpickling can run code); resume from a checkpoint you wrote, or start afresh")
    assert not Planted.unpickled


class Planted:
    unpickled = False

    def __setstate__(self, state):
        Planted.unpickled = True
