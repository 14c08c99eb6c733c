"""predict.py beyond greedy: sampling flags and --seed, --system, --merge_lora, --device_map, --load_in_4bit, and
jsonl answers from several processes (torchrun) in input order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import predict
from phi3v import Phi3VForCausalLM, Phi3VProcessor
from phi3v.common.errors import UserError
from phi3v.data.conversation import Conversation, Turn, render
from tests.conftest import make_image
from tests.test_distributed import free_port
from tests.test_serving import make_adapter


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "a.png"
    make_image(80, 60).save(path)
    return path


def ask(model_dir, image_file, *flags):
    return predict.main([str(model_dir), "--image", str(image_file), "--question", "What is it?", "--no-stream",
                         "--max_new_tokens", "8", *flags])


def test_sampling_is_reproducible_with_seed(tiny_dir, image_file):
    sample = ("--do_sample", "--temperature", "1.5", "--top_k", "50")
    first, again = ask(tiny_dir, image_file, *sample, "--seed", "3"), ask(tiny_dir, image_file, *sample, "--seed", "3")
    other = ask(tiny_dir, image_file, *sample, "--seed", "4")
    greedy = ask(tiny_dir, image_file)
    assert first == again
    assert first != other and first != greedy  # the random tiny model is nearly uniform: samples differ


def test_out_with_a_question_writes_the_answer_record(tiny_dir, image_file, tmp_path, capsys):
    """One line of the --jsonl mode's --out shape: {id, prediction, reference}; the answer is printed as well."""
    out = tmp_path / "answer.jsonl"
    text = ask(tiny_dir, image_file, "--out", str(out))
    assert text and capsys.readouterr().out == text + "\n"
    assert out.read_text().count("\n") == 1
    assert json.loads(out.read_text()) == {"id": "question", "prediction": text, "reference": None}


def test_decoding_flags_reach_generate(tiny_dir, image_file, monkeypatch):
    seen = {}
    original = Phi3VForCausalLM.generate

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Phi3VForCausalLM, "generate", spy)
    ask(tiny_dir, image_file, "--do_sample", "--temperature", "0.7", "--top_p", "0.9", "--top_k", "5",
        "--repetition_penalty", "1.3", "--num_beams", "2", "--system", "Answer in one word.")
    assert {k: seen[k] for k in ("do_sample", "temperature", "top_p", "top_k", "num_beams")} \
        == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "num_beams": 2}
    [penalty] = seen["logits_processor"]
    assert penalty.penalty == 1.3
    assert seen["eos_token_id"] == [32007, 32000]
    ids = seen["input_ids"][0].tolist()
    text = Phi3VProcessor.from_pretrained(tiny_dir).decode([i for i in ids if i >= 0])
    assert ids[:2] == [1, 32006]  # BOS, then the system turn, before the user's
    assert text.index("Answer in one word.") < text.index("<|end|>") < text.index("<|user|>")
    seen.clear()
    ask(tiny_dir, image_file)
    assert seen["do_sample"] is False and "temperature" not in seen  # greedy by default, as in evaluation
    with pytest.raises(UserError, match="add --do_sample"):
        ask(tiny_dir, image_file, "--temperature", "0.7")


def test_repetition_penalty_skips_image_placeholders():
    from phi3v.eval.generation import RepetitionPenalty

    ids = torch.tensor([[1, -1, -1, 5, 2], [7, 7, -2, 3, 3]])
    scores = torch.tensor([[1.0, 2.0, -2.0, 4.0, 0.5, 6.0, 8.0, 1.0], [1.0, 2.0, -2.0, 4.0, 0.5, 6.0, 8.0, 1.0]])
    out = RepetitionPenalty(2.0)(ids, scores.clone())
    # by hand: tokens in the row are divided by 2 when positive, multiplied by 2 when negative; others untouched
    assert out.tolist() == [[1.0, 1.0, -4.0, 4.0, 0.5, 3.0, 8.0, 1.0], [1.0, 2.0, -2.0, 2.0, 0.5, 6.0, 8.0, 0.5]]


def test_system_message_prompt(processor):
    with_system = predict.WithSystemMessage(processor, "Be brief.")
    prompt, _, _ = render(with_system, Conversation("q", [Turn("What?", None, [make_image(40, 30)])]), True)
    assert prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n"
    own, _, _ = render(with_system, Conversation("q", [Turn("What?", None, [])], system="Be long."), True)
    assert own == "<|system|>\nBe long.<|end|>\n<|user|>\nWhat?<|end|>\n<|assistant|>\n"  # a record's own wins


def test_merge_lora_and_device_map(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter")
    unmerged, processor = predict.load_for_inference(adapter)
    merged, _ = predict.load_for_inference(adapter, merge_lora=True)
    spread, _ = predict.load_for_inference(adapter, merge_lora=True, device_map="auto")
    assert type(merged) is Phi3VForCausalLM and type(unmerged) is not Phi3VForCausalLM
    assert {p.device.type for p in spread.parameters()} == {"cpu"}  # no GPU here: accelerate keeps it on the CPU
    inputs = processor("<|user|>\nWhat?<|end|>\n<|assistant|>\n")
    with torch.no_grad():
        reference = unmerged(**inputs).logits
        assert torch.allclose(merged(**inputs).logits, reference, atol=1e-5)
        assert torch.allclose(spread(**inputs).logits, reference, atol=1e-5)


def test_load_in_4bit_asks_for_nf4(tiny_dir, tmp_path, monkeypatch):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter")
    with pytest.raises(UserError, match="merge in full precision with `python -m phi3v.export"):
        predict.load_for_inference(adapter, load_in_4bit=True, merge_lora=True)
    asked = {}

    def fake_from_pretrained(path, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop here")  # bitsandbytes 4-bit needs CUDA: only the request is checked on CPU

    monkeypatch.setattr(Phi3VForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(RuntimeError, match="stop here"):
        predict.load_for_inference(tiny_dir, dtype=torch.bfloat16, device="cuda:1", load_in_4bit=True)
    config = asked["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_compute_dtype == torch.bfloat16 and asked["device_map"] == {"": "cuda:1"}


@pytest.mark.cuda
def test_load_in_4bit_on_a_gpu(tiny_dir, image_file):
    assert isinstance(ask(tiny_dir, image_file, "--load_in_4bit", "--dtype", "bfloat16"), str)


@pytest.mark.slow
def test_jsonl_answers_from_two_processes_come_in_input_order(tiny_dir, ucf_data, tmp_path):
    records = [json.loads(line) for line in (ucf_data / "ucf101_train.jsonl").read_text().splitlines()]
    flags = [str(tiny_dir), "--jsonl", str(ucf_data / "ucf101_train.jsonl"), "--image_root", str(ucf_data / "images"),
             "--max_new_tokens", "4", "--batch_size", "2", "--num_crops", "1"]
    single, both = tmp_path / "single.jsonl", tmp_path / "torchrun.jsonl"
    predict.main([*flags, "--out", str(single)])
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "predict.py", *flags, "--out", str(both)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("answers written") == 1  # rank 0 writes, the other rank only answers
    from_two = [json.loads(line) for line in both.read_text().splitlines()]
    assert len(records) == 12 and [a["id"] for a in from_two] == [r["id"] for r in records]  # input order, once each
    assert [a["reference"] for a in from_two] == [r["conversations"][-1]["assistant"] for r in records]
    assert from_two == [json.loads(line) for line in single.read_text().splitlines()]  # as from one process
