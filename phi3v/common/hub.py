"""Where checkpoint files come from: a local directory, or the Hugging Face Hub when it is reachable."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from phi3v.common.errors import MissingFile, Unavailable


def offline_message(name: str, error: BaseException | str) -> str:
    return (f"Could not load {name!r}: it is not a local directory, and fetching it from the Hugging Face Hub failed "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__}). If this machine is offline, "
            f"download the checkpoint where the Hub is reachable (`hf download {name} --local-dir DIR`), copy DIR "
            "here and pass the local directory instead (for the scripts: --model_name_or_path DIR).")


PROBE_SECONDS = 1.5
UNREACHABLE = f"the Hugging Face Hub did not answer within {PROBE_SECONDS} s"


@functools.cache
def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the Hub (HF_ENDPOINT) opens within `timeout` seconds, asked once per process
    (offline, huggingface_hub retries for ~25 s). HF_HUB_OFFLINE=1: False; behind a proxy: True, unasked."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    opened = []

    def connect():  # in a thread: name resolution has no timeout of its own
        with contextlib.suppress(OSError):
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(opened)


def hub_kwargs(path: str | os.PathLike) -> dict:
    """from_pretrained keywords for `path`: local_files_only=True for a hub id while the Hub is unreachable (so the
    local cache is used, or the load fails at once), nothing otherwise."""
    return {} if Path(path).exists() or hub_reachable() else {"local_files_only": True}


def resolve_file(path: str | os.PathLike, filename: str) -> Path:
    """Path of `filename` inside a local checkpoint directory, or downloaded from the hub repo `path`."""
    if Path(path).is_dir():
        file = Path(path) / filename
        if not file.is_file():
            raise MissingFile(f"{file} does not exist: is {path} a Phi-3.5-vision checkpoint directory?")
        return file
    from huggingface_hub import hf_hub_download

    offline = hub_kwargs(path)
    try:
        return Path(hf_hub_download(str(path), filename, **offline))
    except Exception as error:  # offline, unknown repo, gated repo: all need the same action from the user
        raise Unavailable(offline_message(str(path), UNREACHABLE if offline else error)) from error
