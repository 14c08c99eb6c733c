"""Freeze / learning-rate / LoRA knobs: each combination trains exactly the parameters it names (names and counts),
the optimizer's groups carry the learning rates set, and AutoPeftModelForCausalLM loads our adapters.

Expected names and counts come from the base model's own modules and the LoRA formula r x (in + out) per target,
written out here by part, never from the code under test.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import HfArgumentParser

from phi3v.common.errors import UserError
from phi3v.train.arguments import ModelArguments
from phi3v.train.training_arguments import RecipeTrainingArguments
from tests.test_model_loading import batch, trainable_and_moved

RANK = 4
CLIP = "model.vision_embed_tokens.img_processor.vision_model"


def parse(tiny_dir, tmp_path, flags):
    return HfArgumentParser((ModelArguments, RecipeTrainingArguments)).parse_args_into_dataclasses(
        args=["--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path), "--lora_rank", str(RANK), *flags]
    )


def part(name: str) -> str:
    """The base model's parameters by part; the tiny CLIP's layer 1 and post_layernorm are never used."""
    if name.startswith(f"{CLIP}.encoder.layers.1.") or name.startswith(f"{CLIP}.post_layernorm."):
        return "unused"
    if name.startswith(CLIP):
        return "vision"
    return "projector" if name.startswith("model.vision_embed_tokens.") else "language"


def linear_layers(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and part(n + ".weight") != "unused"}


LM = r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)"
CLIP_LINEAR = rf"{re.escape(CLIP)}\.encoder\.layers\.0\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
PROJ = r"model\.vision_embed_tokens\.img_projection\.[02]"

# flags -> (parts trained in full, regex of the LoRA target paths or None, modules trained in full next to LoRA)
FULL = {
    "freeze_tower": (["--freeze_vision_tower"], {"projector", "language"}, None, []),
    "freeze_projector": (["--freeze_projector"], {"vision", "language"}, None, []),
    "freeze_llm": (["--freeze_llm"], {"vision", "projector"}, None, []),
    "clip_only": (["--freeze_llm", "--freeze_projector"], {"vision"}, None, []),
    "original_frozen_vision": (["--freeze_vision_model"], {"language"}, None, []),
    "lora_llm_full_projector": (["--use_lora", "--freeze_vision_tower", "--lora_modules_to_save", "img_projection"],
                                set(), rf"{LM}|lm_head", ["model.vision_embed_tokens.img_projection"]),
    "lora_all_linear_llm": (["--use_lora", "--freeze_vision_model", "--lora_target_modules", "all-linear"],
                            set(), LM, []),
    "lora_all_linear": (["--use_lora", "--lora_target_modules", "all-linear"], set(), f"{LM}|{CLIP_LINEAR}|{PROJ}",
                        []),
    "lora_names": (["--use_lora", "--freeze_projector", "--lora_target_modules", "qkv_proj", "fc1"], set(),
                   rf"model\.layers\.\d+\.self_attn\.qkv_proj|{re.escape(CLIP)}\.encoder\.layers\.0\.mlp\.fc1", []),
    "lora_regex": (["--use_lora", "--lora_target_modules", r"model\.layers\.0\..*"], set(),
                   r"model\.layers\.0\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)", []),
    "lora_exclude": (["--use_lora", "--freeze_vision_model", "--lora_exclude_modules", "lm_head", "down_proj"],
                     set(), r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.gate_up_proj)", []),
    "lora_vision_only": (["--use_lora", "--freeze_llm"], set(), f"{CLIP_LINEAR}|{PROJ}", []),
    "lora_plus_lm_head": (["--use_lora", "--freeze_vision_model", "--lora_modules_to_save", "lm_head"], set(), LM,
                          ["lm_head"]),
    "dora": (["--use_lora", "--freeze_vision_model", "--use_dora"], set(), rf"{LM}|lm_head", []),
}


def expected_trainable(base, full_parts, lora_regex, saved, dora=False) -> dict[str, int]:
    """{parameter name: numel} that should train, from the base model's modules."""
    expected = {n: p.numel() for n, p in base.named_parameters() if part(n) in full_parts}
    if lora_regex is None:
        return expected
    for path, layer in linear_layers(base).items():
        if re.fullmatch(lora_regex, path):
            prefix = f"base_model.model.{path}"
            expected[f"{prefix}.lora_A.default.weight"] = RANK * layer.in_features
            expected[f"{prefix}.lora_B.default.weight"] = RANK * layer.out_features
            if dora:
                expected[f"{prefix}.lora_magnitude_vector.default.weight"] = layer.out_features
    for path in saved:
        module = base.get_submodule(path)
        for name, param in module.named_parameters():
            expected[f"base_model.model.{path}.modules_to_save.default.{name}"] = param.numel()
    return expected


def load(combination, tiny_dir, tmp_path):
    from phi3v.train.loading import load_model

    model_args, training_args = parse(tiny_dir, tmp_path, FULL[combination][0])
    torch.manual_seed(0)
    return load_model(model_args, training_args).train()


@pytest.mark.parametrize("combination", list(FULL))
def test_each_combination_trains_exactly_what_it_names(combination, tiny_dir, tiny_model, tmp_path):
    flags, full_parts, lora_regex, saved = FULL[combination]
    model = load(combination, tiny_dir, tmp_path)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    expected = expected_trainable(tiny_model, full_parts, lora_regex, saved, dora="--use_dora" in flags)
    assert sorted(trainable) == sorted(expected)
    assert sum(trainable.values()) == sum(expected.values())


@pytest.mark.slow
@pytest.mark.parametrize("combination", list(FULL))
def test_exactly_the_trainable_parameters_move(combination, tiny_dir, processor, tmp_path):
    """Every trainable parameter gets a gradient and moves; nothing else does (LoRA B starts at zero, so two steps
    reach every adapter matrix)."""
    model = load(combination, tiny_dir, tmp_path)
    trainable, changed = trainable_and_moved(model, batch(processor))
    assert changed == trainable


@pytest.mark.parametrize("flags,quantized,kind", [
    (["--use_qlora"], {"language", "vision", "projector"}, "Linear4bit"),  # the original: CLIP quantized too
    (["--use_qlora", "--no_quantize_vision"], {"language"}, "Linear4bit"),
    (["--use_qlora", "--quant_bits", "8", "--freeze_vision_model"], {"language", "vision", "projector"},
     "Linear8bitLt"),
])
def test_qlora_quantizes_the_parts_it_names(flags, quantized, kind, tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from phi3v.train.loading import load_model

    model_args, training_args = parse(tiny_dir, tmp_path, flags)
    model = load_model(model_args, training_args).train()
    found = {}  # part -> classes of its base Linear layers (under LoRA, the wrapped `base_layer`)
    for path, module in model.named_modules():
        path = path.removeprefix("base_model.model.")
        if isinstance(module, torch.nn.Linear) and ".lora_" not in path and "lm_head" not in path and \
                part(path + ".weight") != "unused":
            found.setdefault(part(path + ".weight"), set()).add(type(module).__name__)
    assert {p for p, kinds in found.items() if kinds == {kind}} == quantized
    assert all(kinds == {"Linear"} for p, kinds in found.items() if p not in quantized)
    assert type(model.base_model.model.lm_head.base_layer).__name__ == "Linear"  # as the original: never quantized


def test_double_quant_and_alpha_knobs_reach_the_configs(tiny_dir, tmp_path):
    from phi3v.models.phi3_v.family import PHI3_V
    from phi3v.train.loading import get_peft_config, get_quantization_config

    model_args, training_args = parse(tiny_dir, tmp_path, ["--use_qlora", "--double_quant", "--lora_alpha", "16",
                                                           "--use_rslora"])
    quant = get_quantization_config(model_args, training_args, PHI3_V)
    assert quant.load_in_4bit and quant.bnb_4bit_use_double_quant and quant.bnb_4bit_quant_type == "nf4"
    original, _ = parse(tiny_dir, tmp_path, ["--use_qlora"])
    assert not get_quantization_config(original, training_args, PHI3_V).bnb_4bit_use_double_quant  # the original: none
    from phi3v import Phi3VForCausalLM

    config = get_peft_config(model_args, Phi3VForCausalLM.from_pretrained(tiny_dir))
    assert (config.r, config.lora_alpha, config.use_rslora, config.task_type) == (RANK, 16, True, "CAUSAL_LM")


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_dir, tmp_path):
    from phi3v.train.loading import load_model

    for flags, scaling in ((["--lora_alpha", "16"], 16 / RANK), (["--lora_alpha", "16", "--use_rslora"], 16 / 2),
                           ([], 2.0)):  # default alpha = rank x 2
        model_args, training_args = parse(tiny_dir, tmp_path, ["--use_lora", *flags])
        model = load_model(model_args, training_args)
        assert model.base_model.model.lm_head.scaling["default"] == scaling, flags


@pytest.mark.parametrize("flags,message", [
    (["--freeze_vision_model", "--freeze_llm"], "leaves nothing to train"),
    (["--lora_target_modules", "qkv_proj"], "--lora_target_modules need"),
    (["--use_dora"], "--use_dora need"),
    (["--quant_bits", "8"], "--quant_bits and --double_quant need --use_qlora"),
    (["--use_qlora", "--quant_bits", "8", "--double_quant"], "--double_quant applies to 4-bit weights only"),
    (["--use_lora", "--lora_alpha", "16", "--lora_alpha_ratio", "2"], "--lora_alpha 16 disagrees"),
])
def test_knobs_that_would_be_ignored_are_refused(flags, message, tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        parse(tiny_dir, tmp_path, flags)


@pytest.mark.parametrize("flags,message", [
    (["--use_lora", "--lora_target_modules", "nothing_like_this"], "matches no Linear layer"),
    (["--use_lora", "--lora_target_modules", "fc1", "--freeze_vision_tower"], "LoRA has no target left"),
    (["--use_lora", "--lora_modules_to_save", "img_projektion"], "no module of the model is called that"),
    (["--use_lora", "--freeze_vision_model", "--lora_modules_to_save", "img_projection"], "is in a frozen part"),
    (["--use_lora", "--lora_target_modules", "model\\.layers\\.(0"], "is not a valid regular expression"),
])
def test_lora_targets_that_cannot_work_are_user_errors(flags, message, tiny_dir, tmp_path):
    from phi3v.train.loading import load_model

    model_args, training_args = parse(tiny_dir, tmp_path, flags)
    with pytest.raises(UserError, match=message):
        load_model(model_args, training_args)


@pytest.mark.parametrize("flags,rates", [
    (["--vision_lr", "1e-5", "--projector_lr", "3e-4"], {"vision": 1e-5, "projector": 3e-4, "language": 4e-5}),
    (["--vision_lr", "2e-6", "--learning_rate", "1e-4"], {"vision": 2e-6, "projector": 1e-4, "language": 1e-4}),
    (["--use_lora", "--vision_lr", "5e-6"], {"vision": 5e-6, "projector": 4e-5, "language": 4e-5}),
])
def test_param_groups_carry_the_learning_rates(flags, rates, tiny_dir, tmp_path):
    from phi3v.models.phi3_v.collator import Phi3VCollator
    from phi3v.train.loading import load_model
    from phi3v.train.trainer import Phi3VTrainer

    model_args, training_args = parse(tiny_dir, tmp_path, [*flags, "--report_to", "none", "--warmup_steps", "0"])
    model = load_model(model_args, training_args)
    trainer = Phi3VTrainer(model=model, args=training_args, data_collator=Phi3VCollator(0))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = set(trainer.get_decay_parameter_names(model))
    seen = set()
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            part_name = "language" if part(name.removeprefix("base_model.model.")) == "language" else \
                part(name.removeprefix("base_model.model."))
            assert group["lr"] == pytest.approx(rates[part_name]), name
            assert group["weight_decay"] == (0.01 if name in decay_names else 0.0), name
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    trainer.optimizer.step()
    trainer.lr_scheduler.step()  # linear decay scales every group alike: 9/10 of its rate after one step
    for group in trainer.optimizer.param_groups:
        part_names = {part(names[id(p)].removeprefix("base_model.model.")) for p in group["params"]}
        assert group["lr"] == pytest.approx(0.9 * rates[part_names.pop()])


def test_lr_for_a_frozen_part_is_refused(tiny_dir, tmp_path):
    from phi3v.models.phi3_v.collator import Phi3VCollator
    from phi3v.train.loading import load_model
    from phi3v.train.trainer import Phi3VTrainer

    model_args, training_args = parse(tiny_dir, tmp_path, ["--freeze_vision_tower", "--vision_lr", "1e-5",
                                                           "--report_to", "none"])
    trainer = Phi3VTrainer(model=load_model(model_args, training_args), args=training_args,
                           data_collator=Phi3VCollator(0))
    with pytest.raises(UserError, match="--vision_lr 1e-05 applies to no parameter"):
        trainer.create_optimizer()


def test_auto_peft_model_loads_our_adapter(tiny_dir, tiny_model, processor, tmp_path):
    """Saved adapter -> AutoPeftModelForCausalLM (phi3v imported registers the model type) -> the logits of the base
    weights with B @ A x alpha / r added by hand."""
    from peft import AutoPeftModelForCausalLM

    from phi3v.train.loading import load_model

    model_args, training_args = parse(tiny_dir, tmp_path, ["--use_lora", "--freeze_vision_model"])
    model = load_model(model_args, training_args)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()

    inputs = batch(processor)
    inputs.pop("labels")
    merged = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    scaling = model_args.lora_alpha / RANK
    lora = dict(model.named_parameters())
    for path in linear_layers(tiny_model):
        a = lora.get(f"base_model.model.{path}.lora_A.default.weight")
        if a is not None:
            b = lora[f"base_model.model.{path}.lora_B.default.weight"]
            merged[f"{path}.weight"] += scaling * (b @ a).detach()
    from phi3v import Phi3VForCausalLM

    reference = Phi3VForCausalLM.from_pretrained(tiny_dir).eval()
    reference.load_state_dict(merged)
    with torch.no_grad():
        expected = reference(**inputs, logits_to_keep=8).logits
        got = loaded(**inputs, logits_to_keep=8).logits
        base = tiny_model(**inputs, logits_to_keep=8).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter changes the outputs
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
