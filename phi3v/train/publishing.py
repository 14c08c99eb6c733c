"""Training outputs in the serving layout, the run's model card, and the upload to the Hub."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from peft import PeftModel

from phi3v.common.errors import UserError
from phi3v.serve.publish import RUN_INFO, hub_api, model_card, push_folder, read_run
from phi3v.train.loading import model_family

logger = logging.getLogger(__name__)


class PublishingMixin:
    """Phi3VTrainer's saves: every model directory servable, pushed once at the end with its card."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """save_pretrained, plus what vLLM and transformers 4.x need (complete_layout) in every model directory:
        the final output and each checkpoint of the full modes (a LoRA output is an adapter; its merge is).
        A DeepSpeed-gathered state_dict holds tied weights as separate copies, which save_pretrained then writes:
        they are left out, as save_pretrained leaves them out of the model's own (Phi-4's lm_head)."""
        if state_dict is not None and not isinstance(self.model, PeftModel):
            tied = getattr(self.model, "all_tied_weights_keys", None) or {}
            state_dict = {k: v for k, v in state_dict.items() if k not in tied}
        super()._save(output_dir, state_dict)
        if self.args.should_save and not isinstance(self.model, PeftModel):
            base = self.model.config._name_or_path
            complete_layout = model_family(self.model).complete_layout
            try:
                complete_layout(output_dir or self.args.output_dir, base)
            except UserError as error:  # never lose a run over it: point auto_map at the hub's code instead
                logger.warning(f"{error} Writing auto_map references to the code on the Hub instead.")
                complete_layout(output_dir or self.args.output_dir, base, remote_code_files=False)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # --push_to_hub uploads once, at the end of the run (reporting.finish), with the evaluation in the card
        super().save_model(output_dir, _internal_call=True)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """--push_to_hub: create the repo now, so that a missing login fails before training, not after it."""
        self.hub_model_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.push_in_progress = None
        if self.is_world_process_zero():
            url = hub_api(token or self.args.hub_token).create_repo(
                self.hub_model_id, private=self.args.hub_private_repo if private is None else private, exist_ok=True)
            self.hub_model_id = getattr(url, "repo_id", self.hub_model_id)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        pass  # checkpoints stay local: the repo gets the final model in the serving layout

    def save_run_record(self, folder: Path) -> dict:
        """run_info.json: base model, mode, frozen parts, data flags and command line (train.parsing.run_record)."""
        record = dict(getattr(self.args, "run_record", None) or {})
        (folder / RUN_INFO).write_text(json.dumps(record, indent=1, default=str) + "\n")
        return record

    def write_run_info(self) -> Path | None:
        """run_info.json in the output directory, and the model card (README.md) of the run's servable model:
        the output directory (full modes) or OUTPUT_DIR/merged (LoRA, once merged). Returns that directory."""
        out = Path(self.args.output_dir)
        record = self.save_run_record(out)
        lora = isinstance(self.model, PeftModel)
        model_dir = out / "merged" if lora else out
        if not (model_dir / "config.json").is_file():
            return None
        _, metrics = read_run(out)
        data = {**record.get("data", {}), "train examples": len(self.train_dataset or [])}
        if self.eval_dataset is not None:
            data["evaluation examples"] = len(self.eval_dataset)
        mode = record.get("mode", "?") + (", adapter merged into the base" if lora else "")
        base = record.get("base_model") or self.model.config._name_or_path
        card = model_card(base, mode, data, metrics, [record.get("command", "")], model_family(self.model))
        (model_dir / "README.md").write_text(card)
        if lora and (out / "all_results.json").is_file():
            shutil.copy2(out / "all_results.json", model_dir / "all_results.json")
        return model_dir

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Upload the run's model in the layout of `python -m phi3v.export` (LoRA: the adapter merged into the base,
        in bf16, as OUTPUT_DIR/merged), with its model card. Only the model files go up (serve.publish.push_folder)."""
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:
            self.init_hf_repo(token, private)
        model_dir = self.write_run_info()
        if model_dir is None:  # LoRA without --save_merged_model
            from phi3v.serve.export import export_merged

            export_merged(self.args.output_dir, Path(self.args.output_dir) / "merged")
            model_dir = self.write_run_info()
        private = self.args.hub_private_repo if private is None else private
        return push_folder(model_dir, self.hub_model_id, private, token or self.args.hub_token,
                           commit_message or "End of training")
