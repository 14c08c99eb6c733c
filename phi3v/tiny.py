"""`python -m phi3v.tiny OUT_DIR [--like NAME] [--real_vocab] [--seed N]`: a tiny random checkpoint in the official
layout of a Phi vision model, offline, in seconds (phi3v.models.phi3_v.tiny, phi3v.models.phi4_mm.tiny)."""

import argparse

from phi3v.common.errors import UserError, run_main
from phi3v.models.phi3_v import tiny as phi3_v_tiny

PHI4_MM = "phi-4-multimodal-instruct"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_crops", type=int, default=None,
                        help="num_crops saved with the processor (default: the official one: 4 or 16 for Phi-3(.5)-"
                             "vision, dynamic_hd 36 for Phi-4-multimodal)")
    parser.add_argument("--like", default="phi-3.5-vision-instruct", choices=[*phi3_v_tiny.DEFAULT_NUM_CROPS, PHI4_MM],
                        help="the official checkpoint whose config.json layout to miniaturize")
    parser.add_argument("--real_vocab", nargs="?", const=str(phi3_v_tiny.REAL_VOCAB), default=None, metavar="GGUF",
                        help="Phi-3(.5)-vision: the real Phi-3 vocabulary (default file: tests/assets/phi3-vocab/) "
                             "instead of the small trained tokenizer; needs the gguf package")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.like == PHI4_MM:
        if args.real_vocab:
            raise UserError(f"--real_vocab is the Phi-3 vocabulary; {PHI4_MM} has its own")
        from phi3v.models.phi4_mm.tiny import build_tiny_checkpoint

        directory = build_tiny_checkpoint(args.out_dir, args.seed, args.num_crops)
    else:
        directory = phi3_v_tiny.build_tiny_checkpoint(args.out_dir, args.seed, args.num_crops,
                                                      real_vocab=args.real_vocab, variant=args.like)
    print(f"tiny {args.like} checkpoint written to {directory}"
          + (" (real Phi-3 vocabulary)" if args.real_vocab else ""))


if __name__ == "__main__":
    run_main(main)
