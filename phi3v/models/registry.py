"""The model families this project fine-tunes, picked by a checkpoint's config.json `model_type`."""

from __future__ import annotations

import json
import os

from phi3v.common.errors import UserError
from phi3v.common.hub import resolve_file
from phi3v.models.family import ModelFamily
from phi3v.models.phi3_v.family import PHI3_V
from phi3v.models.phi4_mm.family import PHI4_MM

FAMILIES = (PHI3_V, PHI4_MM)
REMOTE_CODE_LAYOUTS = {  # checkpoints of a known model in a layout transformers 5 does not load natively
    "phi4mm": ": this is Phi-4-multimodal in its remote-code layout (the hub repo's main branch); use the layout "
              "transformers loads natively (model_type phi4_multimodal), e.g. `hf download "
              "microsoft/Phi-4-multimodal-instruct --revision refs/pr/70 --local-dir DIR`",
}


def family_of(model_type: str | None) -> ModelFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for family in FAMILIES for t in family.model_types)
    raise UserError(f"model_type {model_type!r} is not a model family this project fine-tunes (it knows: {known})"
                    + REMOTE_CODE_LAYOUTS.get(model_type, ""))


def checkpoint_family(path: str | os.PathLike) -> ModelFamily:
    """The family of a checkpoint folder or hub id, from its config.json."""
    config = json.loads(resolve_file(path, "config.json").read_text())
    return family_of(config.get("model_type"))
