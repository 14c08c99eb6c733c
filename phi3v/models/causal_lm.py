"""What both families' causal LMs share: loading a checkpoint safely, and the loss on supervised tokens only."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from phi3v.common.errors import Unavailable
from phi3v.models.family import load_pretrained


def supervised_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                       num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy, with the LM head applied only where the label is supervised: transformers' causal-LM
    loss (mean, or sum / num_items_in_batch) without the (B, L, vocab) logits (on DocVQA ~99% of labels are -100)."""
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]  # targets[t] = labels[t + 1]
    keep = targets != -100
    if num_items_in_batch is None and not keep.any():  # nothing supervised: zero, not 0/0
        return hidden.sum() * 0.0
    logits = lm_head(hidden[keep]).float()  # (supervised tokens, vocab)
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    if num_items_in_batch is None:
        return loss / keep.sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def damaged_safetensors(directory: Path) -> str | None:
    """The first *.safetensors file of `directory` whose header or size is wrong, with the reason."""
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    f.get_slice(name)  # checks each tensor's byte range against the file
        except (SafetensorError, OSError, ValueError) as error:
            return f"{path} ({str(error).splitlines()[0][:120]})"
    return None


def load_checked(from_pretrained, path, *args, **kwargs):
    """`load_pretrained(from_pretrained, path, ...)` from safetensors only: a damaged local file also raises
    Unavailable, with a one-line reason."""
    kwargs.setdefault("use_safetensors", True)  # never unpickle model files: a .bin can run arbitrary code
    try:
        return load_pretrained(from_pretrained, path, *args, **kwargs)
    except (OSError, SafetensorError) as error:
        damaged = damaged_safetensors(Path(path))  # none for a hub id
        if damaged:
            raise Unavailable(f"{damaged}: not a readable safetensors file (truncated or corrupt); copy it "
                              "again from its source") from error
        raise
