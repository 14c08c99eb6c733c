"""Check a whole dataset before the first step and report every problem at once, with file:line or row.

Each item is converted (schema), rendered (image tags vs images, answers), its images opened and fully decoded
(missing, not an image, truncated, corrupt, too many pixels, outside the image root) and its length counted
(image tokens included, against --max_length). Bad items stop the run, or with --skip_bad_samples are dropped,
logged and written to OUTPUT_DIR/skipped_samples_<split>.jsonl. The token lengths feed length-grouped batching.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from phi3v.data import ConversationDataset, Problem, image_size, open_image, render
from phi3v.errors import UserError

logger = logging.getLogger(__name__)


class DatasetError(UserError, ValueError):
    pass


def image_problem(ref, max_pixels: int | None) -> str | None:
    """Why this image cannot be used, or None."""
    name = str(ref) if not isinstance(ref, (bytes, Image.Image)) else "embedded image"
    try:
        open_image(ref, max_pixels)
    except FileNotFoundError:
        return f"image {name}: file not found"
    except IsADirectoryError:
        return f"image {name}: is a directory, not an image"
    except UnidentifiedImageError:
        return f"image {name}: not an image file (or an unsupported format)"
    except Image.DecompressionBombError as error:
        return f"image {name}: {error}"
    except ValueError as error:
        return f"image {name}: {error}"
    except (OSError, SyntaxError) as error:
        return f"image {name}: truncated or corrupt ({error})"
    return None


def validate(dataset: ConversationDataset, max_length: int | None = None, workers: int = 8,
             disable_tqdm: bool = False, desc: str = "validating", chunk: int = 256
             ) -> tuple[list[int | None], list[Problem]]:
    """(token length per item (None if invalid), problems) for every item of `dataset`.

    Items are checked `chunk` at a time, so a hub dataset's image bytes are never all in memory at once; an image
    shared by several items (a page with many questions) is decoded once.
    """
    lengths: list[int | None] = [None] * len(dataset)
    problems = list(dataset.load_problems)
    verdicts: dict = {}  # image key -> problem message or None
    progress = tqdm(total=len(dataset), desc=desc, disable=disable_tqdm)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for first in range(0, len(dataset), chunk):
            renders = {}
            for index in range(first, min(first + chunk, len(dataset))):
                sample_id = None
                try:
                    conversation = dataset.conversation(index)
                    sample_id = conversation.id
                    renders[index] = (sample_id, render(dataset.processor, conversation, dataset.for_generation))
                except ValueError as error:
                    problems.append(Problem(dataset.where(index), getattr(error, "sample_id", sample_id), str(error)))
            new = {_key(ref): ref for _, (_, images, _) in renders.values() for ref in images}
            new = {key: ref for key, ref in new.items() if key not in verdicts}
            checked = pool.map(lambda ref: image_problem(ref, dataset.max_image_pixels), new.values())
            verdicts.update(zip(new, checked))
            for index, (sample_id, (text, images, _)) in renders.items():
                # a video's frames share one verdict: reported once
                bad = list(dict.fromkeys(verdicts[_key(ref)] for ref in images if verdicts[_key(ref)]))
                if bad:
                    problems.extend(Problem(dataset.where(index), sample_id, message) for message in bad)
                    continue
                length = dataset.processor.num_tokens(text, [image_size(ref) for ref in images])
                if max_length is not None and length > max_length:
                    problems.append(Problem(
                        dataset.where(index), sample_id,
                        f"{length} tokens (images included) exceed --max_length {max_length}; a sample is never cut "
                        "inside an image: raise --max_length, lower --num_crops, or drop it with --skip_bad_samples"))
                    continue
                lengths[index] = length
            progress.update(min(chunk, len(dataset) - first))
    progress.close()
    problems.sort(key=lambda p: _order(p.where))
    return lengths, problems


def _key(ref):
    """A small key per image: the path, or a digest of encoded bytes (not the bytes themselves)."""
    if isinstance(ref, bytes):
        return hashlib.blake2b(ref, digest_size=16).digest()
    return str(ref) if isinstance(ref, os.PathLike) else ref


def _order(where: str):
    head, _, tail = where.rpartition(":")
    return (head, int(tail)) if tail.isdigit() else (where, 0)


def prepare_dataset(dataset: ConversationDataset, split: str, max_length: int | None, skip_bad_samples: bool,
                    output_dir: str | Path, workers: int = 8, disable_tqdm: bool = False) -> ConversationDataset:
    """Validate on rank 0, share the verdict with all ranks; stop on problems unless they may be skipped.

    Returns the dataset (without the bad items when skipping) with `.lengths` set for length grouping.
    """
    verdict = [None]
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if rank0:
        lengths, problems = validate(dataset, max_length, workers, disable_tqdm, desc=f"validating {split}")
        verdict = [(lengths, problems)]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)
    lengths, problems = verdict[0]
    good = [i for i, length in enumerate(lengths) if length is not None]
    if problems:
        listing = "\n  ".join(str(p) for p in problems)
        unreadable = len(dataset.load_problems)  # lines that never became items
        bad, total = len(dataset) - len(good) + unreadable, len(dataset) + unreadable
        if not skip_bad_samples:
            raise DatasetError(
                f"{split}: {len(problems)} problem(s) in {bad} of {total} samples; nothing was trained."
                f"\n  {listing}\nFix them, or pass --skip_bad_samples to train "
                f"without them (they are then listed in {Path(output_dir) / f'skipped_samples_{split}.jsonl'})."
            )
        if rank0:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(output_dir) / f"skipped_samples_{split}.jsonl", "w") as f:
                for problem in problems:
                    f.write(json.dumps(asdict(problem), ensure_ascii=False) + "\n")
        logger.warning(f"{split}: skipping {len(problems)} bad sample(s) (--skip_bad_samples), "
                       f"{len(good)} remain:\n  {listing}")
    if not good:
        raise DatasetError(f"{split}: no usable samples")
    kept = dataset if len(good) == len(dataset) else dataset.subset(good)
    kept.lengths = [lengths[i] for i in good]
    return kept


def summarize(split: str, dataset: ConversationDataset) -> str:
    lengths = sorted(dataset.lengths)
    median = lengths[len(lengths) // 2]
    return (f"{split}: {len(lengths)} samples, tokens per sample min {lengths[0]} / median {median}"
            f" / max {lengths[-1]}, total {sum(lengths):,}")


def prepare_splits(splits: dict[str, ConversationDataset], data_args, training_args) -> dict[str, ConversationDataset]:
    """`prepare_dataset` for every split (the length limit applies to training sequences only); with
    --validate_only, also print a summary of each."""
    prepared = {}
    for split, dataset in splits.items():
        prepared[split] = prepare_dataset(
            dataset, split, data_args.max_length if split == "train" else None, data_args.skip_bad_samples,
            training_args.output_dir, training_args.dataloader_num_workers or 4, training_args.disable_tqdm,
        )
        if data_args.validate_only:
            print(summarize(split, prepared[split]))
    return prepared
