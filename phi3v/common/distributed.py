"""Which process this is, and gathering Python objects on rank 0: torch.distributed when it is set up, else one
process."""

from __future__ import annotations

import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_to_rank_zero(items: list) -> list | None:
    rank, size = world()
    if size == 1:
        return items
    gathered = [None] * size if rank == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if rank == 0 else None
