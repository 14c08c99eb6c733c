"""Phi-4-multimodal-instruct (phi3v/models/phi4_mm) against independent implementations: transformers' native
Phi4MultimodalProcessor / Phi4MultimodalForCausalLM, peft, and values worked out by hand (see the notes in each test).

The tiny checkpoint (tests/conftest.py `phi4_dir`) has the real vocabulary (200,064), the real special-token ids and
the real SigLIP geometry (448-pixel crops, 14-pixel patches), so image token counts are the real ones; images here are
thin (448x28: 290-300 tokens) to keep the (tokens x 200k) logits of the native reference small.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalVisionAttention

from phi3v.data.conversation import Conversation, Turn, render
from phi3v.data.dataset import ConversationDataset
from phi3v.models.family import IMAGE_TAG
from phi3v.models.phi4_mm.modeling import Phi4MultimodalForCausalLM
from phi3v.models.phi4_mm.processing import num_image_tokens
from tests.conftest import make_image

IMAGE_TOKEN_ID, END, ENDOFTEXT = 200010, 200020, 199999  # <|image|>, <|end|>, <|endoftext|> (= pad) in the vocab


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def phi4_model(phi4_dir):
    """Ours, loaded as the recipes load it (vision LoRA merged); read-only for the tests."""
    return Phi4MultimodalForCausalLM.from_pretrained(phi4_dir).eval()


def bidirectional(model):
    """transformers' own fix-free class needs SigLIP's `is_causal` cleared by hand (notes section 4)."""
    for module in model.modules():
        if isinstance(module, Phi4MultimodalVisionAttention):
            module.is_causal = False
    return model


def native_copy(model) -> transformers.Phi4MultimodalForCausalLM:
    """transformers' own class with the same weights, SigLIP made bidirectional by hand."""
    native = transformers.Phi4MultimodalForCausalLM(model.config)
    native.load_state_dict(model.state_dict())
    return bidirectional(native).eval()


def native_text(text: str, processor) -> str:
    """The native processor's prompt: its image token in place of each <|image_k|> tag."""
    return IMAGE_TAG.sub(lambda m: processor.native.image_token, text)


def assert_same_batch(ours, theirs):
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def examples(processor, conversations):
    dataset = ConversationDataset(conversations, lambda c: c, processor)
    return [dataset[i] for i in range(len(conversations))]


def labelled_batch(processor):
    """Two conversations with images of different shapes (290 and 296 tokens): a padded batch with labels."""
    conversations = [Conversation("a", [Turn("Colour?", "red", [make_image(448, 28)])]),
                     Conversation("b", [Turn("Is it tall or wide?", "tall, I think", [make_image(14, 448, seed=1)])])]
    batch = processor.collator()(examples(processor, conversations))
    batch.pop("sample_ids")
    return batch


# ------------------------------------------------------------------------------------------------ 1. processor


def test_single_image_prompt_equals_native_processor(phi4_processor):
    text = "<|user|><|image_1|>\nWhat is this?<|end|><|assistant|>"
    image = make_image(300, 200)
    ours = phi4_processor(text, [image])
    theirs = phi4_processor.native(text=native_text(text, phi4_processor), images=[image], return_tensors="pt")
    assert_same_batch(ours, theirs)
    assert (ours["input_ids"] == IMAGE_TOKEN_ID).sum() == 460  # notes section 3: 300x200 -> 460 tokens
    assert ours["input_ids"][0, :3].tolist() == [200021, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID]  # <|user|>, then the run


def test_multi_image_conversation_equals_native_processor(phi4_processor):
    conversation = Conversation("m", [Turn("Compare them.", "The first is wider.",
                                           [make_image(448, 28), make_image(123, 877, seed=1)]),
                                      Turn("And <|image_1|>, this one?", "Square.", [make_image(60, 60, seed=2)])])
    text, images, _ = render(phi4_processor, conversation)
    assert IMAGE_TAG.findall(text) == ["1", "2", "3"]
    ours = phi4_processor(text, images)
    theirs = phi4_processor.native(text=native_text(text, phi4_processor), images=images, return_tensors="pt")
    assert_same_batch(ours, theirs)
    assert ours["image_pixel_values"].shape == (3, 3, 3, 448, 448)  # 123x877 has 1 + 2 crops, the others 1 + 1


def test_text_only_prompt_equals_native_processor(phi4_processor):
    text, images, _ = render(phi4_processor, Conversation("t", [Turn("Say hi.", "Hi!")]))
    assert images == []
    ours = phi4_processor(text)
    assert_same_batch(ours, phi4_processor.native(text=text, return_tensors="pt"))
    assert set(ours) == {"input_ids", "attention_mask"}


def test_collated_batch_equals_native_processor_on_the_list(phi4_processor):
    """Three examples (2 crops; 1 + 2 images of 5 and 3 crops; text only) collated, against one native call on the
    list of prompts with all images in order, right-padded."""
    samples = [("<|user|><|image_1|>\nOne?<|end|><|assistant|>", [make_image(300, 200)]),
               ("<|user|><|image_1|><|image_2|>\nTwo images, a longer question?<|end|><|assistant|>",
                [make_image(640, 480, seed=1), make_image(123, 877, seed=2)]),
               ("<|user|>No image.<|end|><|assistant|>", [])]
    encoded = []
    for i, (text, images) in enumerate(samples):
        out = phi4_processor(text, images or None)
        encoded.append({"input_ids": out["input_ids"][0], "sample_id": i,
                        **{k: v for k, v in out.items() if k.startswith("image_")}})
    batch = phi4_processor.collator()(encoded)
    assert batch.pop("sample_ids") == [0, 1, 2]
    theirs = phi4_processor.native(text=[native_text(t, phi4_processor) for t, _ in samples],
                                   images=[image for _, images in samples for image in images], padding=True,
                                   return_tensors="pt")
    assert_same_batch(batch, theirs)
    # how the native pads, by hand: right padding with <|endoftext|> (199999) and attention 0 ...
    lengths = [len(e["input_ids"]) for e in encoded]
    longest = max(lengths)
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (longest - length)
        assert (batch["input_ids"][row, length:] == ENDOFTEXT).all()
    # ... crops padded to the batch's largest image (5) with pixels 0 and mask 1
    assert batch["image_pixel_values"].shape == (3, 5, 3, 448, 448)
    for image, crops in enumerate((2, 5, 3)):
        assert (batch["image_pixel_values"][image, crops:] == 0).all()
        assert (batch["image_attention_mask"][image, crops:] == 1).all()
        assert (batch["image_pixel_values"][image, :crops].abs().sum((1, 2, 3)) > 0).all()
    assert batch["image_sizes"].tolist() == [[448, 448], [896, 896], [896, 448]]  # [H, W], notes section 3


def test_collator_pads_labels_and_left_pads_for_generation(phi4_processor):
    encoded = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "sample_id": "a"},
               {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "sample_id": "b"}]
    right = phi4_processor.collator()(encoded)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, ENDOFTEXT, ENDOFTEXT]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = phi4_processor.collator("left")(encoded)
    assert left["input_ids"].tolist() == [[5, 6, 7], [ENDOFTEXT, ENDOFTEXT, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# ------------------------------------------------------------------------------------------------ 2. token counts

# (width, height, dynamic_hd) -> tokens, measured with the native image processor (notes section 3)
KNOWN = {(448, 448, 36): 545, (300, 200, 36): 460, (123, 877, 36): 465, (640, 480, 36): 1065,
         (1000, 1000, 36): 2625, (4000, 300, 36): 1868, (1920, 1080, 36): 3918, (1920, 1080, 4): 753,
         (2000, 2000, 36): 6753}
SIZES = [*KNOWN, (20, 20, 36), (448, 14, 36), (14, 448, 36), (449, 449, 36), (2000, 30, 36), (30, 2000, 36),
         (3000, 3000, 36), (6000, 500, 36), (1000, 1000, 4), (900, 2000, 4), (2000, 900, 4), (1000, 600, 1),
         (333, 777, 2)]


def test_num_image_tokens_by_hand():
    # 448x448: one tile, 32x32 patches pooled 2x2 -> 16x16: 256 global + 16 newlines + 1 separator + 16 * (16 + 1)
    assert num_image_tokens(448, 448, 36) == 256 + 16 + 1 + 16 * 17 == 545
    # 640x480: 2x2 tiles, resized to 896x672: 48 patch rows -> 24 pooled rows of 32 + 1
    assert num_image_tokens(640, 480, 36) == 273 + 24 * 33 == 1065


@pytest.mark.parametrize("width,height,dynamic_hd", SIZES)
def test_num_image_tokens_equals_native_image_processor(width, height, dynamic_hd):
    native = transformers.Phi4MultimodalImageProcessor(dynamic_hd=dynamic_hd)
    count = native([Image.new("RGB", (width, height), (90, 120, 200))], return_tensors="pt")["num_img_tokens"][0]
    assert num_image_tokens(width, height, dynamic_hd) == int(count)
    if (width, height, dynamic_hd) in KNOWN:
        assert int(count) == KNOWN[width, height, dynamic_hd]


def test_num_tokens_without_pixels_equals_processed_length(phi4_processor):
    text = "<|user|><|image_1|><|image_2|>\nBoth?<|end|><|assistant|>"
    images = [make_image(640, 480), make_image(448, 28, seed=1)]
    length = phi4_processor(text, images)["input_ids"].shape[1]
    assert phi4_processor.num_tokens(text, [im.size for im in images]) == length


# ------------------------------------------------------------------------------------------------ 3. loss


def test_loss_equals_native_forward_loss(phi4_model, phi4_processor):
    batch = labelled_batch(phi4_processor)
    assert batch["attention_mask"].min() == 0  # padded
    native = native_copy(phi4_model)
    with torch.no_grad():
        theirs = native(**batch)  # the native forward's loss on its full (B, L, 200064) logits
        # with num_items_in_batch, the loss function that same forward calls (logits computed once, for speed)
        theirs_summed = native.loss_function(theirs.logits, batch["labels"], native.vocab_size,
                                             num_items_in_batch=torch.tensor(7))
        for num_items, reference in ((None, theirs.loss), (torch.tensor(7), theirs_summed)):
            extra = {} if num_items is None else {"num_items_in_batch": num_items}
            ours = phi4_model(**batch, **extra)
            assert ours.logits is None  # the LM head ran on the supervised tokens only
            assert torch.allclose(ours.loss, reference, atol=1e-5, rtol=1e-5), (num_items, ours.loss, reference)
    # by hand: num_items_in_batch turns the mean over the supervised tokens into sum / num_items
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean, summed = (phi4_model(**batch, **extra).loss for extra in ({}, {"num_items_in_batch": 7}))
    assert torch.allclose(summed * 7, mean * supervised, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ 4. SigLIP both ways


def test_siglip_attends_both_ways_under_sdpa(phi4_model):
    """Crops without a masked patch run SigLIP without a mask, where sdpa obeys `is_causal`: then no patch would see
    the last one. Perturbing the last patch must change earlier patches' features (in the layer the projector reads:
    hidden_states[feature_layer]). The tiny SigLIP's attention is sharp (random weights), so only some patches
    attend to the last one noticeably: the first patch's change underflows to 0, the check is on all earlier ones."""
    assert phi4_model.config.vision_config._attn_implementation == "sdpa"
    siglip = phi4_model.model.embed_tokens_extend.image_embed.img_processor
    layer = phi4_model.config.vision_config.feature_layer
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    perturbed = pixels.clone()
    perturbed[..., -14:, -14:] += 5.0  # the last patch (31, 31) of each crop
    with torch.no_grad():
        features, changed = (siglip(p, output_hidden_states=True).hidden_states[layer] for p in (pixels, perturbed))
    assert features.shape == (2, 1024, 32)
    moved = (features - changed).abs().amax(-1) > 1e-4  # (crop, patch)
    assert moved[:, -1].all()
    assert (moved[:, :-1].sum(-1) >= 5).all()  # 18-19 patches per crop with this seed; 0 if causal


def test_siglip_sdpa_equals_eager(phi4_dir, phi4_model, phi4_processor):
    """Eager attention never reads `is_causal`: an independent reference for SigLIP's sdpa."""
    eager = Phi4MultimodalForCausalLM.from_pretrained(phi4_dir, vision_attn_implementation="eager").eval()
    assert eager.config.vision_config._attn_implementation == "eager"
    inputs = phi4_processor("<|user|><|image_1|>\nWhat?<|end|><|assistant|>", [make_image(448, 448)])
    with torch.no_grad():  # the decoder's last hidden states (the logits are lm_head of them)
        ours, reference = (model.model(**inputs).last_hidden_state for model in (phi4_model, eager))
    assert torch.allclose(ours, reference, atol=1e-5)


def test_row_batched_equals_row_alone(phi4_model, phi4_processor):
    """Row a (448x448: no patch masked) alone runs SigLIP without a mask; batched with a padded image it runs with
    one. Its outputs must not depend on the company."""
    conversations = [Conversation("a", [Turn("What?", "a", [make_image(448, 448)])]),
                     Conversation("b", [Turn("And this?", "b", [make_image(448, 28, seed=1)])])]
    items = examples(phi4_processor, conversations)
    batch, alone = (phi4_processor.collator()(chosen) for chosen in (items, items[:1]))
    for inputs in (batch, alone):
        inputs.pop("sample_ids"), inputs.pop("labels")
    length = alone["input_ids"].shape[1]
    assert (batch["image_attention_mask"] == 0).any() and (alone["image_attention_mask"] == 1).all()
    with torch.no_grad():
        hidden_batch = phi4_model.model(**batch).last_hidden_state[0, :length]
        hidden_alone = phi4_model.model(**alone).last_hidden_state[0]
        assert torch.allclose(hidden_batch, hidden_alone, atol=1e-5)
        assert torch.allclose(phi4_model.lm_head(hidden_batch[-5:]), phi4_model.lm_head(hidden_alone[-5:]), atol=1e-5)


# ------------------------------------------------------------------------------------------------ 5, 8. vision LoRA


def peft_merged(phi4_dir, tmp_path) -> torch.nn.Module:
    """The tiny base (transformers' class) + its vision-lora/ through peft, merged. peft 0.21 silently skips keys
    without the `base_model.model.` prefix (notes section 4), so the adapter is rewritten with it."""
    from peft import PeftModel

    adapter = tmp_path / "vision-lora"
    adapter.mkdir()
    shutil.copy(phi4_dir / "vision-lora" / "adapter_config.json", adapter)
    weights = load_file(phi4_dir / "vision-lora" / "adapter_model.safetensors")
    save_file({f"base_model.model.{k}": v for k, v in weights.items()}, adapter / "adapter_model.safetensors")
    base = transformers.Phi4MultimodalForCausalLM.from_pretrained(phi4_dir)
    return bidirectional(PeftModel.from_pretrained(base, adapter).merge_and_unload()).eval()


def test_vision_lora_merge_equals_peft(phi4_dir, phi4_model, phi4_processor, tmp_path):
    merged = peft_merged(phi4_dir, tmp_path)
    ours, theirs = phi4_model.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-7), name
    # the merge changed exactly the adapter's targets (regex of the official adapter: qkv/o/gate_up/down of each
    # decoder layer; 2 layers here), nothing else
    unmerged = transformers.Phi4MultimodalForCausalLM.from_pretrained(phi4_dir).state_dict()
    changed = {name for name in ours if not torch.equal(ours[name], unmerged[name])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2)
                       for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    inputs = phi4_processor("<|user|><|image_1|>\nWhat?<|end|><|assistant|>", [make_image(448, 28)])
    with torch.no_grad():
        assert torch.allclose(phi4_model(**inputs).logits, merged(**inputs).logits, atol=1e-5)


def test_checkpoint_loads_natively_and_matches_with_the_adapter(phi4_dir, phi4_model, phi4_processor):
    """transformers' Auto classes load the tiny checkpoint as their own classes; with the built-in adapter attached
    the documented way (load_adapter, unmerged LoRA forward), their logits are ours."""
    native = transformers.AutoModelForCausalLM.from_pretrained(phi4_dir).eval()
    assert type(native) is transformers.Phi4MultimodalForCausalLM
    processor = transformers.AutoProcessor.from_pretrained(phi4_dir)
    assert type(processor) is transformers.Phi4MultimodalProcessor
    assert processor.image_token_id == IMAGE_TOKEN_ID == native.config.vision_config.image_token_id
    text = "<|user|><|image_1|>\nWhat?<|end|><|assistant|>"
    image = make_image(448, 28)
    inputs = phi4_processor(text, [image])
    assert_same_batch(inputs, processor(text=native_text(text, phi4_processor), images=[image], return_tensors="pt"))
    bidirectional(native)
    with torch.no_grad():
        without = native(**inputs).logits
        native.load_adapter(str(phi4_dir), adapter_name="vision", adapter_kwargs={"subfolder": "vision-lora"})
        with_adapter = native(**inputs).logits
        ours = phi4_model(**inputs).logits
    assert torch.allclose(ours, with_adapter, atol=1e-5)
    assert (ours - without).abs().max() > 1e-4  # the adapter matters: the base alone is not the vision model


# ------------------------------------------------------------------------------------------------ 6. audio


@pytest.mark.parametrize("with_labels", [False, True])
def test_audio_inputs_refused(phi4_model, with_labels):
    ids = torch.tensor([[200021, 200011, 200020, 200019]])
    extra = {"labels": ids} if with_labels else {}
    with pytest.raises(ValueError, match=r"audio inputs \(audio_input_features\) are not supported"):
        phi4_model(input_ids=ids, audio_input_features=torch.zeros(1, 16, 80), **extra)


# ------------------------------------------------------------------------------------------------ 7. labels


def test_rendered_conversation_and_supervised_tokens(phi4_processor):
    conversation = Conversation("c", [Turn("What colour?", "Red.", [make_image(448, 28)]),
                                      Turn("And the shape?", "Round.")], system="Be brief.")
    text, images, _ = render(phi4_processor, conversation)
    assert text == ("<|system|>Be brief.<|end|><|user|><|image_1|>\nWhat colour?<|end|><|assistant|>Red.<|end|>"
                    "<|user|>And the shape?<|end|><|assistant|>Round.<|end|><|endoftext|>")
    (example,) = examples(phi4_processor, [conversation])
    ids, labels = example["input_ids"], example["labels"]
    supervised = labels != -100
    assert torch.equal(labels[supervised], ids[supervised])
    assert phi4_processor.decode(labels[supervised]) == "Red.<|end|>Round.<|end|><|endoftext|>"
    assert not supervised[ids == IMAGE_TOKEN_ID].any()
    assert int((ids == IMAGE_TOKEN_ID).sum()) == num_image_tokens(448, 28, 36)
    # two supervised runs, each right after an <|assistant|> (200019)
    starts = [i for i in range(len(ids)) if supervised[i] and not supervised[i - 1]]
    assert len(starts) == 2 and all(ids[i - 1] == 200019 for i in starts)
    assert labels[-1] == ENDOFTEXT and labels[-2] == END
    assert phi4_processor.end_token_ids() == [END, ENDOFTEXT]


# ------------------------------------------------------------------------------------------------ 9. loading


MODES = {"full": [], "frozen_vision": ["--freeze_vision_model"], "lora": ["--use_lora", "--freeze_vision_model"],
         "lora_vision": ["--use_lora"]}


def group(name: str) -> str:
    """A parameter's group, from its path alone (tiny SigLIP: 2 layers, features from layer 0, so layer 1,
    post_layernorm and the pooling head never compute)."""
    if ".audio_embed." in name:
        return "audio"
    if ".lora_" in name:
        return "lora-vision" if ".image_embed." in name else "lora-language"
    if ".img_processor." in name:
        unused = ".encoder.layers.1." in name or ".post_layernorm." in name or ".head." in name
        return "siglip-unused" if unused else "siglip"
    return "projector" if ".image_embed." in name else "language"


EXPECTED = {  # group -> trainable in this mode
    "full": {"siglip": True, "projector": True, "language": True},
    "frozen_vision": {"siglip": False, "projector": False, "language": True},
    "lora": {"siglip": False, "projector": False, "language": False, "lora-language": True},
    "lora_vision": {"siglip": False, "projector": False, "language": False, "lora-language": True,
                    "lora-vision": True},
}


def load(phi4_dir, tmp_path, flags):
    from transformers import HfArgumentParser

    from phi3v.train.arguments import ModelArguments
    from phi3v.train.loading import load_model
    from phi3v.train.training_arguments import RecipeTrainingArguments

    model_args, training_args = HfArgumentParser((ModelArguments, RecipeTrainingArguments)) \
        .parse_args_into_dataclasses(args=["--model_name_or_path", str(phi4_dir), "--output_dir", str(tmp_path),
                                           "--lora_rank", "4", *flags])
    torch.manual_seed(0)
    return model_args, load_model(model_args, training_args).train()


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_trains_what_it_should(mode, phi4_dir, phi4_processor, tmp_path):
    model_args, model = load(phi4_dir, tmp_path, MODES[mode])
    assert model_args.tuning_mode == ("lora" if mode == "lora_vision" else mode)
    names = [name for name, _ in model.named_parameters()]
    expected = {**EXPECTED[mode], "audio": False, "siglip-unused": False}
    assert {group(n) for n in names} == set(expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in names:
        assert (name in trainable) == expected[group(name)], name
    if mode.startswith("lora"):  # adapters on Linear layers only, never lm_head (tied to the embeddings)
        wrapped = {path.removesuffix(".lora_A") for path, _ in model.named_modules() if path.endswith(".lora_A")}
        linear = {path for path, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in path
                  and ".audio_embed." not in path and group(path + ".") not in ("siglip-unused",)}
        base = {path.removesuffix(".base_layer") for path in linear if path.endswith(".base_layer")}
        assert wrapped == base and not any(p.endswith("lm_head") for p in wrapped)
        decoder = {p for p in base if ".layers." in p and ".image_embed." not in p}
        assert {p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in decoder} == {
            "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
        vision = {p for p in base if ".image_embed." in p}
        if mode == "lora":
            assert not vision
        else:  # every Linear of the layers in use and the projector: SigLIP layer 0's 6, up and down
            assert len(vision) == 6 + 2 and all(".encoder.layers.1." not in p for p in vision)
    # two AdamW steps (the second gives LoRA A, whose gradient is zero while B is zero, a gradient) move exactly
    # the trainable parameters
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = labelled_batch(phi4_processor)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])} == trainable


def test_frozen_unused_parameters_really_get_no_gradient(phi4_dir, phi4_processor, tmp_path):
    """What load_model freezes as never computed (audio tower, SigLIP after the feature layer) gets no gradient
    when trainable, and everything else does: checked by autograd, not by the family's list."""
    _, model = load(phi4_dir, tmp_path, [])
    for param in model.parameters():
        param.requires_grad_(True)
    model(**labelled_batch(phi4_processor)).loss.backward()
    without = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}
    assert without == {n for n, _ in model.named_parameters() if group(n) in ("audio", "siglip-unused")}


# ------------------------------------------------------------------------------------------------ 10. full size


def test_official_config_on_the_meta_device():
    from phi3v.models.phi4_mm.tiny import OFFICIAL_CONFIG

    config = transformers.Phi4MultimodalConfig.from_json_file(str(OFFICIAL_CONFIG))
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1152, 27, 16)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (3072, 32, 24)
    with torch.device("meta"):
        model = Phi4MultimodalForCausalLM(config)
    assert len(model.state_dict()) == 1536  # a save holds 1535: the tied lm_head is not written
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(not m.is_causal for m in model.modules() if isinstance(m, Phi4MultimodalVisionAttention))
    parts = {}
    for name, param in model.named_parameters():
        part = ("audio encoder" if ".audio_embed.encoder." in name else "audio projectors" if ".audio_embed." in name
                else "siglip" if ".img_processor." in name else "projector" if ".image_embed." in name else "lm")
        parts[part] = parts.get(part, 0) + param.numel()
    # By hand, from the config (notes section 1):
    # LM 3.836B: embeddings 200064 * 3072 = 614,596,608 (tied lm_head, counted once) + 32 layers of
    #   qkv (3072 + 2 * 8 * 128) * 3072 + o 3072^2 + gate_up 16384 * 3072 + down 3072 * 8192 + 2 norms of 3072
    #   = 100,669,440 each + the final norm 3072
    hidden, layers = 3072, 32
    per_layer = 5120 * hidden + hidden * hidden + 2 * 8192 * hidden + hidden * 8192 + 2 * hidden
    assert parts["lm"] == 200064 * hidden + layers * per_layer + hidden == 3_836_021_760
    # SigLIP 428.6M: patch conv 1152 * 3 * 14 * 14 + 1152, 1024 positions * 1152, 27 layers of q/k/v/out
    #   4 * (1152^2 + 1152) + fc1/fc2 2 * 1152 * 4304 + 4304 + 1152 + 2 layer norms 4 * 1152, post_layernorm 2 * 1152,
    #   and the pooling head (probe 1152, in_proj 3 * 1152^2 + 3 * 1152, out_proj, layer norm, fc1/fc2)
    v, i = 1152, 4304
    attention, mlp = 4 * (v * v + v), 2 * v * i + i + v
    head = v + 3 * v * v + 3 * v + (v * v + v) + 2 * v + mlp
    assert parts["siglip"] == (v * 3 * 14 * 14 + v) + 1024 * v + 27 * (attention + mlp + 4 * v) + 2 * v + head \
        == 428_565_440
    # projector 13.0M: up 1152 -> 3072 and down 3072 -> 3072 with biases, + the 2 separator vectors of 1152
    assert parts["projector"] == (v * hidden + hidden) + (hidden * hidden + hidden) + 2 * v == 12_984_576
    # audio 441.2M (conformer encoder, measured) + 25.2M: up 1024 -> 3072 and down 3072 -> 3072, twice (speech, and
    #   vision+speech)
    assert parts["audio projectors"] == 2 * ((1024 * hidden + hidden) + (hidden * hidden + hidden)) == 25_178_112
    assert parts["audio encoder"] == 441_238_144
    # total 4.744B = 3,836,021,760 + 428,565,440 + 12,984,576 + 441,238,144 + 25,178,112
    assert sum(p.numel() for p in model.parameters()) == sum(parts.values()) == 4_743_988_032


# ------------------------------------------------------------------------------------------------ 11. generation


def test_greedy_generate_with_cache_equals_full_forwards(phi4_model, phi4_processor):
    inputs = phi4_processor("<|user|><|image_1|>\nDescribe it.<|end|><|assistant|>", [make_image(448, 28)])
    banned, steps = phi4_processor.end_token_ids(), 4
    with torch.no_grad():
        generated = phi4_model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                        use_cache=True, eos_token_id=banned)
        ids = inputs["input_ids"]
        images = {k: v for k, v in inputs.items() if k.startswith("image_")}
        for _ in range(steps):  # greedy by definition: a full forward (SigLIP included) per new token
            logits = phi4_model(input_ids=ids, **images).logits[:, -1]
            logits[:, banned] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_no_stray_image_tags_reach_the_native_processor(phi4_processor):
    """The remote-code tags are not native placeholders: the native processor refuses them (so tests 1 compare
    real placeholder runs, not unexpanded tags)."""
    with pytest.raises(ValueError, match="should be the same as the number of images"):
        phi4_processor.native(text="<|user|><|image_1|>hi<|end|>", images=[make_image(30, 30)], return_tensors="pt")
    assert re.fullmatch(r"<\|[a-z0-9]+\|>", phi4_processor.native.image_token)


def test_left_padded_batched_generation_equals_alone(phi4_model, phi4_processor):
    """predict batches prompts left-padded: a row's greedy tokens, and the scores they were chosen by (the tiny
    model's argmax alone barely depends on the context), must not depend on its company."""
    conversations = [Conversation("a", [Turn("Describe it.", None, [make_image(448, 28)])]),
                     Conversation("b", [Turn("And this much longer question about it?", None,
                                             [make_image(14, 448, seed=1)])])]
    dataset = ConversationDataset(conversations, lambda c: c, phi4_processor, for_generation=True)
    items = [dataset[i] for i in range(2)]
    end = phi4_processor.end_token_ids()

    def generate(chosen):
        inputs = phi4_processor.collator("left")(chosen)
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            out = phi4_model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                      eos_token_id=end, pad_token_id=ENDOFTEXT, output_logits=True,
                                      return_dict_in_generate=True)
        return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)

    tokens, logits = generate(items)
    assert tokens.shape == (2, 3)
    for row, item in enumerate(items):
        tokens_alone, logits_alone = generate([item])
        assert torch.equal(tokens[row], tokens_alone[0]), row
        assert torch.allclose(logits[row], logits_alone[0], atol=1e-5), row


def test_merge_vision_lora_command_writes_a_plain_native_checkpoint(phi4_dir, phi4_model, tmp_path):
    """The merged copy has no vision-lora/ (loading it again must not merge twice) and holds our merged weights;
    transformers' own class loads it."""
    from phi3v.models.phi4_mm.merge_vision_lora import main

    main([str(phi4_dir), str(tmp_path / "merged")])
    assert not (tmp_path / "merged" / "vision-lora").exists()
    assert (tmp_path / "merged" / "processor_config.json").exists()
    for cls in (transformers.Phi4MultimodalForCausalLM, Phi4MultimodalForCausalLM):
        reloaded = cls.from_pretrained(tmp_path / "merged").state_dict()
        expected = phi4_model.state_dict()
        assert set(reloaded) == set(expected)
        assert all(torch.equal(reloaded[name], expected[name]) for name in expected), cls
