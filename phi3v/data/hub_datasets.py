"""Hugging Face datasets, from the hub or a local copy (save_to_disk folder, parquet files), images left encoded."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from phi3v.common.errors import Unavailable, UserError
from phi3v.data.images import ImageRef


def load_hf_split(hub_id: str, config: str | None, split: str, local_path: str | None = None,
                  columns: Sequence[str] = ()):
    """One split of a hub dataset, or of a local copy (a `save_to_disk` folder or parquet files in the hub layout),
    with images left encoded (sizes read from headers, decoding in DataLoader workers). `split` may carry a row
    range as on the hub ("train[500:]"); the split must have those rows, and every name in `columns`."""
    import datasets

    base, rows = split.split("[")[0], split[len(split.split("[")[0]):]
    if local_path is None:
        try:
            dataset = datasets.load_dataset(hub_id, config, split=base)
        except Exception as error:  # offline, or no such dataset: the user's way out is a local copy
            raise Unavailable(f"could not load the hub dataset {hub_id}" + (f" ({config})" if config else "")
                          + f": {str(error).splitlines()[0][:200]}. Offline? Save a copy where the hub is reachable "
                          "(datasets.load_dataset(...).save_to_disk(DIR), or download its parquet files) and pass "
                          "--dataset_path DIR.") from error
    elif (Path(local_path) / "dataset_dict.json").exists() or (Path(local_path) / "state.json").exists():
        try:
            dataset = datasets.load_from_disk(local_path)
        except Exception as error:  # the datasets library's own errors on an empty or damaged copy
            raise UserError(f"--dataset_path {local_path}: cannot be read as a save_to_disk dataset "
                            f"({type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}); "
                            "is it empty or damaged? Save it again") from error
        if isinstance(dataset, datasets.DatasetDict):
            if base not in dataset:
                raise UserError(f"--dataset_path {local_path}: no split {base!r} (it has {', '.join(dataset)})")
            dataset = dataset[base]
    else:
        files = parquet_files(local_path, base, config)
        try:
            dataset = datasets.load_dataset("parquet", data_files={base: files}, split=base)
        except Exception as error:
            raise UserError(f"--dataset_path {local_path}: its {base} parquet files cannot be read "
                            f"({type(error).__name__}: {str(error).splitlines()[0][:150] if str(error) else ''}); "
                            "are they damaged?") from error
    where = f"--dataset_path {local_path}" if local_path else hub_id
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise UserError(f"{where}: the {base} split has no column {', '.join(map(repr, missing))} (its columns: "
                        f"{', '.join(dataset.column_names)}); is it the right dataset?")
    if rows:
        start, stop = (int(x) if x else None for x in rows.strip("[]").split(":"))
        if max(start or 0, stop or 0) > len(dataset) or (start is not None and start >= len(dataset)):
            raise UserError(f"{where}: rows {rows} asked for, but the {base} split has only {len(dataset)} rows "
                            "(lower --eval_rows, the rows held out for evaluation)")
        dataset = dataset.select(range(len(dataset))[slice(start, stop)])
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(feature.feature, datasets.Image):
            dataset = undecoded_list(dataset, column, type(feature)(datasets.Image(decode=False)))
    return dataset


def parquet_files(path: str | os.PathLike, split: str, config: str | None) -> list[str]:
    """The parquet files of one split of one config: `path` itself if it is a file, else the files in the hub layout
    under it (CONFIG/SPLIT-*.parquet, data/SPLIT-*.parquet or SPLIT/*.parquet); several configs are never merged."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    files = sorted(path.rglob(f"{split}-*.parquet")) or sorted(path.rglob(f"{split}/*.parquet"))
    if not files:
        raise UserError(f"{path}: no save_to_disk dataset and no {split}-*.parquet files in it")
    groups: dict[str, list[str]] = {}
    for file in files:
        folder = file.parent.parent if file.parent.name == split else file.parent
        groups.setdefault(folder.relative_to(path).as_posix(), []).append(str(file))
    if len(groups) == 1:
        return next(iter(groups.values()))
    chosen = [name for name in groups if config is not None and Path(name).name == config]
    if len(chosen) == 1:
        return groups[chosen[0]]
    names = ", ".join(sorted(groups))
    raise UserError(f"{path} holds {split} parquet files of several configs ({names})"
                    + (f", none of them named {config!r}" if config is not None else "")
                    + ": pass the config (--dataset_config NAME) or point to that config's folder; different "
                    "configs are never merged into one training set")


def undecoded_list(dataset, column: str, feature):
    """`cast_column` for a list of images, done as `cast_column` does it for one image: only the feature changes.
    (`cast_column` would rewrite the whole dataset, e.g. as a cache file inside the user's save_to_disk folder.)"""
    from datasets.arrow_dataset import update_metadata_with_features

    try:
        copied = copy.deepcopy(dataset)
        copied._info.features[column] = feature
        copied._data = update_metadata_with_features(copied._data.cast(copied.features.arrow_schema), copied.features)
        return copied
    except (AttributeError, TypeError, ValueError):  # another datasets version: the public way
        return dataset.cast_column(column, feature)


def arrow_files(rows) -> list[str]:
    """The files a loaded split is read from (they key its validation results in the cache)."""
    return [file["filename"] for file in rows.cache_files]


def hub_image(value) -> ImageRef:
    """An image cell of a hub dataset (`{"bytes", "path"}`, or a PIL image) as an ImageRef: only embedded bytes are
    used, a path in a row is never opened (rows are data, not file pointers)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        raise ValueError(f"image cell holds no image bytes (path {value.get('path')!r} is not opened): save the "
                         "dataset with the images embedded (save_to_disk or to_parquet embed them)")
    if isinstance(value, Image.Image):
        return value
    raise ValueError(f"image cell of type {type(value).__name__} is not an image")


def expect(value, kind: str, what: str):
    """`value` if it is of `kind` ("text", "texts", "list", "dict"), else a ValueError naming the field: hub rows
    are checked, not trusted (a string where a list belongs would be read character by character)."""
    ok = {"text": isinstance(value, str), "list": isinstance(value, list), "dict": isinstance(value, dict),
          "texts": isinstance(value, list) and all(isinstance(v, str) for v in value)}[kind]
    if not ok:
        wanted = {"text": "a string", "list": "a list", "dict": "an object", "texts": "a list of strings"}[kind]
        got = "null" if value is None else type(value).__name__
        if isinstance(value, list) and kind == "texts":
            got = "a list holding " + ", ".join(sorted({type(v).__name__ for v in value if not isinstance(v, str)}))
        raise ValueError(f"{what} must be {wanted}, got {got}")
    return value


def cauldron_texts(row: dict) -> list[dict]:
    """The Cauldron's `texts` column, checked: a list of {"user": str, "assistant": str}."""
    texts = expect(row["texts"], "list", '"texts"')
    for number, text in enumerate(texts, start=1):
        expect(text, "dict", f'"texts" item {number}')
        for key in ("user", "assistant"):
            expect(text.get(key), "text", f'"texts" item {number} "{key}"')
    return texts
