"""Check a whole dataset before the first step and report every problem at once, with file:line or row.

Each item is converted, rendered, its images fully decoded and its length counted (image tokens included). Bad
items stop the run, or with --skip_bad_samples are dropped, logged and written to
OUTPUT_DIR/skipped_samples_<split>.jsonl. The token lengths feed length-grouped batching.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from phi3v.common.distributed import world as world_rank_size
from phi3v.common.errors import BadValue
from phi3v.data.conversation import Problem, render, tag_warnings
from phi3v.data.dataset import ConversationDataset
from phi3v.data.images import image_size, open_image
from phi3v.data.validation_cache import FILE_NAME, ValidationCache, image_key
from phi3v.data.video import VideoFrame

logger = logging.getLogger(__name__)
DatasetError = BadValue  # a dataset with problems: a UserError, and a ValueError for callers that catch those


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
    except (ValueError, Image.DecompressionBombError) as error:  # a video's reasons all come as a ValueError
        return f"{'video' if isinstance(ref, VideoFrame) else 'image'} {name}: {error}"
    except (OSError, SyntaxError) as error:
        return f"image {name}: truncated or corrupt ({error})"
    return None


def check_image(ref, max_pixels: int | None) -> tuple[str | None, tuple[int, int] | None]:
    """(problem, None) or (None, (width, height)) for one image."""
    problem = image_problem(ref, max_pixels)
    return problem, None if problem else image_size(ref)


def validate(dataset: ConversationDataset, max_length: int | None = None, workers: int = 8,
             disable_tqdm: bool = False, desc: str = "validating", chunk: int = 256,
             indices: list[int] | None = None, cache: ValidationCache | None = None,
             limit_name: str = "--max_length", ids: dict[int, str] | None = None
             ) -> tuple[list[int | None], list[Problem]]:
    """(token length per item (None if invalid or not checked), problems) for the items `indices` (default: all,
    and then the problems of unreadable lines too). Repeated ids are problems, or with `ids` (a dict to fill: item
    index -> id) left to the caller, who sees other processes' ids too.

    Items are checked `chunk` at a time (a hub dataset's image bytes are never all in memory); an image shared by
    several items is decoded once, and one that `cache` knows not at all."""
    order = list(range(len(dataset))) if indices is None else list(indices)
    lengths: list[int | None] = [None] * len(dataset)
    problems = list(dataset.load_problems) if indices is None else []
    verdicts: dict = {}  # image key -> (problem message or None, size)
    max_pixels = dataset.max_image_pixels
    found_ids = {} if ids is None else ids
    progress = tqdm(total=len(order), desc=desc, disable=disable_tqdm, unit="sample")
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for first in range(0, len(order), chunk):
            renders = {}
            for index in order[first:first + chunk]:
                sample_id = None
                try:
                    conversation = dataset.conversation(index)
                    sample_id = found_ids[index] = conversation.id
                    renders[index] = (sample_id, render(dataset.processor, conversation, dataset.for_generation))
                    for warning in tag_warnings(conversation):
                        logger.warning(f"{dataset.where(index)} (id {sample_id}): {warning}")
                except ValueError as error:
                    problems.append(Problem(dataset.where(index), getattr(error, "sample_id", sample_id), str(error)))
                except (TypeError, KeyError, IndexError, RecursionError) as error:  # a row of unexpected shape
                    problems.append(Problem(dataset.where(index), sample_id,
                                            f"cannot read this sample ({type(error).__name__}: {error})"))
            new = {_key(ref): ref for _, (_, images, _) in renders.values() for ref in images}
            if cache is not None:  # every file the split names, bad ones included, keys its cache entry
                cache.used.update(key for key in new if isinstance(key, str))  # not a decoded image's identity
                known = {key: cache.image(ref, max_pixels) for key, ref in new.items() if key not in verdicts}
                verdicts.update((key, verdict) for key, verdict in known.items() if verdict is not None)
            new = {key: ref for key, ref in new.items() if key not in verdicts}
            checked = pool.map(lambda ref: check_image(ref, max_pixels), new.values())
            for (key, ref), verdict in zip(new.items(), checked):  # stored one by one: Ctrl-C keeps what was done
                verdicts[key] = verdict
                if cache is not None:
                    cache.store_image(ref, max_pixels, *verdict)
            for index, (sample_id, (text, images, _)) in renders.items():
                # a video's frames share one verdict: reported once
                bad = list(dict.fromkeys(verdicts[_key(ref)][0] for ref in images if verdicts[_key(ref)][0]))
                if bad:
                    problems.extend(Problem(dataset.where(index), sample_id, message) for message in bad)
                    continue
                length = dataset.processor.num_tokens(text, [verdicts[_key(ref)][1] for ref in images])
                if max_length is not None and length > max_length:
                    problems.append(Problem(dataset.where(index), sample_id,
                        f"{length} tokens (images included) exceed {limit_name} {max_length}; a sample is never cut "
                        "inside an image: " + ("raise --max_length" if limit_name == "--max_length" else "shorten it")
                        + ", lower --num_crops, or drop it with --skip_bad_samples"))
                    continue
                lengths[index] = length
            progress.update(len(order[first:first + chunk]))
    finally:
        pool.shutdown(cancel_futures=True)  # after Ctrl-C: no waiting for the images not yet started
        progress.close()
    return lengths, problems if ids is not None else with_duplicate_ids(dataset, problems, found_ids, lengths)


def with_duplicate_ids(dataset: ConversationDataset, problems: list[Problem], ids: dict[int, str],
                       lengths: list[int | None]) -> list[Problem]:
    """`problems` and one for each item whose id an earlier item has (`ids`: item index -> id; its length set to
    None), in the order of the file's lines or rows."""
    first_seen = {}
    for index in sorted(ids):
        if ids[index] in first_seen:
            problems.append(Problem(dataset.where(index), ids[index],
                                    f"duplicate id: {first_seen[ids[index]]} has the same id"))
            lengths[index] = None
        else:
            first_seen[ids[index]] = dataset.where(index)
    return sorted(problems, key=_order)


def _gather(dataset: ConversationDataset, lengths, problems, ids, shard, cache: ValidationCache):
    """Every rank's (lengths, problems, new cache entries) put together, on every rank, in the order one process
    would have found them; ids repeated anywhere in the dataset, whichever ranks checked them, are problems too."""
    _, world = world_rank_size()
    part = ({i: lengths[i] for i in shard}, problems, ids, cache.new_images, sorted(cache.used))
    parts = [part]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part)
    merged = [None] * len(dataset)
    found, all_ids = list(dataset.load_problems), {}
    cache.used = set()
    for shard_lengths, shard_problems, shard_ids, new_images, shard_images in parts:
        for index, length in shard_lengths.items():
            merged[index] = length
        found += shard_problems
        all_ids.update(shard_ids)
        cache.images.update(new_images)
        cache.used.update(shard_images)
    return merged, with_duplicate_ids(dataset, found, all_ids, merged)


def _key(ref):
    """A small key per image, the cache's (a path, a digest of encoded bytes, one per video); a decoded image (not
    hashable) by its identity."""
    key = image_key(ref)
    return key[0] if key else id(ref)


def _order(problem: Problem):
    head, _, tail = problem.where.rpartition(":")
    return (head, int(tail)) if tail.isdigit() else (problem.where, 0)


def prepare_dataset(dataset: ConversationDataset, split: str, max_length: int | None, skip_bad_samples: bool,
                    output_dir: str | Path, workers: int = 8, disable_tqdm: bool = False,
                    cache_dir: str | Path | None = None, limit_name: str = "--max_length") -> ConversationDataset:
    """Validate (each rank its share, results gathered, an earlier start's reused from the cache in `cache_dir`),
    then stop on problems unless skipped. Returns the dataset (less the bad items) with `.lengths` set."""
    rank, world = world_rank_size()
    rank0 = rank == 0
    cache = ValidationCache(Path(cache_dir) / FILE_NAME if cache_dir is not None else None)
    fingerprint = cache.split_fingerprint(dataset, max_length)
    known = cache.split(split, fingerprint)
    if known is not None:
        lengths, problems = known[0], [Problem(**p) for p in known[1]]
        logger.info(f"{split}: validation results reused from {cache.path} (no file changed)")
    else:
        shard, ids = list(range(rank, len(dataset), world)), {}  # interleaved: each rank gets a fair mix of items
        try:
            lengths, problems = validate(dataset, max_length, workers, disable_tqdm or not rank0,
                                         desc=f"validating {split}" + (f" (rank 0 of {world})" if world > 1 else ""),
                                         indices=shard, cache=cache, limit_name=limit_name, ids=ids)
        except KeyboardInterrupt:
            if rank0:  # the images checked so far (rank 0's share), so that the next start checks only the rest
                cache.save()
            raise
        lengths, problems = _gather(dataset, lengths, problems, ids, shard, cache)
        if rank0:
            cache.store_split(split, fingerprint, lengths, [asdict(p) for p in problems])
            cache.save()
    good = [i for i, length in enumerate(lengths) if length is not None]
    if problems:
        listing = "\n  ".join(str(p) for p in problems)
        unreadable = len(dataset.load_problems)  # lines that never became items
        bad, total = len(dataset) - len(good) + unreadable, len(dataset) + unreadable
        skipped = Path(output_dir) / f"skipped_samples_{split}.jsonl"
        if not skip_bad_samples:
            raise DatasetError(f"{split}: {len(problems)} problem(s) in {bad} of {total} samples; nothing was trained."
                               f"\n  {listing}\nFix them, or pass --skip_bad_samples to train without them (they "
                               f"are then listed in {skipped}).")
        if rank0:
            skipped.parent.mkdir(parents=True, exist_ok=True)
            skipped.write_text("".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in problems))
        logger.warning(f"{split}: skipping {len(problems)} bad sample(s) (--skip_bad_samples), "
                       f"{len(good)} remain:\n  {listing}")
    if not good:
        raise DatasetError(f"{split}: no usable samples")
    kept = dataset if len(good) == len(dataset) else dataset.subset(good)
    kept.lengths = [lengths[i] for i in good]
    return kept


def prepare_splits(splits: dict[str, ConversationDataset], data_args, training_args) -> dict[str, ConversationDataset]:
    """`prepare_dataset` for every split (with --validate_only, a summary of each printed): training sequences
    limited by --max_length or the model's context, evaluation prompts by the context less --max_new_tokens."""
    prepared = {}
    cache_dir = getattr(data_args, "cache_dir", None) or training_args.output_dir  # `--cache_dir none`: no cache
    cache_dir = None if str(cache_dir).lower() == "none" else cache_dir
    for split, dataset in splits.items():
        context = getattr(dataset.processor, "context_length", None)
        if split == "train":
            limit, name = (data_args.max_length, "--max_length") if data_args.max_length else \
                (context, "the model's context of")
        else:
            limit = context - data_args.max_new_tokens if context else None
            name = f"the model's context ({context}) less --max_new_tokens ({data_args.max_new_tokens}) ="
        prepared[split] = prepare_dataset(dataset, split, limit, data_args.skip_bad_samples, training_args.output_dir,
                                          training_args.dataloader_num_workers or 4, training_args.disable_tqdm,
                                          cache_dir, limit_name=name)
        if data_args.validate_only:
            lengths = sorted(prepared[split].lengths)
            print(f"{split}: {len(lengths)} samples, tokens per sample min {lengths[0]} / median "
                  f"{lengths[len(lengths) // 2]} / max {lengths[-1]}, total {sum(lengths):,}")
    return prepared
