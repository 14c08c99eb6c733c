"""Merge a LoRA adapter into its base model and write a standalone checkpoint in the official layout.

    python -m phi3v.export OUTPUT_DIR MERGED_DIR [--base BASE_DIR] [--dtype bfloat16]
    python -m phi3v.export OUTPUT_DIR MERGED_DIR --push_to_hub you/phi35v-ucf101 [--private]

The result is the hub repo's layout (the family's layout.py) plus a model card: it loads here, with transformers 4.x
(trust_remote_code) and in vLLM, which cannot serve LoRA adapters for this model. The merge streams the base's
safetensors on CPU tensor by tensor (base + scale * B @ A in fp32, cast once to --dtype; at most one 5 GB shard in
memory), into the unquantized base after QLoRA too. Adapters: LoRA, rsLoRA, DoRA and modules_to_save (the recipes').
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from phi3v.common.errors import MissingFile, Parser, UserError, parse_checked
from phi3v.common.hub import resolve_file
from phi3v.models.family import ModelFamily
from phi3v.models.registry import checkpoint_family
from phi3v.serve.publish import model_card, push_folder, read_run

# adapter_config.json settings that change what a LoRA tensor adds where, or by how much, beyond plain LoRA,
# rsLoRA and DoRA (peft 0.21's LoraConfig): refused rather than merged wrongly
UNMERGEABLE = ("rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias", "layer_replication", "use_qalora",
               "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "arrow_config",
               "use_bdlora", "velora_config", "monteclora_config", "kasa_config")
LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")  # DoRA: the trained norm of each row


def adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a LoRA adapter this module can merge."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json is missing)")
    config = json.loads(config_file.read_text())
    unsupported = [key for key in UNMERGEABLE if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.insert(0, f"peft_type {config['peft_type']}")
    if unsupported:
        raise UserError(f"{config_file}: {', '.join(unsupported)}: phi3v.export merges LoRA, rsLoRA, DoRA and "
                        "modules_to_save adapters only; merge this one with peft (merge_and_unload)")
    return config


def adapter_base(adapter_dir: str | Path) -> str:
    return adapter_config(adapter_dir)["base_model_name_or_path"]


def lora_parts(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA tensors (an adapter's, or a family's built-in LoRA) by the base tensor they change: LORA_PARTS, or "whole"
    for a tensor stored in full (modules_to_save, a LoRA-wrapped embedding's `base_layer`), replacing the base's."""
    parts = {}
    for key, tensor in weights.items():
        name = key.removeprefix("base_model.model.")
        kind = next((kind for kind in LORA_PARTS if name.endswith("." + kind)), "whole")
        target = name.removesuffix(kind) + "weight" if kind != "whole" else name.replace(".base_layer.", ".")
        parts.setdefault(target, {})[kind] = tensor
    return parts


def merged_tensor(base: torch.Tensor, parts: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """One weight with its adapter parts merged, in fp32 (the base tensor itself when the adapter leaves it alone):
    W + scale * B @ A, each row then rescaled to its trained norm under DoRA (as peft's merge)."""
    weight = parts.get("whole", base)
    if "lora_A.weight" not in parts:
        return weight
    weight = weight.float() + scale * (parts["lora_B.weight"].float() @ parts["lora_A.weight"].float())
    if "lora_magnitude_vector" in parts:
        weight *= (parts["lora_magnitude_vector"].float() / weight.norm(dim=1)).unsqueeze(1)
    return weight


def base_tensor_files(base: str) -> dict[str, Path]:
    """The safetensors file of `base` (local folder or hub id) holding each tensor: model.safetensors, else the
    shards its index names."""
    try:
        single = resolve_file(base, "model.safetensors")
    except UserError:
        weight_map = json.loads(resolve_file(base, "model.safetensors.index.json").read_text())["weight_map"]
        shards = {shard: resolve_file(base, shard) for shard in set(weight_map.values())}
        return {name: shards[shard] for name, shard in weight_map.items()}
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def write_merged(adapter_dir: str | Path, base: str, family: ModelFamily, out_dir: Path, dtype: torch.dtype) -> None:
    """Base + adapter in `dtype`, written as `save_pretrained` writes the model, one tensor merged at a time: never
    more than a shard in memory. Raises UserError where the adapter and the base's tensors do not match."""
    config = adapter_config(adapter_dir)
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    model = family.model_class.from_pretrained(base, dtype=dtype, device_map="meta")  # config and layout, no weights
    # meta tensors: the names, order, shapes and dtypes save_pretrained writes for a loaded model (it sorts them;
    # tied weights, Phi-4's lm_head, written once)
    layout = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    # the LoRA the family merges into `base` while loading (Phi-4's vision-lora/) was in the trained model's
    # weights: it is added to the base tensors first, then the adapter
    built_in = family.built_in_lora(base)
    loras = [(lora_parts(built_in[1]), built_in[0]["lora_alpha"] / built_in[0]["r"])] if built_in else []
    parts, files = lora_parts(load_file(Path(adapter_dir) / "adapter_model.safetensors")), base_tensor_files(base)
    loras.append((parts, scale))
    unknown, missing = sorted(set(parts) - set(layout)), sorted(set(layout) - set(files))
    if unknown:
        raise UserError(f"{adapter_dir}: the adapter changes {unknown[0]}, which the base model has no weight of: an "
                        "adapter of another base model (pass that one with --base), or LoRA on a layer that is not "
                        "Linear")
    if missing:
        raise UserError(f"{base} lacks {len(missing)} weight(s) of the model ({missing[0]}, ...): not a complete "
                        f"{family.name} checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(layout, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=family.shard_size())
    with contextlib.ExitStack() as opened:  # each base file opened once, its header read once
        readers = {file: opened.enter_context(safe_open(file, "pt")) for file in set(files.values())}
        for shard, names in split.filename_to_tensors.items():
            tensors = {}
            for name in names:
                tensor = readers[files[name]].get_tensor(name)
                for lora, lora_scale in loras:
                    tensor = merged_tensor(tensor, lora.get(name, {}), lora_scale)
                tensors[name] = tensor.to(layout[name].dtype).contiguous()
            save_file(tensors, out_dir / shard, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                  dtype: torch.dtype = torch.bfloat16, remote_code_files: bool = True,
                  command: str | None = None) -> Path:
    """Write base + adapter, merged and cast to `dtype`, in the complete official layout, to `out_dir`.

    Args:
        remote_code_files: False: no *.py files (auto_map then points at the base's code on the Hub).
        command: the export command line, for the model card.
    """
    base = base or adapter_base(adapter_dir)
    family = checkpoint_family(base)
    if remote_code_files:
        family.remote_code_dir(base)  # fail now, not after the merge
    out_dir = Path(out_dir)
    write_merged(adapter_dir, base, family, out_dir, dtype)
    family.processor_class.from_pretrained(adapter_dir).save_pretrained(out_dir)
    family.complete_layout(out_dir, base, remote_code_files)
    run, metrics = read_run(adapter_dir)
    mode = f"{run.get('mode', 'lora')}, adapter merged into the base by phi3v.export ({str(dtype).split('.')[-1]})"
    commands = [c for c in (run.get("command"), command) if c]
    (out_dir / "README.md").write_text(model_card(str(base), mode, run.get("data", {}), metrics, commands, family))
    if (Path(adapter_dir) / "all_results.json").is_file():
        (out_dir / "all_results.json").write_text((Path(adapter_dir) / "all_results.json").read_text())
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description="Merge a LoRA adapter into its base model (official layout).")
    parser.add_argument("adapter_dir", help="a training output directory holding adapter_config.json")
    parser.add_argument("out_dir", help="where to write the merged model")
    parser.add_argument("--base", help="base model directory or hub id (default: the one the adapter was trained on)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no_remote_code_files", dest="remote_code_files", action="store_false",
                        help="do not copy or fetch the base's *.py files (offline); auto_map then names the code "
                             "in the base's hub repo, which transformers 4.x and vLLM fetch when loading")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also upload the result to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    return parser


MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "config.json")


def check_paths(adapter_dir: str | Path, out_dir: str | Path) -> None:
    """Refuse an adapter this module cannot merge or without its weights, and an out_dir that is the adapter's own
    folder or holds another model's files (a stale shard would be loaded with the merged weights)."""
    adapter_config(adapter_dir)
    out = Path(out_dir)
    if out.resolve() == Path(adapter_dir).resolve():
        raise UserError(f"{out_dir} is the adapter folder itself: write the merged model to a new folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_dir} is an existing file: pass a new or empty folder")
    stale = sorted(p.name for pattern in MODEL_FILES for p in out.glob(pattern)) if out.is_dir() else []
    if stale:
        raise UserError(f"{out_dir} already holds model files ({', '.join(stale[:4])}): pass a new or empty folder "
                        "(an old shard or index there would be mixed with the merged model)")
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise MissingFile(f"{weights} is missing: the adapter's weights are needed to merge it (a pickled "
                          "adapter_model.bin is not loaded)")


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_checked(build_parser(), argv)
    check_paths(args.adapter_dir, args.out_dir)
    command = shlex.join(["python", "-m", "phi3v.export", *argv])
    out = export_merged(args.adapter_dir, args.out_dir, args.base, getattr(torch, args.dtype),
                        args.remote_code_files, command)
    print(f"merged model written to {out}")
    if args.push_to_hub:
        print(f"uploaded to {push_folder(out, args.push_to_hub, private=args.private or None)}")
    return out

