"""Attention per tower: --attn_implementation is the language model's; the CLIP tower runs sdpa unless
--vision_attn_implementation says otherwise (the official code's "eager" applies to its language model only)."""

from __future__ import annotations

import pytest
import torch

from phi3v import Phi3VForCausalLM
from tests.conftest import make_image
from tests.test_model_loading import parse


def sdpa_calls(monkeypatch) -> list[str]:
    """Record every call of torch's scaled_dot_product_attention (what the "sdpa" implementation runs)."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append("sdpa")
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("lm,vision,lm_uses_sdpa,clip_uses_sdpa", [
    ("eager", None, False, True),  # the default for the tower: sdpa, whatever the LM uses
    ("sdpa", None, True, True),
    ("sdpa", "eager", True, False),
    ("eager", "eager", False, False),
])
def test_each_tower_runs_its_own_attention(tiny_dir, processor, monkeypatch, lm, vision, lm_uses_sdpa,
                                           clip_uses_sdpa):
    kwargs = {"vision_attn_implementation": vision} if vision else {}
    model = Phi3VForCausalLM.from_pretrained(tiny_dir, attn_implementation=lm, **kwargs).eval()
    assert model.config._attn_implementation == lm
    assert model.config.vision_config._attn_implementation == (vision or "sdpa")
    calls = sdpa_calls(monkeypatch)
    with torch.no_grad():
        model.model.vision_embed_tokens.clip_features(torch.randn(2, 3, 336, 336))
        clip_calls = len(calls)
        model(**processor("<|user|>\nHello<|end|>\n<|assistant|>\n"))  # text only: the LM alone
    assert clip_calls == (model.model.vision_embed_tokens.num_layers_used if clip_uses_sdpa else 0)
    assert len(calls) - clip_calls == (model.config.num_hidden_layers if lm_uses_sdpa else 0)


def test_towers_agree_across_implementations(tiny_dir, processor):
    inputs = processor("<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n", [make_image(500, 300)])
    logits = []
    for lm, vision in [("sdpa", "sdpa"), ("eager", "sdpa"), ("sdpa", "eager")]:
        model = Phi3VForCausalLM.from_pretrained(tiny_dir, attn_implementation=lm,
                                                 vision_attn_implementation=vision).eval()
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    assert all(torch.allclose(logits[0], other, atol=1e-5) for other in logits[1:])


@pytest.mark.parametrize("flags,lm,vision", [
    ([], "sdpa", "sdpa"),
    (["--attn_implementation", "eager"], "eager", "sdpa"),
    (["--vision_attn_implementation", "eager"], "sdpa", "eager"),
    (["--attn_implementation", "eager", "--vision_attn_implementation", "eager"], "eager", "eager"),
])
def test_recipe_flags_reach_each_tower(tiny_dir, tmp_path, flags, lm, vision):
    from phi3v.train.loading import load_model

    model_args, training_args = parse(tiny_dir, tmp_path, flags)
    model = load_model(model_args, training_args)
    assert model.config._attn_implementation == lm
    clip = model.model.vision_embed_tokens.img_processor.vision_model
    assert clip.encoder.layers[0].self_attn.config._attn_implementation == vision


def test_bad_vision_attention_flag_is_refused(tiny_dir, tmp_path):
    with pytest.raises(SystemExit):
        parse(tiny_dir, tmp_path, ["--vision_attn_implementation", "flash"])
