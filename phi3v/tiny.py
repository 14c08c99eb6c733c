"""`python -m phi3v.tiny OUT_DIR [--like NAME] [--real_vocab] [--seed N]`: a tiny random checkpoint in the official
layout, offline, in about a second (see phi3v.models.phi3_v.tiny)."""

from phi3v.common.errors import run_main
from phi3v.models.phi3_v.tiny import build_parser, main  # noqa: F401 (build_parser: the command's flags)

if __name__ == "__main__":
    run_main(main)
