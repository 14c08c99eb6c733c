"""Where checkpoint files come from: a local directory, or the Hugging Face Hub when it is reachable."""

from __future__ import annotations

import os
from pathlib import Path

from phi3v.errors import MissingFile, Unavailable


def offline_message(name: str, error: BaseException | str) -> str:
    return (
        f"Could not load {name!r}: it is not a local directory, and fetching it from the Hugging Face Hub failed "
        f"({str(error).splitlines()[0] if str(error) else type(error).__name__}). If this machine is offline, "
        f"download the checkpoint where the Hub is reachable (`hf download {name} --local-dir DIR`), copy DIR here "
        f"and pass the local directory instead (for the scripts: --model_name_or_path DIR)."
    )


def resolve_file(path: str | os.PathLike, filename: str) -> Path:
    """Path of `filename` inside a local checkpoint directory, or downloaded from the hub repo `path`."""
    if Path(path).is_dir():
        file = Path(path) / filename
        if not file.is_file():
            raise MissingFile(f"{file} does not exist: is {path} a Phi-3.5-vision checkpoint directory?")
        return file
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(path), filename))
    except Exception as error:  # offline, unknown repo, gated repo: all need the same action from the user
        raise Unavailable(offline_message(str(path), error)) from error
