"""After training: predict.py on every output form, LoRA merge/export, training curves, TensorBoard, quiet runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import finetune_hf_trainer_ucf101 as ucf101
import predict
from phi3v import Phi3VForCausalLM
from phi3v.serve.export import main as export_main
from tests.conftest import make_image, ucf_args


@pytest.fixture(scope="module")
def lora_run(tiny_dir, ucf_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    ucf101.main(ucf_args(tiny_dir, ucf_data, out, "--use_lora", "--lora_rank", "8", "--max_steps", "3",
                         "--save_steps", "2", "--learning_rate", "5e-2", "--save_merged_model",
                         "--logging_steps", "10"))
    merged = out / "merged-fp32"
    export_main([str(out), str(merged), "--dtype", "float32"])
    return out, merged


def answers(output_dir, ucf_data, tmp_path, name):
    out = tmp_path / f"{name}.jsonl"
    predict.main([str(output_dir), "--jsonl", str(ucf_data / "ucf101_val.jsonl"), "--image_root",
                  str(ucf_data / "images"), "--out", str(out), "--max_new_tokens", "8"])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_adapter_and_merged_give_the_same_answers(lora_run, ucf_data, tmp_path):
    out, merged = lora_run
    adapter, merged_answers = answers(out, ucf_data, tmp_path, "adapter"), answers(merged, ucf_data, tmp_path, "m")
    assert [a["prediction"] for a in adapter] == [m["prediction"] for m in merged_answers]
    assert [a["id"] for a in adapter] == ["val-0000000012", "val-0000000013", "val-0000000014"]


def test_merged_export_has_the_official_names_and_the_same_logits(lora_run, tiny_dir, processor):
    out, merged = lora_run
    assert set(load_file(merged / "model.safetensors")) == set(load_file(tiny_dir / "model.safetensors"))
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "chat_template.jinja"):
        assert (merged / name).exists(), name
    assert "<|assistant|>" in json.loads((merged / "tokenizer_config.json").read_text())["chat_template"]
    unmerged, _ = predict.load_for_inference(out)
    reloaded = Phi3VForCausalLM.from_pretrained(merged).eval()
    inputs = processor("<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n", [make_image(300, 200)])
    with torch.no_grad():
        assert torch.allclose(unmerged(**inputs).logits, reloaded(**inputs).logits, atol=1e-5)
    bf16 = load_file(out / "merged" / "model.safetensors")  # --save_merged_model: bf16 by default
    assert set(bf16) == set(load_file(merged / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())


def test_full_output_answers_as_the_model_in_memory(tiny_dir, ucf_data, tmp_path):
    out = tmp_path / "full"
    ucf101.main(ucf_args(tiny_dir, ucf_data, out, "--max_steps", "2", "--no_eval_before_training"))
    from_cli = [a["prediction"] for a in answers(out, ucf_data, tmp_path, "full")]
    after = json.loads((out / "eval_after.json").read_text())["predictions"]
    assert from_cli == [p["prediction"].strip() for p in after]  # the trainer's own evaluation, same prompts


def test_single_question_streams_the_answer(lora_run, ucf_data, capsys):
    out, _ = lora_run
    frame = sorted((ucf_data / "images" / "val").rglob("*.jpg"))[0]
    question = json.loads((ucf_data / "ucf101_val.jsonl").read_text().splitlines()[0])["conversations"][0]["user"]
    streamed = predict.main([str(out), "--image", str(frame), "--question", question, "--max_new_tokens", "6"])
    printed = capsys.readouterr().out
    assert streamed and streamed in printed
    assert predict.main([str(out), "--image", str(frame), "--question", question, "--max_new_tokens", "6",
                         "--no-stream"]) == streamed


def test_question_about_a_video(lora_run, tmp_path, monkeypatch):
    """--video --num_frames 2 asks about exactly the converter's 2 frames of the clip, as images 1 and 2."""
    import numpy as np

    import convert_ucf101
    from phi3v.data.synthetic import class_frames, write_video

    out, _ = lora_run
    video = write_video(tmp_path / "clip.avi", class_frames(0, 3, 12, (64, 48), 0))
    calls = []
    real_answer = predict.answer
    monkeypatch.setattr(predict, "answer", lambda *args, **kwargs: calls.append(args) or real_answer(*args, **kwargs))
    text = predict.main([str(out), "--video", str(video), "--num_frames", "2", "--question", "Which?",
                         "--max_new_tokens", "4", "--no-stream"])
    (model, processor, question, images, max_new_tokens), = calls
    expected = convert_ucf101.read_frames(video, 2)
    assert question == "Which?" and max_new_tokens == 4 and len(images) == 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))  # two different moments of the clip
    assert text == real_answer(model, processor, "Which?", expected, 4)


def test_training_curves_data(lora_run):
    out, _ = lora_run
    curves = json.loads((out / "training_curves.json").read_text())
    # --logging_steps 10 in a run of 3 steps: the first and the last step are logged all the same
    assert [step for step, _ in curves["loss"]] == [1, 3]
    assert [step for step, _ in curves["learning_rate"]] == [1, 3]
    assert [step for step, _ in curves["eval_accuracy"]] == [0, 3]  # before and after training, one curve
    assert [step for step, _ in curves["test_accuracy"]] == [3]
    assert [step for step, _ in curves["eval_loss"]] == [0, 3]  # the validation loss, before and after training
    assert curves["eval_loss"][1][1] < curves["eval_loss"][0][1]  # learned
    assert (out / "training_curves.png").stat().st_size > 1000
    assert (out / "checkpoint-2" / "training_curves.json").exists()  # drawn at every checkpoint too


def test_tensorboard_and_quiet_progress(tiny_dir, ucf_data, tmp_path, capfd):
    out = tmp_path / "tb"
    ucf101.main(ucf_args(tiny_dir, ucf_data, out, "--max_steps", "2", "--report_to", "tensorboard"))
    assert list(out.rglob("events.out.tfevents.*"))
    captured = capfd.readouterr()
    assert "it/s]" not in captured.err and "it/s]" not in captured.out  # --no-tqdm: no progress bars at all
