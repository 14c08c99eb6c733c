"""Merge a LoRA adapter into its base model and write a standalone checkpoint in the official layout.

    python -m phi3v.export OUTPUT_DIR MERGED_DIR [--base BASE_DIR] [--dtype bfloat16]

The result has config.json, model*.safetensors with the official tensor names, the processor and tokenizer files
with the chat template: it loads with `Phi3VForCausalLM.from_pretrained` here and in tools that read the official
format (vLLM serves it; it cannot serve LoRA adapters for this model). The merge happens in fp32 on CPU, also
after QLoRA (the adapter is applied to the unquantized base, then the result is cast to --dtype).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel

from phi3v.errors import UserError, run_main
from phi3v.modeling import Phi3VForCausalLM
from phi3v.processing import Phi3VProcessor


def adapter_base(adapter_dir: str | Path) -> str:
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json is missing)")
    return json.loads(config.read_text())["base_model_name_or_path"]


def merge_adapter(adapter_dir: str | Path, base: str | None = None) -> Phi3VForCausalLM:
    """The base model (fp32) with the adapter of `adapter_dir` merged into its weights."""
    base = base or adapter_base(adapter_dir)
    model = Phi3VForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write base + adapter, merged and cast to `dtype`, with the processor files, to `out_dir`."""
    base = base or adapter_base(adapter_dir)
    model = merge_adapter(adapter_dir, base).to(dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    Phi3VProcessor.from_pretrained(adapter_dir).save_pretrained(out_dir)
    copy_remote_code(base, out_dir)
    return out_dir


def copy_remote_code(base: str | Path, out_dir: Path) -> None:
    """Tools that still load Phi-3.5-vision through its hub remote code (trust_remote_code) need the base model's
    *.py files and auto_map beside the weights; carry them over from a local base directory when present."""
    base = Path(base)
    if not base.is_dir():
        return
    for source in base.glob("*.py"):
        shutil.copy2(source, out_dir / source.name)
    base_config = json.loads((base / "config.json").read_text())
    if "auto_map" in base_config:
        config_file = out_dir / "config.json"
        config = json.loads(config_file.read_text())
        config["auto_map"] = base_config["auto_map"]
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model (official layout).")
    parser.add_argument("adapter_dir", help="a training output directory holding adapter_config.json")
    parser.add_argument("out_dir", help="where to write the merged model")
    parser.add_argument("--base", help="base model directory or hub id (default: the one the adapter was trained on)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = export_merged(args.adapter_dir, args.out_dir, args.base, getattr(torch, args.dtype))
    print(f"merged model written to {out}")


if __name__ == "__main__":
    run_main(main)
