"""The official layout, complete: what vLLM and transformers 4.x (trust_remote_code) need beside our weights.

Both load Phi-3.5-vision through the hub's remote code, so a model directory we write carries it (*.py, from a local
base or the Hub), auto_map in config.json and preprocessor_config.json, processor_config.json (else 4.x silently
falls back to the tokenizer), and generation_config.json's chat stop ids [2, 32000, 32007]. Without the *.py files
auto_map names the code in its hub repo, which 4.x downloads at load time. This project ignores auto_map.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from phi3v.common.errors import UserError
from phi3v.common.hub import hub_kwargs

OFFICIAL_REPO = "microsoft/Phi-3.5-vision-instruct"
CONFIG_AUTO_MAP = {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                   "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor",
                      "AutoProcessor": "processing_phi3_v.Phi3VProcessor"}
STOP_TOKEN_IDS = [2, 32000, 32007]  # </s> (official generation_config), <|endoftext|>, <|end|>


def stop_token_ids(configured, stops=(32000, 32007)) -> list[int]:
    """The checkpoint's eos id(s) plus `stops` (by default <|endoftext|> and <|end|>, which end a chat turn)."""
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    return ids + [i for i in stops if i not in ids]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def remote_code_dir(base: str | Path) -> Path | None:
    """The folder holding the base model's official *.py files: the base itself when it is a local folder (None
    without them), or a download of only the *.py files of hub repo `base` (UserError when it fails)."""
    if Path(base).is_dir():
        return Path(base) if list(Path(base).glob("*.py")) else None
    from huggingface_hub import snapshot_download

    try:  # Hub unreachable: the local cache or an error at once (no ~25 s of retries at every checkpoint)
        folder = Path(snapshot_download(str(base), allow_patterns=["*.py"], **hub_kwargs(base)))
    except Exception as error:  # offline, unknown or gated repo: all need the same choice from the user
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"could not fetch the remote code (*.py) of {base} from the Hugging Face Hub ({first}). vLLM and "
            "transformers 4.x load Phi-3.5-vision through that code. Pass --base with a local copy of the base "
            f"model that holds its *.py files, or --no_remote_code_files to write the model without them "
            f"(config.json then names the code in {base} on the Hub, fetched when the model is loaded)."
        ) from error
    return folder if list(folder.glob("*.py")) else None


def hub_qualified(auto_map: dict, repo: str) -> dict:
    """`module.Class` -> `repo--module.Class`: transformers 4.x then takes the module from that hub repo."""
    return {key: ref if "--" in ref else f"{repo}--{ref}" for key, ref in auto_map.items()}


def complete_layout(out_dir: str | Path, base: str | Path, remote_code_files: bool = True) -> list[str]:
    """Add the remote code, auto_map, processor_config.json and the stop ids of generation_config.json to a model
    directory written by `save_pretrained`; returns the *.py file names copied.

    Args:
        base: the base model (local folder or hub id) whose *.py files and auto_map the directory gets.
        remote_code_files: False: copy no *.py; auto_map then points into the base's hub repo.
    """
    out_dir = Path(out_dir)
    code = remote_code_dir(base) if remote_code_files else None
    copied = [shutil.copy2(source, out_dir / source.name) for source in sorted(code.glob("*.py"))] if code else []
    # the base's own auto_map when it has one (another release may name other modules), else the official one
    config_map = read_json(Path(base) / "config.json").get("auto_map") or CONFIG_AUTO_MAP
    processor_map = read_json(Path(base) / "preprocessor_config.json").get("auto_map") or PROCESSOR_AUTO_MAP
    if not copied:
        repo = OFFICIAL_REPO if Path(base).is_dir() else str(base)
        config_map, processor_map = hub_qualified(config_map, repo), hub_qualified(processor_map, repo)

    for name, auto_map in (("config.json", config_map), ("preprocessor_config.json", processor_map)):
        write_json(out_dir / name, {**read_json(out_dir / name), "auto_map": auto_map})
    write_json(out_dir / "processor_config.json",
               {"auto_map": {"AutoProcessor": processor_map["AutoProcessor"]}, "processor_class": "Phi3VProcessor"})
    generation = read_json(out_dir / "generation_config.json")
    generation.setdefault("bos_token_id", 1)
    generation.setdefault("pad_token_id", 32000)
    generation["eos_token_id"] = stop_token_ids(generation.get("eos_token_id"), STOP_TOKEN_IDS)
    write_json(out_dir / "generation_config.json", generation)
    return [Path(path).name for path in copied]
