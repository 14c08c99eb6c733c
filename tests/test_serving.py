"""Outputs that tools reading the official layout load: every file phi3v.export writes, checked at the JSON level
against the spec; shards + index; auto_map with and without remote code; the model card and the Hub upload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from phi3v import Phi3VForCausalLM, Phi3VProcessor
from phi3v.common.errors import UserError, run_main
from phi3v.models.phi3_v.family import PHI3_V
from phi3v.models.phi3_v.layout import complete_layout
from phi3v.models.phi4_mm.family import PHI4_MM
from phi3v.serve.export import main as export_main
from phi3v.serve.publish import model_card
from tests.conftest import make_image

# Stand-ins for the official remote code, which may not be copied into this repository: the class names and
# structure of the official files (the processor a ProcessorMixin of an image processor and a Llama tokenizer),
# enough for transformers 4.x to resolve auto_map and import them, without the model itself.
STAND_IN_CODE = {
    "configuration_phi3_v.py": '''
from transformers import PretrainedConfig


class Phi3VConfig(PretrainedConfig):
    model_type = "phi3_v"
''',
    "processing_phi3_v.py": '''
import transformers
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin


class Phi3VImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(self, num_crops=1, num_img_tokens=144, **kwargs):
        super().__init__(**kwargs)
        self.num_crops = num_crops
        self.num_img_tokens = num_img_tokens


class Phi3VProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "Phi3VImageProcessor"
    tokenizer_class = ("LlamaTokenizer", "LlamaTokenizerFast")


transformers.Phi3VImageProcessor = Phi3VImageProcessor  # ProcessorMixin (4.x) looks the class up by name there
''',
    "modeling_phi3_v.py": "# stand-in: the official modeling code is not part of this repository\n",
}
OFFICIAL_CONFIG_MAP = {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                       "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}
OFFICIAL_PROCESSOR_MAP = {"AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
                          "AutoProcessor": "processing_phi3_v.Phi3VProcessor"}


def base_with_code(tiny_dir, folder):
    """A copy of the tiny checkpoint laid out as the hub repo: stand-in *.py files and the official auto_map."""
    shutil.copytree(tiny_dir, folder)
    for name, code in STAND_IN_CODE.items():
        (folder / name).write_text(code)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": OFFICIAL_CONFIG_MAP}))
    return folder


def make_adapter(tiny_dir, folder):
    """A LoRA adapter (rank 4 on qkv_proj and lm_head, non-zero) with the processor files and a run record."""
    model = Phi3VForCausalLM.from_pretrained(tiny_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["model.layers.0.self_attn.qkv_proj", "lm_head"],
                        init_lora_weights=False)
    torch.manual_seed(0)
    PeftModel(model, config).save_pretrained(folder, save_embedding_layers=False)
    Phi3VProcessor.from_pretrained(tiny_dir).save_pretrained(folder)
    (folder / "run_info.json").write_text(json.dumps({
        "base_model": str(tiny_dir), "mode": "lora", "data": {"data_dir": "/data/ucf101"},
        "command": "python finetune_hf_trainer_ucf101.py --data_dir /data/ucf101 --use_lora"}))
    (folder / "all_results.json").write_text(json.dumps({
        "eval_before_accuracy": 0.25, "eval_after_accuracy": 0.875, "eval_after_runtime": 3.0, "test_accuracy": 0.8,
        "train_loss": 1.5}))
    return folder


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """A LoRA adapter exported with a local base that holds the (stand-in) remote code."""
    root = tmp_path_factory.mktemp("export")
    base = base_with_code(tiny_dir, root / "base")
    adapter = make_adapter(tiny_dir, root / "adapter")
    out = export_main([str(adapter), str(root / "merged"), "--base", str(base), "--dtype", "float32"])
    return base, adapter, out


def read(folder, name):
    return json.loads((folder / name).read_text())


def test_every_file_of_the_export(exported, tiny_dir):
    base, _, out = exported
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "README.md", "all_results.json", "chat_template.jinja", "config.json", "configuration_phi3_v.py",
        "generation_config.json", "model.safetensors", "modeling_phi3_v.py", "preprocessor_config.json",
        "processing_phi3_v.py", "processor_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"])
    for name in STAND_IN_CODE:
        assert (out / name).read_text() == (base / name).read_text()
    config = read(out, "config.json")
    assert config["auto_map"] == OFFICIAL_CONFIG_MAP
    assert config["model_type"] == "phi3_v" and config["architectures"] == ["Phi3VForCausalLM"]
    assert config["rope_scaling"]["type"] == "su" and "rope_parameters" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 32000)  # spec 1
    preprocessor = read(out, "preprocessor_config.json")
    assert preprocessor["auto_map"] == OFFICIAL_PROCESSOR_MAP
    assert preprocessor["processor_class"] == "Phi3VProcessor" and preprocessor["num_crops"] == 4
    assert read(out, "processor_config.json") == {"auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
                                                  "processor_class": "Phi3VProcessor"}  # as the official file
    generation = read(out, "generation_config.json")
    assert (generation["bos_token_id"], generation["pad_token_id"]) == (1, 32000)
    assert generation["eos_token_id"] == [2, 32000, 32007]  # official 2, then <|endoftext|> and <|end|> (spec 5)
    tokenizer = read(out, "tokenizer_config.json")
    assert "extra_special_tokens" not in tokenizer
    assert tokenizer["additional_special_tokens"] == ["<|system|>", "<|end|>", "<|user|>"]
    assert tokenizer["tokenizer_class"] == "LlamaTokenizer" and "<|assistant|>" in tokenizer["chat_template"]
    assert (tokenizer["bos_token"], tokenizer["eos_token"], tokenizer["pad_token"]) == ("<s>", "<|endoftext|>",
                                                                                         "<|endoftext|>")
    assert read(out, "special_tokens_map.json") == {
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
        "additional_special_tokens": ["<|system|>", "<|end|>", "<|user|>"]}
    assert set(load_file(out / "model.safetensors")) == set(load_file(tiny_dir / "model.safetensors"))


def test_export_loads_here_with_the_adapter_merged(exported, tiny_dir):
    _, adapter, out = exported
    processor = Phi3VProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids(["<|end|>", "<|user|>"]) == [32007, 32010]
    assert processor.tokenizer.extra_special_tokens == ["<|system|>", "<|end|>", "<|user|>"]
    merged = Phi3VForCausalLM.from_pretrained(out).eval()
    unmerged = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_dir), adapter).eval()
    base = Phi3VForCausalLM.from_pretrained(tiny_dir).eval()
    inputs = processor("<|user|>\nWhat?<|end|>\n<|assistant|>\n")
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, unmerged(**inputs).logits, atol=1e-5)
        assert not torch.allclose(merged(**inputs).logits, base(**inputs).logits, atol=1e-3)  # the adapter counts


def test_auto_map_without_remote_code_points_at_the_hub_repo(tiny_dir, tmp_path):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter")
    out = export_main([str(adapter), str(tmp_path / "merged"), "--dtype", "float32"])  # the base has no *.py
    assert not list(out.glob("*.py"))
    assert read(out, "config.json")["auto_map"] == {
        "AutoConfig": "microsoft/Phi-3.5-vision-instruct--configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "microsoft/Phi-3.5-vision-instruct--modeling_phi3_v.Phi3VForCausalLM"}
    assert read(out, "preprocessor_config.json")["auto_map"]["AutoProcessor"] == \
        "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor"
    assert read(out, "processor_config.json")["auto_map"] == {
        "AutoProcessor": "microsoft/Phi-3.5-vision-instruct--processing_phi3_v.Phi3VProcessor"}


def test_hub_base_offline_says_what_to_do(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="--no_remote_code_files") as caught:
        complete_layout(tmp_path, "microsoft/Phi-3.5-vision-instruct")
    assert "could not fetch the remote code (*.py) of microsoft/Phi-3.5-vision-instruct" in str(caught.value)
    assert not (tmp_path / "processor_config.json").exists()  # nothing half-written
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2}')  # the official file's stale eos
    complete_layout(tmp_path, "someone/phi35v-base", remote_code_files=False)  # the escape: code named on the Hub
    assert read(tmp_path, "generation_config.json") == {"eos_token_id": [2, 32000, 32007], "bos_token_id": 1,
                                                        "pad_token_id": 32000}
    assert read(tmp_path, "config.json")["auto_map"]["AutoConfig"] == "someone/phi35v-base--configuration_phi3_v" \
                                                                      ".Phi3VConfig"


def test_hub_base_fetches_only_the_code(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, allow_patterns, kwargs))
        folder = tmp_path / "hub-cache"
        folder.mkdir(exist_ok=True)
        for name, code in STAND_IN_CODE.items():
            (folder / name).write_text(code)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    monkeypatch.setattr("phi3v.common.hub.hub_reachable", lambda: False)  # offline: the local cache only, no retries
    complete_layout(out, "microsoft/Phi-3.5-vision-instruct")
    monkeypatch.setattr("phi3v.common.hub.hub_reachable", lambda: True)
    copied = complete_layout(out, "microsoft/Phi-3.5-vision-instruct")
    assert asked == [("microsoft/Phi-3.5-vision-instruct", ["*.py"], {"local_files_only": True}),
                     ("microsoft/Phi-3.5-vision-instruct", ["*.py"], {})]  # the code, never the weights
    assert copied == sorted(STAND_IN_CODE) and read(out, "config.json")["auto_map"] == OFFICIAL_CONFIG_MAP
    assert read(out, "processor_config.json")["auto_map"]["AutoProcessor"] == "processing_phi3_v.Phi3VProcessor"


def test_export_command_line_offline_is_one_line(tiny_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # what `python -m phi3v.export` runs
        run_main(export_main, [str(adapter), str(tmp_path / "m"), "--base", "microsoft/Phi-3.5-vision-instruct"])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Could not load 'microsoft/Phi-3.5-vision-instruct'")
    assert "--local-dir" in lines[0]  # what to do: download it where the Hub is reachable
    assert not (tmp_path / "m").exists()  # failed before the merge


def test_weights_shard_with_an_index(tiny_model, tmp_path, monkeypatch):
    import phi3v.models.phi3_v.modeling

    assert phi3v.models.phi3_v.modeling.MAX_SHARD_SIZE == "5GB"  # the official repo's shards: 4.94 GB + 3.35 GB
    monkeypatch.setattr(phi3v.models.phi3_v.modeling, "MAX_SHARD_SIZE", "5MB")  # the tiny model is 17 MB in fp32
    tiny_model.save_pretrained(tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                                           for k in range(1, len(shards) + 1)]
    index = read(tmp_path, "model.safetensors.index.json")
    expected = {name: tuple(t.shape) for name, t in tiny_model.state_dict().items()}
    assert set(index["weight_map"]) == set(expected)
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for name, shard in index["weight_map"].items():
        with safe_open(tmp_path / shard, "pt") as f:
            assert name in f.keys() and tuple(f.get_slice(name).get_shape()) == expected[name]
            total += f.get_tensor(name).numel() * 4
    assert index["metadata"]["total_size"] == total
    reloaded = Phi3VForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in tiny_model.state_dict().items())


def test_full_size_shards_as_the_hub_repo():
    """At full size, the 5 GB limit gives the official repo's two shards (4.94 GB + 3.35 GB on the hub page)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from phi3v.models.phi3_v.configuration import Phi3VConfig
    from phi3v.models.phi3_v.modeling import MAX_SHARD_SIZE
    from tests.test_modeling import official_keys

    with torch.device("meta"):
        state = Phi3VForCausalLM(Phi3VConfig.official()).to(torch.bfloat16).state_dict()
    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_SIZE,
                                               filename_pattern="model{suffix}.safetensors")
    sizes = {name: sum(state[key].numel() * 2 for key in keys) for name, keys in split.filename_to_tensors.items()}
    assert sorted(sizes) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert [round(size / 1e9, 1) for size in sizes.values()] == [5.0, 3.3] and sum(sizes.values()) == 8_293_242_880
    assert set(split.tensor_to_filename) == set(official_keys())


def test_model_card():
    card = model_card("microsoft/Phi-3.5-vision-instruct", "lora", {"data_dir": "/d", "train examples": 300},
                      {"eval_before_accuracy": 0.25, "eval_after_accuracy": 0.875, "eval_after_runtime": 9.0,
                       "test_accuracy": 0.8, "test_runtime": 1.0},
                      ["python finetune_hf_trainer_ucf101.py --use_lora", "python -m phi3v.export out m"], PHI3_V)
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "base_model: microsoft/Phi-3.5-vision-instruct\n" in front and "pipeline_tag: image-text-to-text" in front
    assert "- **Tuning mode**: lora" in body and "- **Data**: data_dir /d, train examples 300" in body
    assert "| accuracy | 0.2500 | 0.8750 |" in body and "runtime" not in body
    assert "- test_accuracy: 0.8000" in body
    assert "python finetune_hf_trainer_ucf101.py --use_lora\npython -m phi3v.export out m\n" in body
    assert "vllm serve REPO_OR_DIR --trust-remote-code" in body and "- phi3_v\n" in front
    phi4 = model_card("microsoft/Phi-4-multimodal-instruct", "lora", {}, {}, [], PHI4_MM)
    assert "- phi4_multimodal\n" in phi4 and "vllm serve REPO_OR_DIR\n" in phi4 and "remote-code" not in phi4


class FakeHub:
    """Records what HfApi would have been asked; nothing leaves the machine."""

    def __init__(self):
        self.calls = []

    def __call__(self, token=None):
        return self

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def test_export_push_to_hub(tiny_dir, tmp_path, monkeypatch):
    import phi3v.serve.publish

    hub = FakeHub()
    monkeypatch.setattr(phi3v.serve.publish, "hub_api", hub)
    adapter = make_adapter(tiny_dir, tmp_path / "adapter")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "eval_after.json").write_text("{}")  # predictions stay private
    out = export_main([str(adapter), str(tmp_path / "merged"), "--push_to_hub", "me/phi35v-ucf", "--private"])
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1:] == ("me/phi35v-ucf", {"private": True, "exist_ok": True, "repo_type": "model"})
    upload = hub.calls[1][2]
    assert upload["folder_path"] == str(out) and upload["repo_id"] == "me/phi35v-ucf"
    assert upload["allow_patterns"] == sorted(p.name for p in out.iterdir() if p.name != "eval_after.json")
    assert "README.md" in upload["allow_patterns"] and "eval_after.json" not in upload["allow_patterns"]
    card = (out / "README.md").read_text()
    assert f"- **Base model**: {tiny_dir}" in card and "| accuracy | 0.2500 | 0.8750 |" in card
    assert "base_model:" not in card  # a local folder is no Hub id
    assert "python finetune_hf_trainer_ucf101.py --data_dir /data/ucf101 --use_lora\n" in card
    assert f"python -m phi3v.export {adapter} {tmp_path / 'merged'} --push_to_hub me/phi35v-ucf --private" in card
    assert "- **Tuning mode**: lora, adapter merged into the base by phi3v.export (bfloat16)" in card


@pytest.mark.slow
def test_training_outputs_and_trainer_push_to_hub(tiny_dir, ucf_data, tmp_path, monkeypatch):
    """Full mode: the output and each checkpoint in the serving layout; --push_to_hub creates the repo before
    training and uploads the model files once, at the end, with the evaluation in the card."""
    import finetune_hf_trainer_ucf101 as ucf101
    import phi3v.serve.publish
    from tests.conftest import ucf_args

    hub = FakeHub()
    monkeypatch.setattr(phi3v.serve.publish, "hub_api", hub)
    monkeypatch.setattr("phi3v.train.publishing.hub_api", hub)
    base = base_with_code(tiny_dir, tmp_path / "base")
    out = tmp_path / "full"
    ucf101.main(ucf_args(base, ucf_data, out, "--max_steps", "1", "--save_steps", "1", "--eval_samples", "2",
                         "--push_to_hub", "--hub_model_id", "me/phi35v-full", "--hub_private_repo", "true"))
    for folder in (out, out / "checkpoint-1"):
        assert read(folder, "config.json")["auto_map"] == OFFICIAL_CONFIG_MAP
        assert read(folder, "processor_config.json")["auto_map"] == {"AutoProcessor": OFFICIAL_PROCESSOR_MAP[
            "AutoProcessor"]}
        assert read(folder, "generation_config.json")["eos_token_id"] == [2, 32000, 32007]
        assert all((folder / name).read_text() == code for name, code in STAND_IN_CODE.items())
    # the repo is created when the Trainer starts (exist_ok at upload time); no push per checkpoint
    assert [c[0] for c in hub.calls] == ["create_repo", "create_repo", "upload_folder"]
    assert hub.calls[0][1] == "me/phi35v-full" and hub.calls[0][2]["private"] is True
    uploaded = hub.calls[2][2]["allow_patterns"]
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json", "modeling_phi3_v.py",
            "all_results.json"} <= set(uploaded)
    assert not [name for name in uploaded if name.startswith(("checkpoint", "eval", "trainer_state", "training_args"))]
    card = (out / "README.md").read_text()
    metrics = read(out, "all_results.json")
    assert f"| accuracy | {metrics['eval_before_accuracy']:.4f} | {metrics['eval_after_accuracy']:.4f} |" in card
    assert f"- **Base model**: {base}" in card and "- **Tuning mode**: full" in card
    assert "python finetune_hf_trainer_ucf101.py --model_name_or_path" in card and "--push_to_hub" in card
    assert "train examples 12" in card and f"data_dir {ucf_data}" in card
    assert read(out, "run_info.json")["mode"] == "full"


@pytest.mark.slow
def test_trainer_push_to_hub_of_a_lora_run_uploads_the_merged_model(tiny_dir, ucf_data, tmp_path, monkeypatch):
    import finetune_hf_trainer_ucf101 as ucf101
    import phi3v.serve.publish
    from tests.conftest import ucf_args

    hub = FakeHub()
    monkeypatch.setattr(phi3v.serve.publish, "hub_api", hub)
    monkeypatch.setattr("phi3v.train.publishing.hub_api", hub)
    out = tmp_path / "lora"
    ucf101.main(ucf_args(tiny_dir, ucf_data, out, "--use_lora", "--lora_rank", "4", "--max_steps", "1",
                         "--no_eval_before_training", "--no_eval_after_training", "--push_to_hub"))
    upload = hub.calls[-1][2]
    assert upload["folder_path"] == str(out / "merged") and hub.calls[0][1] == "lora"  # repo named after the dir
    assert "model.safetensors" in upload["allow_patterns"] and "adapter_config.json" not in upload["allow_patterns"]
    assert read(out / "merged", "processor_config.json")["auto_map"]["AutoProcessor"].startswith(
        "microsoft/Phi-3.5-vision-instruct--")  # the tiny base has no *.py: the official code on the Hub
    card = (out / "merged" / "README.md").read_text()
    assert "- **Tuning mode**: lora, adapter merged into the base" in card and "No evaluation was recorded." in card


def serving_snippet(marker: str) -> str:
    """The ```py block of the README's Serving section that contains `marker`."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Serving\n", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in re.findall(r"```py\n(.*?)```", section, flags=re.S) if marker in b]
    return block


def test_readme_serving_snippet_for_transformers_5(exported, tmp_path, capsys):
    _, _, out = exported
    make_image(320, 240).save(tmp_path / "photo.jpg")
    code = serving_snippet("from phi3v import").replace('"output/merged"', repr(str(out)))
    exec(code.replace('"photo.jpg"', repr(str(tmp_path / "photo.jpg"))), {})
    assert capsys.readouterr().out.strip()  # an answer was printed
