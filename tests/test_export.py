"""The merged export's weights (phi3v.export merges tensor by tensor from the safetensors files, never holding the
model): against base + alpha/r * B @ A computed here from the two checkpoints' files, against peft's own merge for
DoRA, rsLoRA and modules_to_save, and laid out as transformers' save_pretrained lays out the merged model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

from phi3v import Phi3VForCausalLM, Phi3VProcessor
from phi3v.models.phi3_v.layout import complete_layout
from phi3v.serve.export import main as export_main
from tests.test_serving import make_adapter


def export(adapter, out, dtype):
    return export_main([str(adapter), str(out), "--dtype", dtype, "--no_remote_code_files"])


def test_bf16_weights_are_base_plus_scaled_lora(tiny_dir, tmp_path):
    """Every tensor of a bf16 export, bit for bit: the base's fp32 weight W plus (alpha / r) * B @ A in fp32, rounded
    once to bf16. Exact, not within a tolerance: the export does these same fp32 operations, and this adapter's
    alpha / r = 2 is a power of two, so the product's rounding does not depend on where the scale is applied. An
    export that rounds twice (the delta to bf16, then the sum), as peft's in-place merge into a bf16 model does,
    differs in ~30% of the adapted values; a wrong scale in nearly all."""
    adapter = make_adapter(tiny_dir, tmp_path / "adapter")  # rank 4, alpha 8, on layer 0's qkv_proj and lm_head
    out = export(adapter, tmp_path / "merged", "bfloat16")
    base, lora = load_file(tiny_dir / "model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(base)
    adapted = []
    for name, weight in base.items():
        module = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{module}.lora_A.weight" in lora:
            adapted.append(name)
            weight = weight + 8 / 4 * (lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"])
        assert merged[name].dtype == torch.bfloat16 and torch.equal(merged[name], weight.to(torch.bfloat16)), name
    assert sorted(adapted) == ["lm_head.weight", "model.layers.0.self_attn.qkv_proj.weight"]
    assert not torch.equal(merged["lm_head.weight"], base["lm_head.weight"].to(torch.bfloat16))  # the adapter counts


def test_dora_rslora_and_modules_to_save_merge_as_peft_merges_them(tiny_dir, tmp_path):
    """fp32 export of an adapter with every option the recipes offer: equal to peft's merge_and_unload, and the
    logits of the reloaded export equal the unmerged adapter model's."""
    targets = ["model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    config = LoraConfig(r=4, lora_alpha=6, use_dora=True, use_rslora=True, init_lora_weights=False,
                        target_modules=targets, modules_to_save=["model.layers.0.mlp.gate_up_proj"])
    torch.manual_seed(0)
    model = get_peft_model(Phi3VForCausalLM.from_pretrained(tiny_dir), config)
    with torch.no_grad():  # magnitudes and the module trained in full away from their initial values
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                param.mul_(1 + torch.rand_like(param))
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)  # and lm_head's base weight (base_layer)
    Phi3VProcessor.from_pretrained(tiny_dir).save_pretrained(tmp_path / "adapter")
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {"base_model.model.model.layers.0.mlp.gate_up_proj.weight", "base_model.model.lm_head.base_layer.weight",
            "base_model.model.lm_head.lora_magnitude_vector"} <= set(stored)

    out = export(tmp_path / "adapter", tmp_path / "merged", "float32")
    unmerged = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter").eval()
    reference = PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_dir),
                                          tmp_path / "adapter").merge_and_unload().state_dict()
    base = load_file(tiny_dir / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, msg=name)
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight",
                 "model.layers.0.mlp.gate_up_proj.weight"):
        assert not torch.allclose(merged[name], base[name], atol=1e-3), name
    exported, processor = Phi3VForCausalLM.from_pretrained(out).eval(), Phi3VProcessor.from_pretrained(out)
    inputs = processor("<|user|>\nWhat?<|end|>\n<|assistant|>\n")
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, unmerged(**inputs).logits, atol=1e-5, rtol=1e-5)


def read(folder, name):
    return json.loads((folder / name).read_text())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_shards_index_and_configs_are_what_save_pretrained_writes(tiny_dir, tmp_path, monkeypatch, dtype):
    """The merged model of peft, cast and saved by transformers (what the export did before it streamed): the same
    shard files holding the same tensors, the same index, config.json and generation_config.json."""
    import phi3v.models.phi3_v.modeling

    monkeypatch.setattr(phi3v.models.phi3_v.modeling, "MAX_SHARD_SIZE", "3MB")  # the tiny model is 8.5 MB in bf16
    adapter = make_adapter(tiny_dir, tmp_path / "adapter")
    out = export(adapter, tmp_path / "merged", dtype)
    saved = tmp_path / "saved"
    PeftModel.from_pretrained(Phi3VForCausalLM.from_pretrained(tiny_dir), adapter).merge_and_unload().to(
        getattr(torch, dtype)).save_pretrained(saved)
    complete_layout(saved, str(tiny_dir), remote_code_files=False)
    shards = sorted(p.name for p in saved.glob("*.safetensors"))
    assert len(shards) >= 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        assert read(out, name) == read(saved, name), name
    for shard in shards:
        with safe_open(out / shard, "pt") as ours, safe_open(saved / shard, "pt") as theirs:
            assert ours.metadata() == theirs.metadata() and sorted(ours.keys()) == sorted(theirs.keys())
            for name in theirs.keys():
                assert torch.equal(ours.get_tensor(name), theirs.get_tensor(name)), name
