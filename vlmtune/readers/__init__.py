"""The layouts a drop may come in, each read by its own module behind one detection function.

`detect_format` picks the layout (or takes it from the drop's `drop.json`), `read_drop` yields
one `SourceRecord` per sample or unreadable record. Readers only parse; what a valid sample is
and whether its image file may be read is decided once, in `ingest`, for every format.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from vlmtune import formats
from vlmtune.readers import hf_dataset, llava, table, vqav2
from vlmtune.readers.base import SourceRecord

READERS: dict[str, Callable[[Path], Iterator[SourceRecord]]] = {
    "table": table.read,
    "llava": llava.read,
    "vqav2": vqav2.read,
    "hf_dataset": hf_dataset.read,
}
ACCEPTED = (
    "a folder of images with annotations.jsonl, annotations.csv or annotations.parquet (columns image, question, answer, optional split); "
    "LLaVA conversation JSON (image + conversations of human/gpt turns); "
    "the VQAv2 / COCO layout (a questions JSON and an annotations JSON beside COCO images); "
    "a Hugging Face dataset saved with save_to_disk, or Parquet files with an image column. "
    f'A drop may name its format in {formats.DROP_CONFIG_FILE}: {{"format": one of {sorted(READERS)}}}'
)


class UnknownDropFormat(ValueError):
    """The drop's layout is none that vlmtune reads; the message lists those it does."""


def detect_format(drop_dir: Path) -> str:
    """The drop's format: named in `drop.json`, else the first layout whose files are present."""
    drop_dir = Path(drop_dir)
    config_file = drop_dir / formats.DROP_CONFIG_FILE
    if config_file.is_file():
        named = json.loads(config_file.read_text()).get("format")
        if named not in READERS:
            raise UnknownDropFormat(f"{config_file} names format {named!r}; vlmtune reads {ACCEPTED}")
        return named
    # Most specific first: an annotation table or a saved dataset is unambiguous, JSON files need a peek.
    if table.detect(drop_dir):
        return "table"
    if hf_dataset.saved_to_disk(drop_dir):
        return "hf_dataset"
    if vqav2.detect(drop_dir):
        return "vqav2"
    if llava.detect(drop_dir):
        return "llava"
    if hf_dataset.detect(drop_dir):
        return "hf_dataset"
    raise UnknownDropFormat(f"drop at {drop_dir} has no layout vlmtune reads; it accepts {ACCEPTED}")


def read_drop(drop_dir: Path, drop_format: str) -> Iterator[SourceRecord]:
    return READERS[drop_format](Path(drop_dir))


__all__ = ["ACCEPTED", "READERS", "SourceRecord", "UnknownDropFormat", "detect_format", "read_drop"]
