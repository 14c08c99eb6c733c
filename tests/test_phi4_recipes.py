"""Every user-facing path on the tiny Phi-4-multimodal checkpoint: the four recipes in each mode, QLoRA on a merged
base, resume, predict.py and the merged export, each checked against transformers' native classes, peft or a
computation by hand.

The base is the session's tiny Phi-4 (`phi4_dir`) with the embedding rows of every id but the small tokenizer's
learned ones set to zero (tied: those logits are 0, the special tokens' included), so that greedy answers are real
text, never an empty decode of an unused id or an immediate stop: `readable_base`, with the same vision-lora/.
4-bit loading on CPU needs in_features >= 64 (bitsandbytes' CPU inference layout), which the tiny SigLIP (hidden
32) is not: the 4-bit checks use a tiny base with SigLIP hidden 64.
"""

from __future__ import annotations

import json
import math
import shutil

import datasets
import pytest
import torch
from safetensors.torch import load_file

import finetune_hf_trainer_docvqa as docvqa
import finetune_hf_trainer_hateful_memes as hateful_memes
import finetune_hf_trainer_nlvr2 as nlvr2
import finetune_hf_trainer_ucf101 as ucf101
import predict
from phi3v.common.errors import run_main
from tests.conftest import make_image, ucf_args
from tests.test_scripts_tasks import CAULDRON_FEATURES, MINI_DOCVQA_FEATURES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
SIGLIP = "model.embed_tokens_extend.image_embed.img_processor."
PROCESSOR_FILES = ("chat_template.jinja", "processor_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def readable_base(phi4_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("phi4-readable")
    tokenizer = AutoTokenizer.from_pretrained(phi4_dir)
    used = sorted(set(tokenizer.get_vocab().values()) - set(tokenizer.get_added_vocab().values()))
    model = AutoModelForCausalLM.from_pretrained(phi4_dir)  # native class, no vision LoRA merged: saved as stored
    with torch.no_grad():
        keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        keep[used] = True
        model.get_input_embeddings().weight[~keep] = 0
    model.save_pretrained(out)
    for name in PROCESSOR_FILES:
        shutil.copy(phi4_dir / name, out / name)
    shutil.copytree(phi4_dir / "vision-lora", out / "vision-lora")
    return out


@pytest.fixture(scope="module")
def merged_base(readable_base, tmp_path_factory):
    """`python -m phi3v.models.phi4_mm.merge_vision_lora BASE OUT`: the base QLoRA and 4-bit loading need."""
    from phi3v.models.phi4_mm.merge_vision_lora import main

    out = tmp_path_factory.mktemp("phi4-merged") / "merged"
    main([str(readable_base), str(out)])
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi4-hub")

    def mini_row(i):
        question = f"What is the total on page {i}?"
        return {"id": f"q{i}", "image": make_image(64, 80, seed=i),
                "query": {lang: question for lang in ("de", "en", "es", "fr", "it")}, "answers": [f"{10 * i}"],
                "words": ["total"], "bounding_boxes": [[0.1, 0.1, 0.2, 0.2]],
                "answer": {"match_score": 1.0, "matched_text": "x", "start": 1, "text": "x"}}

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([mini_row(i) for i in range(2)], features=MINI_DOCVQA_FEATURES),
        "test": datasets.Dataset.from_list([mini_row(i) for i in range(2, 4)], features=MINI_DOCVQA_FEATURES),
    }).save_to_disk(root / "docvqa")

    def cauldron(rows):
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=CAULDRON_FEATURES)})

    cauldron([{"images": [make_image(64, 48, seed=i), make_image(48, 64, seed=i + 50)], "texts": [
        {"user": "The left image has more dogs. True or False?", "assistant": "True" if i % 2 else "False",
         "source": "nlvr2"}]} for i in range(4)]).save_to_disk(root / "nlvr2")
    memes = cauldron([{"images": [make_image(64, 64, seed=i)], "texts": [
        {"user": "Is this meme hateful? Answer yes or no.", "assistant": "yes" if i % 2 == 0 else "no",
         "source": "hateful_memes"}]} for i in range(4)])
    memes["train"].to_parquet(str(root / "memes" / "hateful_memes" / "train-00000-of-00001.parquet"))
    return root


def run_args(base, out, *extra):
    return ["--model_name_or_path", str(base), "--output_dir", str(out), "--num_crops", "1", "--batch_size", "2",
            "--batch_size_per_gpu", "1", "--max_steps", "1", "--dataloader_num_workers", "0", "--no-tqdm",
            "--report_to", "none", "--max_new_tokens", "3", "--learning_rate", "1e-3", "--warmup_steps", "0", *extra]


def results(out) -> dict:
    return json.loads((out / "all_results.json").read_text())


@pytest.fixture(scope="module")
def lora_out(readable_base, hub, tmp_path_factory):
    """hateful_memes --use_lora on Phi-4 (ROC AUC from the yes/no token scores)."""
    out = tmp_path_factory.mktemp("phi4-memes-lora") / "out"
    hateful_memes.main(run_args(readable_base, out, "--dataset_path", str(hub / "memes"), "--eval_rows", "2",
                                "--use_lora"))
    return out


# ------------------------------------------------------------------------------------------------- recipes


def test_hateful_memes_lora_scores_phi4s_yes_and_no_tokens(lora_out, phi4_dir):
    from transformers import AutoTokenizer

    assert {"eval_before_roc_auc", "eval_after_roc_auc", "eval_after_accuracy", "train_loss"} <= set(results(lora_out))
    assert json.loads((lora_out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the scored ids are the first tokens of the answers as the native tokenizer encodes them after <|assistant|>
    tokenizer = AutoTokenizer.from_pretrained(phi4_dir)
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    expected = []
    for answer in ("yes", "no"):
        ids = tokenizer(f"<|user|>q<|end|><|assistant|>{answer}<|end|>", add_special_tokens=False)["input_ids"]
        expected.append(ids[ids.index(assistant) + 1])
    from phi3v.models.phi4_mm.processing import Phi4MMProcessor

    assert hateful_memes.score_token_ids(hateful_memes.DataArguments(), Phi4MMProcessor.from_pretrained(phi4_dir)) \
        == expected
    for prediction in json.loads((lora_out / "eval_after.json").read_text())["predictions"]:
        assert len(prediction["scores"]) == 2 and 0 < sum(prediction["scores"]) <= 1 + 1e-6


def test_nlvr2_full_two_images_per_example(readable_base, hub, tmp_path):
    out = tmp_path / "out"
    nlvr2.main(run_args(readable_base, out, "--dataset_path", str(hub / "nlvr2"), "--eval_rows", "2"))
    assert {"eval_before_accuracy", "eval_after_accuracy", "train_loss"} <= set(results(out))
    assert results(out)["eval_after_samples"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi4_multimodal" and "auto_map" not in config


def test_docvqa_freeze_vision_model_leaves_siglip_as_the_base(readable_base, hub, tmp_path):
    out = tmp_path / "out"
    docvqa.main(run_args(readable_base, out, "--dataset_path", str(hub / "docvqa"), "--freeze_vision_model"))
    assert {"eval_after_anls", "train_loss"} <= set(results(out))
    base, trained = load_file(readable_base / "model.safetensors"), load_file(out / "model.safetensors")
    siglip = [k for k in base if k.startswith(SIGLIP)]
    assert siglip and all(torch.equal(base[k], trained[k]) for k in siglip)
    assert not torch.equal(base["model.layers.0.self_attn.o_proj.weight"],
                           trained["model.layers.0.self_attn.o_proj.weight"])  # vision LoRA merged, then trained


def test_qlora_needs_the_merged_base_then_trains(readable_base, merged_base, hub, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    args = ["--dataset_path", str(hub / "docvqa"), "--use_qlora"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(docvqa.main, run_args(readable_base, tmp_path / "refused", *args))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {readable_base} has a built-in vision LoRA (vision-lora/), which cannot be merged "
                      "into quantized or ZeRO-3-partitioned weights: merge it once with `python -m "
                      f"phi3v.models.phi4_mm.merge_vision_lora {readable_base} MERGED_DIR` and train on MERGED_DIR"]
    assert not (merged_base / "vision-lora").exists()
    out = tmp_path / "out"
    docvqa.main(run_args(merged_base, out, *args))
    assert {"eval_before_anls", "eval_after_anls", "train_loss"} <= set(results(out))
    assert (out / "adapter_model.safetensors").is_file()


def test_merge_vision_lora_adds_the_adapter_by_hand(readable_base, merged_base):
    config = json.loads((readable_base / "vision-lora" / "adapter_config.json").read_text())
    lora = load_file(readable_base / "vision-lora" / "adapter_model.safetensors")
    base, merged = load_file(readable_base / "model.safetensors"), load_file(merged_base / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    expected = base[f"{name}.weight"] + config["lora_alpha"] / config["r"] * (
        lora[f"{name}.lora_B.weight"] @ lora[f"{name}.lora_A.weight"])
    assert torch.allclose(merged[f"{name}.weight"], expected, atol=1e-6)


def test_ucf101_resume_gives_the_same_losses(readable_base, ucf_data, tmp_path, monkeypatch):
    from phi3v.train.trainer import Phi3VTrainer
    from tests.test_scripts_ucf101 import losses

    common = ["--max_steps", "2", "--save_steps", "1", "--no_eval_before_training", "--no_eval_after_training",
              "--seed", "7", "--batch_size", "2", "--use_lora", "--max_new_tokens", "2"]
    ucf101.main(ucf_args(readable_base, ucf_data, tmp_path / "whole", *common))
    reference = losses(tmp_path / "whole")
    assert sorted(reference) == [1, 2]

    class Interrupted(Exception):
        pass

    save = Phi3VTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 1:
            raise Interrupted

    monkeypatch.setattr(Phi3VTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        ucf101.main(ucf_args(readable_base, ucf_data, tmp_path / "split", *common))
    monkeypatch.setattr(Phi3VTrainer, "_save_checkpoint", save)
    ucf101.main(ucf_args(readable_base, ucf_data, tmp_path / "split", *common, "--resume_from_checkpoint", "last"))
    resumed = losses(tmp_path / "split")
    assert sorted(resumed) == [1, 2] and resumed == pytest.approx(reference, abs=1e-6)
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ------------------------------------------------------------------------------------------------- export


def native_inputs(model_dir, image, question="Is this meme hateful?"):
    """The native processor's inputs for one image and a question, the prompt from the native chat template."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.image_processor.dynamic_hd = 1  # --num_crops 1
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{processor.image_token}\n{question}"}], tokenize=False,
        add_generation_prompt=True)
    return processor, processor(text=prompt, images=[image], return_tensors="pt")


def by_hand_vision_lora(model, base_dir):
    """W += alpha / r * B @ A for the base's vision-lora/, computed here."""
    config = json.loads((base_dir / "vision-lora" / "adapter_config.json").read_text())
    weights = load_file(base_dir / "vision-lora" / "adapter_model.safetensors")
    with torch.no_grad():
        for key in [k for k in weights if k.endswith(".lora_A.weight")]:
            path = key.removesuffix(".lora_A.weight")
            model.get_submodule(path).weight += config["lora_alpha"] / config["r"] * (
                weights[f"{path}.lora_B.weight"] @ weights[key])
    return model


def test_export_of_a_lora_output_loads_natively_with_the_trained_logits(lora_out, readable_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from phi3v.export import main as export_main
    from phi3v.models.phi4_mm.modeling import Phi4MultimodalForCausalLM

    merged = tmp_path / "merged"
    export_main([str(lora_out), str(merged), "--dtype", "float32"])
    config = json.loads((merged / "config.json").read_text())
    assert "auto_map" not in config and not list(merged.glob("*.py")) and not (merged / "vision-lora").exists()
    _, inputs = native_inputs(merged, make_image(64, 64, seed=9))
    exported = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    assert type(exported).__module__.startswith("transformers.")  # the native class
    trained = PeftModel.from_pretrained(
        Phi4MultimodalForCausalLM.from_pretrained(readable_base, attn_implementation="eager"), lora_out).eval()
    reference = PeftModel.from_pretrained(by_hand_vision_lora(  # native base + vision LoRA by hand + the adapter
        AutoModelForCausalLM.from_pretrained(readable_base, attn_implementation="eager"), readable_base),
        lora_out).eval()
    with torch.no_grad():
        logits = exported(**inputs).logits
        assert torch.allclose(logits, trained(**inputs).logits, atol=1e-4)
        assert torch.allclose(logits, reference(**inputs).logits, atol=1e-4)


def test_export_handles_a_family_without_remote_code(lora_out, tmp_path):
    """Phi-4's remote_code_dir is None and complete_layout writes nothing: the default (remote code files on)
    export works offline and writes no *.py."""
    from phi3v.models.registry import checkpoint_family
    from phi3v.serve.export import adapter_base, export_merged

    family = checkpoint_family(adapter_base(lora_out))
    assert family.remote_code_dir(adapter_base(lora_out)) is None
    out = export_merged(lora_out, tmp_path / "merged", dtype=torch.float32)
    assert not list(out.glob("*.py")) and "auto_map" not in json.loads((out / "config.json").read_text())


# ------------------------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi4-images") / "a.png"
    make_image(64, 48, seed=3).save(path)
    return path


def native_greedy(model, model_dir, image, question, max_new_tokens=4):
    processor, inputs = native_inputs(model_dir, image, question)
    end = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def ask(model_dir, image_file, *flags, question="What is it?"):
    return predict.main([str(model_dir), "--image", str(image_file), "--question", question, "--no-stream",
                         "--max_new_tokens", "4", "--num_crops", "1", *flags])


def test_predict_full_greedy_sampling_and_batches(merged_base, image_file, tmp_path):
    from PIL import Image
    from transformers import AutoModelForCausalLM

    native = AutoModelForCausalLM.from_pretrained(merged_base, attn_implementation="eager").eval()
    greedy = ask(merged_base, image_file, "--attn_implementation", "eager")
    assert greedy and greedy == native_greedy(native, merged_base, Image.open(image_file), "What is it?")
    sample = ("--do_sample", "--temperature", "1.5", "--top_k", "50")
    first, again = ask(merged_base, image_file, *sample, "--seed", "3"), ask(merged_base, image_file, *sample,
                                                                            "--seed", "3")
    assert first == again and first != ask(merged_base, image_file, *sample, "--seed", "4")
    # --jsonl with --batch_size 2: each answer as the native model gives it alone
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, (w, h) in enumerate([(64, 48), (40, 72), (56, 56)]):
        make_image(w, h, seed=i).save(images / f"{i}.png")
        records.append({"id": f"r{i}", "conversations": [{"images": [f"{i}.png"], "user": f"Which one is {i}?",
                                                          "assistant": "x"}]})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    predict.main([str(merged_base), "--jsonl", str(tmp_path / "q.jsonl"), "--image_root", str(images), "--out",
                  str(tmp_path / "a.jsonl"), "--batch_size", "2", "--max_new_tokens", "4", "--num_crops", "1",
                  "--attn_implementation", "eager"])
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["r0", "r1", "r2"]
    for i, a in enumerate(answers):
        assert a["prediction"] == native_greedy(native, merged_base, Image.open(images / f"{i}.png"),
                                                f"Which one is {i}?")


def test_predict_lora_output_as_peft_on_the_native_base(lora_out, readable_base, image_file):
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(by_hand_vision_lora(
        AutoModelForCausalLM.from_pretrained(readable_base, attn_implementation="eager"), readable_base),
        lora_out).eval()
    answer = ask(lora_out, image_file, "--attn_implementation", "eager")
    assert answer and answer == native_greedy(reference, readable_base, Image.open(image_file), "What is it?")
    assert ask(lora_out, image_file, "--attn_implementation", "eager", "--merge_lora") == answer


def test_predict_4bit_needs_the_merged_base(readable_base, image_file, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from phi3v.models.phi4_mm.merge_vision_lora import main as merge
    from phi3v.models.phi4_mm.tiny import build_tiny_checkpoint, tiny_config

    vision = {**tiny_config().vision_config.to_dict(), "hidden_size": 64, "intermediate_size": 128}
    wide = build_tiny_checkpoint(tmp_path / "wide", vision_config=vision)
    merge([str(wide), str(tmp_path / "merged")])
    with pytest.raises(SystemExit) as exit_info:
        run_main(predict.main, [str(readable_base), "--image", str(image_file), "--question", "q", "--no-stream",
                                "--load_in_4bit"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "merge_vision_lora" in errors[0]
    assert isinstance(ask(tmp_path / "merged", image_file, "--load_in_4bit"), str)


@pytest.mark.parametrize("mode", [["--use_lora"], []], ids=["lora", "full"])
def test_bf16_mixed_precision_trains(readable_base, ucf_data, tmp_path, mode):
    """--bf16 on Phi-4 (CPU autocast here; the GPU rows of bench/gpu_check.py time it): the steps run with finite
    losses and the run evaluates after training."""
    out = tmp_path / "run"
    metrics = ucf101.main(ucf_args(readable_base, ucf_data, out, "--max_steps", "2", "--bf16", "--batch_size", "2",
                                   "--no_eval_before_training", "--max_new_tokens", "2", *mode))
    from tests.test_scripts_ucf101 import losses

    logged = losses(out)
    assert sorted(logged) == [1, 2] and all(math.isfinite(loss) for loss in logged.values())
    assert "eval_after_accuracy" in metrics
