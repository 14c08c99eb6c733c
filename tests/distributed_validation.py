"""prepare_dataset in one process or under torchrun; writes what a user would see (used by tests/test_own_data.py).

    python tests/distributed_validation.py TINY_DIR DATA.jsonl OUT_DIR
    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_validation.py TINY_DIR DATA.jsonl OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3v.data.jsonl import jsonl_dataset  # noqa: E402
from phi3v.data.validation import DatasetError, prepare_dataset  # noqa: E402
from phi3v.models.phi3_v.processing import Phi3VProcessor  # noqa: E402


def main(tiny_dir: str, data: str, out: str) -> None:
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(out).mkdir(parents=True, exist_ok=True)
    processor = Phi3VProcessor.from_pretrained(tiny_dir)
    report = {}
    try:
        prepare_dataset(jsonl_dataset(data, Path(data).parent / "images", processor), "train", 1000, False, out,
                        workers=1, disable_tqdm=True)
    except DatasetError as error:
        report["error"] = str(error)
    kept = prepare_dataset(jsonl_dataset(data, Path(data).parent / "images", processor), "train", 1000, True, out,
                           workers=1, disable_tqdm=True)
    report["lengths"], report["names"] = kept.lengths, kept.names
    Path(out, f"report-{rank}.json").write_text(json.dumps(report, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
