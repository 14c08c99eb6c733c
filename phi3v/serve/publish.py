"""What a run publishes: run_info.json, the model card (README.md) and the upload of a model folder to the Hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

from phi3v.common.errors import UserError
from phi3v.models.family import ModelFamily

RUN_INFO = "run_info.json"  # written by every training run: base model, mode, data, command
UPLOADED = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "model.safetensors", "model.safetensors.index.json", "README.md", "all_results.json",
            "training_curves.png")


def model_card(base_model: str, mode: str, data: dict, metrics: dict, commands: list[str], family: ModelFamily) -> str:
    """README.md of a model repo: hub metadata, base model, data, mode, metrics before/after (from all_results.json),
    the commands that produced the model (training, then export), and how `family`'s layout is served."""
    skipped = ("runtime", "samples")
    names = sorted({k.removeprefix("eval_before_").removeprefix("eval_after_") for k in metrics
                    if k.startswith(("eval_before_", "eval_after_")) and not k.endswith(skipped)})

    def value(key):
        return f"{metrics[key]:.4f}" if isinstance(metrics.get(key), (int, float)) else "-"

    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base_model) and not Path(base_model).exists()
    lines = ["---", *([f"base_model: {base_model}"] if hub_id else []),  # the Hub links base models by id only
             "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags:", f"- {family.model_types[0]}", "- vision", "- fine-tuned", "---", "",
             f"# Fine-tuned from {base_model}", "",
             f"- **Base model**: {base_model}", f"- **Tuning mode**: {mode}",
             "- **Data**: " + (", ".join(f"{k} {v}" for k, v in data.items()) if data else "not recorded"),
             "", "## Evaluation", ""]
    if names:
        lines += ["| metric | before training | after training |", "|---|---|---|"]
        lines += [f"| {n} | {value('eval_before_' + n)} | {value('eval_after_' + n)} |" for n in names]
    tests = [k for k in sorted(metrics) if k.startswith("test_") and not k.endswith(skipped)]
    lines += [""] + [f"- {k}: {value(k)}" for k in tests] if tests else []
    if not names and not tests:
        lines += ["No evaluation was recorded."]
    lines += ["", "## How it was made", "", "```bash", *commands, "```", "",
              "## Serving", "", family.serving, ""]
    return "\n".join(lines)


def read_run(output_dir: str | Path) -> tuple[dict, dict]:
    """(run_info.json, all_results.json) of a training output; empty where missing."""
    files = Path(output_dir) / RUN_INFO, Path(output_dir) / "all_results.json"
    return tuple(json.loads(file.read_text()) if file.is_file() else {} for file in files)


def hub_api(token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def push_folder(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload fine-tuned Phi-3.5-vision") -> str:
    """Create `repo_id` if needed and upload the model files of `folder` (the UPLOADED names, *.py, the weight
    shards; never checkpoints, predictions or logs). Returns the repo URL."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and (
        p.name in UPLOADED or p.suffix == ".py" or (p.name.startswith("model-") and p.suffix == ".safetensors")))
    if "config.json" not in files:
        raise UserError(f"{folder} holds no model (config.json is missing): nothing to push")
    api = hub_api(token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=getattr(url, "repo_id", repo_id), folder_path=str(folder), allow_patterns=files,
                      commit_message=commit_message, repo_type="model")
    return str(url)
