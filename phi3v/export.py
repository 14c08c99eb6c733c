"""`python -m phi3v.export OUTPUT_DIR MERGED_DIR [...]`: merge a LoRA adapter into its base (phi3v.serve.export)."""

from phi3v.common.errors import run_main
from phi3v.serve.export import build_parser, main  # noqa: F401 (build_parser: the command's flags)

if __name__ == "__main__":
    run_main(main)
