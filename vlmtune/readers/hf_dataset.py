"""A Hugging Face dataset: saved with `save_to_disk` (Arrow files) or as Parquet files with an image column.

Read with pyarrow alone, batch by batch, so a drop of large images is never held in memory at
once and nothing is unpickled. The image column is a `datasets.Image` struct {bytes, path}, raw
bytes, or a path string; a path is resolved inside the drop like every other path. The split is
the DatasetDict key or the Parquet file's name (`train-00000-of-00001.parquet`, `data/test/...`),
unless a `split` column says otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlmtune import formats
from vlmtune.readers.base import SourceRecord, record_text, sample_from_mapping, walk_files

BATCH_ROWS = 256
_SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation", "test": "test"}


def detect(drop_dir: Path) -> list[tuple[Path, str | None]]:
    """Data files with their split: Arrow files of a saved dataset, else Parquet files; empty when neither."""
    saved = saved_to_disk(drop_dir)
    if saved:
        return saved
    parquet = [path for path in walk_files(drop_dir, (".parquet",)) if path.name not in formats.TABLE_ANNOTATION_FILES]
    return [(path, _split_from_path(path.relative_to(drop_dir))) for path in parquet if _has_image_column(pq.read_schema(path))]


def read(drop_dir: Path) -> Iterator[SourceRecord]:
    for path, split in detect(drop_dir):
        file = str(path.relative_to(drop_dir))
        batches = _arrow_batches(path) if path.suffix == ".arrow" else pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        row_number = 0
        for batch in batches:
            for mapping in batch.to_pylist():
                row_number += 1
                if "image" not in mapping:
                    mapping["image"] = mapping.get(_image_column(batch.schema))
                sample = sample_from_mapping(mapping)
                sample["split"] = sample["split"] or split
                yield SourceRecord(file, row_number, record_text(mapping), sample)


def saved_to_disk(drop_dir: Path) -> list[tuple[Path, str | None]]:
    if (drop_dir / "dataset_dict.json").is_file():
        splits = json.loads((drop_dir / "dataset_dict.json").read_text()).get("splits", [])
        return [item for name in splits for item in _state_files(drop_dir, drop_dir / name, _SPLIT_NAMES.get(str(name).lower()))]
    if (drop_dir / "state.json").is_file():
        return _state_files(drop_dir, drop_dir, None)
    return []


def _state_files(drop_dir: Path, folder: Path, split: str | None) -> list[tuple[Path, str | None]]:
    folder = folder.resolve()
    if not folder.is_relative_to(drop_dir) or not (folder / "state.json").is_file():
        return []  # a split folder that leads out of the drop is not read
    state = json.loads((folder / "state.json").read_text())
    files = [(folder / item["filename"]).resolve() for item in state.get("_data_files", []) if isinstance(item, dict) and "filename" in item]
    return [(path, split) for path in files if path.is_relative_to(drop_dir) and path.is_file()]


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)  # save_to_disk writes the Arrow stream format
        for batch in reader:
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(start, BATCH_ROWS)


def _image_column(schema: pa.Schema) -> str | None:
    if "image" in schema.names:
        return "image"
    for field in schema:
        if pa.types.is_struct(field.type) and {"bytes", "path"} <= {child.name for child in field.type}:
            return field.name
    return None


def _has_image_column(schema: pa.Schema) -> bool:
    return _image_column(schema) is not None


def _split_from_path(relative: Path) -> str | None:
    for part in reversed([*relative.parent.parts, relative.stem]):
        name = part.lower().split("-")[0].split("_")[0]
        if name in _SPLIT_NAMES:
            return _SPLIT_NAMES[name]
    return None
