"""The native model: checkpoint layout, image-feature placement, parity with transformers' Phi3/CLIP, generation."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM

from phi3v import Phi3VConfig, Phi3VForCausalLM
from phi3v.models.phi3_v.image_embedding import Phi3VImageEmbedding
from phi3v.models.phi3_v.modeling import supervised_lm_loss
from phi3v.models.phi3_v.tiny import tiny_config
from tests.conftest import greedy_by_full_forwards, make_image

# The official checkpoint's tensor names and shapes (from the spec; derived from the official module tree).
KEYS_TSV = Path(__file__).resolve().parent / "assets" / "phi3v_checkpoint_keys.tsv"


def official_keys() -> dict[str, list[int]]:
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines() if line and not line.startswith("#")]
    return {name: json.loads(shape) for name, shape in rows}


def test_full_size_state_dict_is_the_official_key_list():
    with torch.device("meta"):
        model = Phi3VForCausalLM(Phi3VConfig.official())
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert ours == official_keys()
    assert sum(t.numel() for t in model.state_dict().values()) == 4_146_621_440


def test_official_config_fields():
    config = Phi3VConfig.official()
    assert config._attn_implementation is None  # the hub's "flash_attention_2" is not inherited
    assert config.rope_parameters["rope_type"] == "longrope"
    assert len(config.rope_parameters["short_factor"]) == 48
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24
    saved = config.to_dict()
    official = json.loads(Path("phi3v/models/phi3_v/configs/phi-3.5-vision-instruct.json").read_text())
    assert saved["rope_scaling"] == official["rope_scaling"]
    assert "vision_config" not in saved and "rope_parameters" not in saved
    for key in ["embd_layer", "img_processor", "vocab_size", "hidden_size", "sliding_window", "rope_theta",
                "original_max_position_embeddings", "max_position_embeddings", "pad_token_id", "eos_token_id"]:
        assert saved[key] == official[key], key
    assert Phi3VConfig(**saved).to_dict() == saved


def test_language_model_weights_load_into_transformers_phi3(tiny_model, processor):
    config = tiny_model.config
    text_config = Phi3Config(
        **{k: getattr(config, k) for k in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                           "original_max_position_embeddings", "rms_norm_eps", "sliding_window",
                                           "pad_token_id", "bos_token_id", "eos_token_id"]},
        rope_parameters=copy.deepcopy(config.rope_parameters), attn_implementation="sdpa",
    )
    phi3 = Phi3ForCausalLM(text_config).eval()
    lm_state = {k: v for k, v in tiny_model.state_dict().items() if ".vision_embed_tokens." not in k}
    phi3.load_state_dict(lm_state, strict=True)
    ids = processor("<|user|>\nHello there<|end|>\n<|assistant|>\n")["input_ids"]
    with torch.no_grad():
        assert torch.equal(phi3(ids).logits, tiny_model(ids).logits)


def hand_built_embedding():
    """An image embedding whose CLIP is replaced by features that encode (crop id, patch row, patch col)."""
    embedding = Phi3VImageEmbedding(tiny_config())
    embedding.img_projection = nn.Identity()
    with torch.no_grad():
        embedding.glb_GN.fill_(-7.0)
        embedding.sub_GN.fill_(-9.0)
    seen = []

    def fake_clip(crops):  # crop tensors are filled with their id
        ids = crops[:, 0, 0, 0]
        seen.extend(ids.tolist())
        patch = torch.arange(576)
        features = torch.zeros(len(crops), 576, 32)
        features[:, :, 0] = ids[:, None]
        features[:, :, 1] = (patch // 24).float()
        features[:, :, 2] = (patch % 24).float()
        return features

    embedding.clip_features = fake_clip
    return embedding, seen


def expected_token(crop_id, row, col):
    """The 4C merged vector of merged position (row, col): patches (2r,2c) (2r,2c+1) (2r+1,2c) (2r+1,2c+1)."""
    vector = torch.zeros(128)
    for slot, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        vector[32 * slot: 32 * slot + 3] = torch.tensor([crop_id, 2 * row + dy, 2 * col + dx], dtype=torch.float)
    return vector


def test_merge_interleave_and_separators_with_hand_built_features():
    embedding, seen = hand_built_embedding()
    grids = [(2, 3), (1, 1)]  # image 0: 2 rows x 3 cols of crops; image 1: one crop
    num_crops = 6
    pixel_values = torch.zeros(2, num_crops + 1, 3, 336, 336)
    for i in range(2):
        for j in range(num_crops + 1):
            pixel_values[i, j] = 100 * i + j  # padding crops too: they must never reach CLIP
    image_sizes = torch.tensor([[rows * 336, cols * 336] for rows, cols in grids])
    out = embedding(pixel_values, image_sizes)

    expected = []
    for i, (rows, cols) in enumerate(grids):
        for r in range(12 * rows):
            for c in range(12 * cols):
                crop = 1 + (r // 12) * cols + (c // 12)  # row-major crop order
                expected.append(expected_token(100 * i + crop, r % 12, c % 12))
            expected.append(torch.full((128,), -9.0))  # sub_GN ends every row of the sub grid
        expected.append(torch.full((128,), -7.0))  # glb_GN once, between the sub grid and the global view
        for r in range(12):
            for c in range(12):
                expected.append(expected_token(100 * i, r, c))
            expected.append(torch.full((128,), -9.0))  # the global grid's newline is sub_GN too
    assert torch.equal(out, torch.stack(expected))
    assert out.shape[0] == (6 + 1) * 144 + 1 + 3 * 12 + 313  # the token-count formula, per image
    assert seen == [0, 1, 2, 3, 4, 5, 6, 100, 101]  # real crops only


def test_clip_feature_layer_is_hidden_states_minus_two(tiny_model):
    embedding = tiny_model.model.vision_embed_tokens
    crops = torch.randn(3, 3, 336, 336)
    with torch.no_grad():
        reference = embedding.img_processor.vision_model(crops, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.allclose(embedding.clip_features(crops), reference, atol=1e-6)


def test_embedding_matches_a_literal_reading_of_the_spec(tiny_model):
    """All crops through CLIP, then per-patch loops: the official algorithm written without reshapes."""
    embedding = tiny_model.model.vision_embed_tokens
    pixel_values = torch.randn(2, 5, 3, 336, 336)
    image_sizes = torch.tensor([[336, 1344], [672, 672]])  # grids 1x4 and 2x2
    with torch.no_grad():
        out = embedding(pixel_values, image_sizes)
        clip = embedding.img_processor.vision_model
        hidden = clip(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states[-2][:, 1:]
        hidden = hidden.reshape(2, 5, 576, 32)
        tokens = []

        def merged(image, crop, r, c):
            return torch.cat([hidden[image, crop, (2 * r + dy) * 24 + 2 * c + dx] for dy in (0, 1) for dx in (0, 1)])

        for i, (h, w) in enumerate(image_sizes.tolist()):
            rows, cols = h // 336, w // 336
            for r in range(12 * rows):
                tokens += [merged(i, 1 + (r // 12) * cols + c // 12, r % 12, c % 12) for c in range(12 * cols)]
                tokens.append(embedding.sub_GN.flatten())
            tokens.append(embedding.glb_GN.flatten())
            for r in range(12):
                tokens += [merged(i, 0, r, c) for c in range(12)] + [embedding.sub_GN.flatten()]
        reference = embedding.img_projection(torch.stack(tokens))
    assert torch.allclose(out, reference, atol=1e-6)


def two_image_inputs(processor):
    prompt = "<|user|>\n<|image_1|>\n<|image_2|>\nWhat differs?<|end|>\n<|assistant|>\n"
    return processor(prompt, [make_image(2000, 500), make_image(640, 480, seed=1)])


def test_placeholder_feature_mismatch_raises(tiny_model, processor):
    inputs = two_image_inputs(processor)
    inputs["input_ids"] = inputs["input_ids"][:, 5:]  # lose a few placeholders
    with pytest.raises(ValueError, match="image placeholders but the 2 image"):
        tiny_model(**inputs)
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model(input_ids=inputs["input_ids"])


@pytest.mark.parametrize("max_shard_size", [None, "2MB"])
def test_save_load_round_trip(tiny_model, processor, tmp_path, max_shard_size):
    inputs = two_image_inputs(processor)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    tiny_model.save_pretrained(tmp_path, **kwargs)
    if max_shard_size:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert set(index["weight_map"]) == set(tiny_model.state_dict())
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, tiny_model(**inputs).logits)


def test_sdpa_and_eager_agree(tiny_dir, processor):
    inputs = two_image_inputs(processor)
    logits = {}
    for attn in ["sdpa", "eager"]:
        model = Phi3VForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn).eval()
        assert model.config._attn_implementation == attn
        assert model.config.vision_config._attn_implementation == "sdpa"  # the LM's choice (tests/test_attention*)
        with torch.no_grad():
            logits[attn] = model(**inputs).logits
    assert torch.allclose(logits["sdpa"], logits["eager"], atol=1e-5)


def test_flash_attention_without_the_package_is_a_clear_error(tiny_dir):
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="needs the flash-attn package .* use 'sdpa'"):
        Phi3VForCausalLM.from_pretrained(tiny_dir, attn_implementation="flash_attention_2")


def test_greedy_generate_with_cache_equals_without(tiny_model, processor):
    inputs = two_image_inputs(processor)
    end = processor.end_token_ids()
    runs = [tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache, eos_token_id=end,
                                min_new_tokens=6) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], greedy_by_full_forwards(tiny_model, inputs, 6, end))  # and to decoding by hand


def test_supervised_loss_equals_full_logits_loss(tiny_model, processor):
    inputs = two_image_inputs(processor)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -6:] = torch.tensor([5, 6, 7, 8, 32007, 32000])
    model = copy.deepcopy(tiny_model).train()
    full = model(**inputs).logits  # (B, L, vocab) without labels
    reference = torch.nn.functional.cross_entropy(full[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    (ref_grad,) = torch.autograd.grad(reference, model.lm_head.weight)
    out = model(**inputs, labels=labels)
    assert out.logits is None
    assert torch.allclose(out.loss, reference, atol=1e-6)
    (grad,) = torch.autograd.grad(out.loss, model.lm_head.weight)
    assert torch.allclose(grad, ref_grad, atol=1e-7)
    hidden = torch.randn(1, 10, 64)
    assert torch.allclose(supervised_lm_loss(hidden, labels[:, -10:], model.lm_head, num_items_in_batch=12),
                          supervised_lm_loss(hidden, labels[:, -10:], model.lm_head) * 6 / 12)


def test_one_training_step_reaches_every_tower(tiny_model, processor):
    model = copy.deepcopy(tiny_model).train()
    inputs = two_image_inputs(processor)
    labels = inputs["input_ids"].clone()
    labels[labels < 0] = -100
    loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    embedding = model.model.vision_embed_tokens
    clip = embedding.img_processor.vision_model
    for name, param in [("clip patch embedding", clip.embeddings.patch_embedding.weight),
                        ("clip layer 0", clip.encoder.layers[0].mlp.fc1.weight),
                        ("projector", embedding.img_projection[0].weight), ("sub_GN", embedding.sub_GN),
                        ("glb_GN", embedding.glb_GN), ("LM layer", model.model.layers[1].mlp.down_proj.weight),
                        ("embed_tokens", model.model.embed_tokens.weight), ("lm_head", model.lm_head.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # the last CLIP layer and post_layernorm are in the checkpoint but never in the computation
    unused = {id(p) for p in embedding.unused_parameters()}
    assert unused and all(p.grad is None for p in model.parameters() if id(p) in unused)
    assert all(p.grad is not None for p in model.parameters() if id(p) not in unused)


def test_gradient_checkpointing_on_both_towers(tiny_model, processor):
    inputs = two_image_inputs(processor)
    labels = inputs["input_ids"].clone()
    labels[labels < 0] = -100
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_model).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            clip = model.model.vision_embed_tokens.img_processor.vision_model
            assert all(layer.gradient_checkpointing for layer in clip.encoder.layers)
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(**inputs, labels=labels).loss.backward()
        grads.append(model.model.vision_embed_tokens.img_projection[0].weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_text_only_and_mixed_batch(tiny_model, processor):
    """A text-only row and an image row in one (right-padded) batch give each row's logits of running it alone."""
    from phi3v.models.phi3_v.collator import Phi3VCollator

    text = processor("<|user|>\nHi there, what is new?<|end|>\n<|assistant|>\n")
    image = processor("<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n", [make_image(300, 200)])
    examples = [{"input_ids": x["input_ids"][0], "pixel_values": x.get("pixel_values"),
                 "image_sizes": x.get("image_sizes"), "sample_id": str(i)} for i, x in enumerate([text, image])]
    batch = Phi3VCollator(processor.tokenizer.pad_token_id)(examples)
    assert batch["pixel_values"].shape[0] == 1  # one image in the batch, for row 1
    with torch.no_grad():
        both = tiny_model(**{k: v for k, v in batch.items() if k != "sample_ids"}).logits
        for row, alone in enumerate([text, image]):
            length = alone["input_ids"].shape[1]
            assert torch.allclose(both[row, :length], tiny_model(**alone).logits[0], atol=1e-5), row


def test_image_features_land_on_the_placeholders(tiny_model, processor):
    """Embedding rows, position by position: text ids get their embed_tokens row, the k-th placeholder (batch row
    first, then position) gets row k of the vision features, and nothing else changes."""
    model = tiny_model.model
    prompts = [("<|user|>\n<|image_1|>\nWhat?<|end|>\n<|assistant|>\n", [make_image(300, 200)]),
               ("<|user|>\nCompare <|image_1|> with <|image_2|> please<|end|>\n<|assistant|>\n",
                [make_image(500, 700, seed=1), make_image(336, 336, seed=2)])]
    inputs = [processor(text, images) for text, images in prompts]
    length = max(x["input_ids"].shape[1] for x in inputs)
    ids = torch.full((2, length), 32000)
    for row, x in enumerate(inputs):
        ids[row, length - x["input_ids"].shape[1]:] = x["input_ids"][0]  # left padding, as in generation
    pixel_values = torch.cat([x["pixel_values"] for x in inputs])
    image_sizes = torch.cat([x["image_sizes"] for x in inputs])
    with torch.no_grad():
        embedded = model.embed(ids, pixel_values, image_sizes)
        features = model.vision_embed_tokens(pixel_values, image_sizes)
        table = model.embed_tokens.weight
    k = 0
    for row in range(2):
        for position in range(length):
            token = int(ids[row, position])
            if token < 0:
                assert torch.equal(embedded[row, position], features[k]), (row, position)
                k += 1
            else:
                assert torch.equal(embedded[row, position], table[token]), (row, position)
    assert k == features.shape[0] == (ids < 0).sum()


def test_hub_id_offline_says_pass_a_local_directory():
    with pytest.raises(OSError, match="pass the local directory"):
        Phi3VForCausalLM.from_pretrained("microsoft/Phi-3.5-vision-instruct")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_generation_across_the_4096_token_rope_switch(tiny_model, processor):
    """Crossing 4096 tokens: the cache is dropped once and the prompt (images included) recomputed."""
    image = make_image(336, 336)
    template = "<|user|>\n<|image_1|>\n{}<|end|>\n<|assistant|>\n"
    base, per_word = (processor.num_tokens(template.format(" is" * n), [image.size]) for n in (0, 1))
    inputs = processor(template.format(" is" * ((4090 - base) // (per_word - base))), [image])
    length = inputs["input_ids"].shape[1]
    assert 4080 < length < 4096, length
    steps = 4098 - length + 2  # the sequence passes 4096 during generation
    vision_calls, fed = [], []
    hook = tiny_model.model.vision_embed_tokens.register_forward_hook(lambda *args: vision_calls.append(1))
    feed_hook = tiny_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    cached = tiny_model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    hook.remove()
    feed_hook.remove()
    assert [n for n in fed if n > 1] == [length, 4097]  # the prefill, and the recomputation with long factors
    assert len(vision_calls) == 1  # CLIP once per prompt: the recomputation reuses the prefill's image features
    assert torch.equal(cached, greedy_by_full_forwards(tiny_model, inputs, steps,
                                                       tiny_model.generation_config.eos_token_id))


def test_text_only_batch_still_reaches_trainable_vision_parameters(tiny_model, processor):
    model = copy.deepcopy(tiny_model).train()
    text = processor("<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>")
    labels = text["input_ids"].clone()
    loss = model(**text, labels=labels).loss
    loss.backward()
    projector = model.model.vision_embed_tokens.img_projection[0].weight
    assert projector.grad is not None and projector.grad.abs().sum() == 0  # in the graph, with zero gradient
    with torch.no_grad():
        assert torch.equal(model(**text, labels=labels).loss, loss.detach())  # and the loss is unchanged


def test_loss_without_supervised_tokens_is_zero_not_nan(tiny_model):
    hidden = torch.randn(1, 6, 64, requires_grad=True)
    loss = supervised_lm_loss(hidden, torch.full((1, 6), -100), tiny_model.lm_head)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_dropping_trailing_padding_crops_changes_nothing(tiny_model, processor):
    """The collator cuts pixel_values to the largest real crop grid of the batch; the model reads only real crops."""
    small = processor("<|image_1|>x", [make_image(700, 350)])  # a 1x2 grid: 3 real crops of the 5 made
    assert small["pixel_values"].shape[1] == 5 and small["image_sizes"].tolist() == [[336, 672]]
    with torch.no_grad():
        full = tiny_model(**small).logits
        trimmed = tiny_model(input_ids=small["input_ids"], pixel_values=small["pixel_values"][:, :3],
                             image_sizes=small["image_sizes"]).logits
    assert torch.equal(full, trimmed)


@pytest.mark.parametrize("length,factors", [(4095, "short_factor"), (4096, "short_factor"),
                                            (4097, "long_factor"), (5000, "long_factor")])
def test_longrope_switches_after_4096_tokens(tiny_model, length, factors):
    """cos/sin of the official config against the spec's formula (section 6.2), written out here: inv_freq_j =
    1 / (f_j * 10000^(2j/96)) with f the short factors while the sequence is <= 4096 tokens and the long ones above,
    times sqrt(1 + ln 32 / ln 4096)."""
    official = json.loads(Path("phi3v/models/phi3_v/configs/phi-3.5-vision-instruct.json").read_text())
    rotary = type(tiny_model.model.rotary_emb)(Phi3VConfig.official())  # the model's own rotary, full-size config
    positions = torch.arange(length)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    f = torch.tensor(official["rope_scaling"][factors], dtype=torch.float64)
    inv_freq = 1.0 / (f * 10000 ** (torch.arange(0, 96, 2, dtype=torch.float64) / 96))
    angles = positions[0, -8:, None].double() * inv_freq  # the last 8 positions
    scale = 1.1902380714238083
    assert (1 + math.log(131072 / 4096) / math.log(4096)) ** 0.5 == pytest.approx(scale)
    expected_cos = torch.cat([angles.cos(), angles.cos()], dim=-1) * scale
    expected_sin = torch.cat([angles.sin(), angles.sin()], dim=-1) * scale
    assert torch.allclose(cos[0, -8:].double(), expected_cos, atol=2e-3)  # float32 angles at positions ~5000
    assert torch.allclose(sin[0, -8:].double(), expected_sin, atol=2e-3)


def test_a_loaded_model_stops_at_the_end_of_a_chat_turn(tiny_dir, tiny_model):
    """The checkpoint's generation_config says eos 2 (</s>), as the official file does; a loaded model also stops
    at <|endoftext|> (32000) and <|end|> (32007), which end every answer the chat template asks for (spec 5)."""
    saved = json.loads((Path(tiny_dir) / "generation_config.json").read_text())["eos_token_id"]
    assert saved == 2 and tiny_model.generation_config.eos_token_id == [2, 32000, 32007]
