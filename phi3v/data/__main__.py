"""`python -m phi3v.data convert IN OUT`: see phi3v.data.convert."""

from phi3v.common.errors import run_main
from phi3v.data.convert import build_parser, main  # noqa: F401 (build_parser: the command's flags)

if __name__ == "__main__":
    run_main(main)
