"""Merge a LoRA adapter into its base model and write a standalone checkpoint in the official layout.

    python -m phi3v.export OUTPUT_DIR MERGED_DIR [--base BASE_DIR] [--dtype bfloat16]
    python -m phi3v.export OUTPUT_DIR MERGED_DIR --push_to_hub you/phi35v-ucf101 [--private]

The result is the hub repo's layout (the family's layout.py): config.json and preprocessor/processor configs with the
official auto_map, the official *.py remote code (copied from a local --base, or fetched from the Hub, *.py only),
5 GB weight shards with the official tensor names, generation_config.json with the chat stop ids, the tokenizer
files with the chat template, and a model card (README.md). It loads with `Phi3VForCausalLM.from_pretrained` here,
with transformers 4.x (with trust_remote_code), and in vLLM (`vllm serve MERGED_DIR --trust-remote-code`; vLLM
cannot serve LoRA adapters for this model). The merge happens in fp32 on CPU, also after QLoRA (the adapter is
applied to the unquantized base, then the result is cast to --dtype).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from peft import PeftModel

from phi3v.common.errors import Parser, UserError, parse_checked
from phi3v.models.registry import checkpoint_family
from phi3v.serve.publish import model_card, push_folder, read_run


def adapter_base(adapter_dir: str | Path) -> str:
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json is missing)")
    return json.loads(config.read_text())["base_model_name_or_path"]


def merge_adapter(adapter_dir: str | Path, base: str | None = None) -> torch.nn.Module:
    """The base model (fp32) with the adapter of `adapter_dir` merged into its weights."""
    base = base or adapter_base(adapter_dir)
    model = checkpoint_family(base).model_class.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                  dtype: torch.dtype = torch.bfloat16, remote_code_files: bool = True,
                  command: str | None = None) -> Path:
    """Write base + adapter, merged and cast to `dtype`, in the complete official layout, to `out_dir`.

    Args:
        remote_code_files: False: no *.py files (auto_map then points at the base's code on the Hub).
        command: the export command line, for the model card.
    Raises:
        UserError: no adapter in `adapter_dir`, or the base's remote code cannot be fetched (checked before the
            merge, which takes minutes at full size).
    """
    base = base or adapter_base(adapter_dir)
    family = checkpoint_family(base)
    if remote_code_files:
        family.remote_code_dir(base)  # fail now, not after the merge
    model = merge_adapter(adapter_dir, base).to(dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    family.processor_class.from_pretrained(adapter_dir).save_pretrained(out_dir)
    family.complete_layout(out_dir, base, remote_code_files)
    run, metrics = read_run(adapter_dir)
    mode = f"{run.get('mode', 'lora')}, adapter merged into the base by phi3v.export ({str(dtype).split('.')[-1]})"
    commands = [c for c in (run.get("command"), command) if c]
    (out_dir / "README.md").write_text(model_card(str(base), mode, run.get("data", {}), metrics, commands))
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
    """Refuse to write into the adapter's own folder or over another model's files (a stale shard or index would
    stay and be loaded with the merged weights). Other files (predictions, notes) may be there."""
    adapter_base(adapter_dir)
    out = Path(out_dir)
    if out.resolve() == Path(adapter_dir).resolve():
        raise UserError(f"{out_dir} is the adapter folder itself: write the merged model to a new folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_dir} is an existing file: pass a new or empty folder")
    stale = sorted(p.name for pattern in MODEL_FILES for p in out.glob(pattern)) if out.is_dir() else []
    if stale:
        raise UserError(f"{out_dir} already holds model files ({', '.join(stale[:4])}): pass a new or empty folder "
                        "(an old shard or index there would be mixed with the merged model)")


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

