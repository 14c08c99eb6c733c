"""Generation does the image work once per prompt and uses a preallocated KV cache (bench/generation.py measures
the speed); the tokens are those of a plain greedy loop without any cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from phi3v.models.phi3_v.kv_cache import AppendLayer
from tests.conftest import greedy_by_full_forwards, make_image


def prompt(processor, images):
    tags = "".join(f"<|image_{k}|>\n" for k in range(1, len(images) + 1))
    return processor(f"<|user|>\n{tags}What is it?<|end|>\n<|assistant|>\n", images)


def test_decoding_never_runs_clip_again(tiny_model, processor):
    inputs = prompt(processor, [make_image(500, 300), make_image(200, 400, seed=1)])
    vision_calls, caches = [], []
    hook = tiny_model.model.vision_embed_tokens.register_forward_hook(lambda *args: vision_calls.append(1))
    cache_hook = tiny_model.register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(type(kwargs.get("cache"))), with_kwargs=True)
    try:
        out = tiny_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    finally:
        hook.remove()
        cache_hook.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    assert len(vision_calls) == 1  # before the prefill; never during the 6 steps
    assert len(caches) == 6 and all(cache is DynamicCache for cache in caches)
    assert all(type(layer) is AppendLayer for layer in out_cache(tiny_model, inputs).layers)


def test_generate_equals_a_plain_greedy_loop(tiny_model, processor):
    inputs = prompt(processor, [make_image(700, 350)])
    steps = 5
    out = tiny_model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    assert torch.equal(out, greedy_by_full_forwards(tiny_model, inputs, steps,
                                                    tiny_model.generation_config.eos_token_id))


def test_a_cache_the_caller_chooses_is_kept(tiny_model, processor):
    inputs = prompt(processor, [make_image(300, 300)])
    caches = []
    hook = tiny_model.register_forward_pre_hook(
        lambda module, args, kwargs: caches.append(type(kwargs.get("cache"))), with_kwargs=True)
    try:
        tiny_model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                            cache_implementation="dynamic")
    finally:
        hook.remove()
    assert caches and all(cache is DynamicCache for cache in caches)
    assert all(type(layer) is not AppendLayer for layer in out_cache(tiny_model, inputs, "dynamic").layers)


def out_cache(model, inputs, cache_implementation=None):
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
    return model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, **extra).cache


def test_append_layer_returns_what_concatenation_returns():
    layer, keys, values = AppendLayer(), [], []
    for step, length in enumerate([5, 1, 1, 300, 1]):  # 300: past the spare room, so the buffer grows
        k, v = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
        keys.append(k)
        values.append(v)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, torch.cat(keys, dim=-2)) and torch.equal(got_v, torch.cat(values, dim=-2)), step
    assert layer.get_seq_length() == 308
    layer.crop(-8)  # crop replaces the view: the next update starts from the cropped length
    keys[-1], keys[-2] = keys[-2][..., :-7, :], torch.zeros(2, 3, 0, 4)
    k = torch.randn(2, 3, 1, 4)
    assert torch.equal(layer.update(k, k)[0], torch.cat([*keys, k], dim=-2))
