"""Starts: no remote-code prompt on a checkpoint folder that ships the official *.py files, a fast and clear failure
offline, argument errors and --help before the heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REMOTE_CODE = "import pathlib; pathlib.Path(__file__).with_suffix('.ran').write_text('ran')\n"


def run_python(code: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh interpreter (nothing registered yet), stdin closed: a prompt would read EOF and fail."""
    import os

    return subprocess.run([sys.executable, "-c", code], cwd=REPO, input="", capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture(scope="module")
def official_folder(tiny_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint laid out as the hub repo is: the official *.py files and the auto_map entries."""
    import shutil

    folder = tmp_path_factory.mktemp("with-remote-code") / "ckpt"
    shutil.copytree(tiny_dir, folder)
    for name in ("configuration_phi3_v.py", "modeling_phi3_v.py", "processing_phi3_v.py"):
        (folder / name).write_text(REMOTE_CODE)
    auto_maps = {
        "config.json": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
        "preprocessor_config.json": {"AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
                                     "AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
        "processor_config.json": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
        "tokenizer_config.json": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
    }
    for name, auto_map in auto_maps.items():
        path = folder / name
        config = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**config, "auto_map": auto_map}))
    return folder


def test_processor_loads_without_asking_even_before_phi3_v_is_registered(official_folder, monkeypatch):
    """In process: with model_type phi3_v unknown to transformers (a fresh `from phi3v import Phi3VProcessor` does
    not import the model), AutoTokenizer's config lookup sees only the auto_map and would prompt."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from phi3v import Phi3VProcessor

    if "phi3_v" in CONFIG_MAPPING._extra_content:
        monkeypatch.delitem(CONFIG_MAPPING._extra_content, "phi3_v")
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    processor = Phi3VProcessor.from_pretrained(official_folder)
    assert prompts == []
    assert processor.tokenizer.convert_tokens_to_ids("<|end|>") == 32007
    assert not list(official_folder.glob("*.ran"))


@pytest.mark.slow
@pytest.mark.parametrize("load", [
    "from phi3v import Phi3VProcessor; Phi3VProcessor.from_pretrained(FOLDER)",
    "from phi3v import Phi3VForCausalLM; Phi3VForCausalLM.from_pretrained(FOLDER)",
    "import phi3v.models.phi3_v.modeling; import transformers; "
    "transformers.AutoModelForCausalLM.from_pretrained(FOLDER)",
])
def test_no_remote_code_prompt_on_a_folder_with_the_official_py_files(official_folder, load):
    done = run_python(load.replace("FOLDER", repr(str(official_folder))) + "; print('loaded')")
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
    assert not list(official_folder.glob("*.ran"))  # and none of the .py files ran


@pytest.fixture
def hub_at(monkeypatch):
    """Point huggingface_hub at ENDPOINT, online mode; the reachability probe asked afresh."""
    from huggingface_hub import constants

    from phi3v.common import hub

    def point(endpoint: str):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        hub.hub_reachable.cache_clear()

    yield point
    hub.hub_reachable.cache_clear()


def test_unreachable_hub_fails_within_two_seconds_with_the_offline_message(hub_at, tmp_path, monkeypatch):
    import socket
    import time

    from phi3v import Phi3VForCausalLM, Phi3VProcessor
    from phi3v.common.errors import Unavailable

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with socket.socket() as closed:  # a port nobody listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    hub_at(f"http://127.0.0.1:{port}")
    for load in (Phi3VProcessor.from_pretrained, Phi3VForCausalLM.from_pretrained):
        start = time.perf_counter()
        with pytest.raises(OSError, match="did not answer within 1.5 s.*pass the local directory") as raised:
            load("microsoft/Phi-3.5-vision-instruct")
        assert time.perf_counter() - start < 2
    assert isinstance(raised.value, OSError)
    with pytest.raises(Unavailable):
        Phi3VProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct")


def test_the_probe_sees_a_listening_hub_and_honours_hf_hub_offline(hub_at, monkeypatch):
    import socket

    from huggingface_hub import constants

    from phi3v.common import hub

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hub_at(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_reachable()
        assert hub.hub_kwargs("some/repo") == {}
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        hub.hub_reachable.cache_clear()
        assert not hub.hub_reachable()
        assert hub.hub_kwargs("some/repo") == {"local_files_only": True}
