"""`python -m phi3v.models.phi4_mm.merge_vision_lora BASE OUT_DIR`: Phi-4-multimodal with its built-in vision LoRA
merged into the weights, saved as a plain native checkpoint (with the processor files).

Every recipe merges it while loading; QLoRA (4-bit weights) and ZeRO-3 (partitioned weights) cannot, and train on
this merged copy instead. It needs the memory of the model in its saved dtype (about 11 GB in bf16).
"""

from __future__ import annotations

from phi3v.common.errors import Parser, UserError, parse_checked, run_main
from phi3v.models.phi4_mm.modeling import Phi4MultimodalForCausalLM, vision_lora
from phi3v.models.phi4_mm.processing import Phi4MMProcessor


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a Phi-4-multimodal checkpoint directory or hub id with a vision-lora/ folder")
    parser.add_argument("out_dir", help="directory to write the merged checkpoint to")
    args = parse_checked(parser, argv)
    if vision_lora(args.base) is None:
        raise UserError(f"{args.base} has no vision-lora/ folder: there is nothing to merge")
    model = Phi4MultimodalForCausalLM.from_pretrained(args.base, dtype="auto")  # merges it
    model.save_pretrained(args.out_dir, max_shard_size="5GB")
    Phi4MMProcessor.from_pretrained(args.base).save_pretrained(args.out_dir)
    print(f"{args.base} with its vision LoRA merged written to {args.out_dir}")


if __name__ == "__main__":
    run_main(main)
