"""Length-grouped batches: little padding, and an order that depends only on (seed, epoch)."""

from __future__ import annotations

import torch


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Random order, except that within each group of `batch_size * group_batches` indices, items are arranged by
    length (longest first), so that batches need little padding. Lengths within `tolerance` count as equal and stay
    in random order (an exact sort could give one-class batches where the length follows the label). The order
    depends only on (seed, epoch), so resuming replays it exactly.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_batches: int = 50,
                 tolerance: float = 0.04):
        self.lengths = lengths
        self.group = batch_size * group_batches
        self.seed = seed
        self.tolerance = tolerance
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.group):
            yield from self.arrange(order[start:start + self.group], generator)

    def arrange(self, indices: list[int], generator: torch.Generator) -> list[int]:
        """Longest first, in runs whose lengths are within `tolerance`; each run shuffled."""
        runs, run = [], []
        for i in sorted(indices, key=lambda i: -self.lengths[i]):
            if run and self.lengths[run[0]] > self.lengths[i] * (1 + self.tolerance):
                runs.append(run)
                run = []
            run.append(i)
        runs.append(run)
        return [r[j] for r in runs for j in torch.randperm(len(r), generator=generator).tolist()]
