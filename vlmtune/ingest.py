"""Stage 1: read a drop (a folder of images and `annotations.jsonl`) into a table of raw records.

Nothing is judged here beyond what is needed to find the record and its image: a line that is not
JSON, lacks a field, or names an image that is missing or outside the drop is quarantined with its
reason. The image is hashed, not decoded; decoding and content rules belong to `clean`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlmtune import formats
from vlmtune.artifacts import fingerprint
from vlmtune.quarantine import QuarantineLog

REQUIRED_FIELDS = ("image", "question", "answer")
OPTIONAL_TEXT_FIELDS = ("split", "answer_type", "question_type")


def ingest_drop(drop_dir: Path, drop_name: str, out_dir: Path) -> dict[str, Any]:
    """Write `raw_samples.parquet` and `quarantine.parquet` for one drop; return the counts."""
    drop_dir = Path(drop_dir).resolve()
    annotations = drop_dir / formats.ANNOTATIONS_FILE
    if not annotations.is_file():
        raise FileNotFoundError(f"drop {drop_name!r} at {drop_dir} has no {formats.ANNOTATIONS_FILE}")
    quarantine = QuarantineLog(stage="raw_samples")
    rows = []
    n_in = 0
    with open(annotations, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue  # blank lines are layout, not records
            n_in += 1
            row = _read_record(raw_line, line_number, drop_dir, drop_name, quarantine)
            if row is not None:
                rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=formats.RAW_SCHEMA), out_dir / formats.RAW_SAMPLES_FILE)
    quarantine.write(out_dir / formats.QUARANTINE_FILE)
    return {
        "drop": drop_name,
        "drop_dir": str(drop_dir),
        "n_in": n_in,
        "n_kept": len(rows),
        "n_quarantined": len(quarantine),
        "quarantine_reasons": quarantine.counts(),
        "n_images": len({row["image_sha256"] for row in rows}),
    }


def drop_fingerprint(drop_dir: Path) -> str:
    """Changes whenever any file of the drop is added, removed, resized or touched."""
    drop_dir = Path(drop_dir)
    listing = [
        (str(path.relative_to(drop_dir)), stat.st_size, stat.st_mtime_ns)
        for path in sorted(drop_dir.rglob("*"))
        if path.is_file() and (stat := path.stat())
    ]
    return fingerprint(listing)


def resolve_inside(drop_dir: Path, relative: str) -> Path | None:
    """The file a record names, or None if the name leaves the drop (absolute, `..`, or a symlink out)."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts or not relative.strip():
        return None
    resolved = (drop_dir / candidate).resolve()
    return resolved if resolved.is_relative_to(drop_dir) else None


def _read_record(
    raw_line: bytes, line_number: int, drop_dir: Path, drop_name: str, quarantine: QuarantineLog
) -> dict[str, Any] | None:
    def reject(reason: str, detail: str = "", record: str | None = None) -> None:
        text = record if record is not None else raw_line.decode("utf-8", errors="replace").rstrip("\n")
        quarantine.add(drop=drop_name, file=formats.ANNOTATIONS_FILE, line=line_number, reason=reason, detail=detail, record=text)

    try:
        text = raw_line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        return reject(formats.INVALID_UTF8, str(error))
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return reject(formats.INVALID_JSON, str(error))
    if not isinstance(record, dict):
        return reject(formats.NOT_AN_OBJECT, type(record).__name__)
    for field in REQUIRED_FIELDS:
        if field not in record or record[field] is None:
            return reject(formats.MISSING_FIELD, field)
        if not isinstance(record[field], str):
            return reject(formats.INVALID_FIELD, f"{field} must be a string, got {type(record[field]).__name__}")
    optional = {}
    for field in OPTIONAL_TEXT_FIELDS:
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            return reject(formats.INVALID_FIELD, f"{field} must be a string, got {type(value).__name__}")
        optional[field] = value or None
    if optional["split"] is not None and optional["split"] not in formats.SPLITS:
        return reject(formats.INVALID_SPLIT, f"{optional['split']!r} is not one of {formats.SPLITS}")
    image_path = resolve_inside(drop_dir, record["image"])
    if image_path is None:
        return reject(formats.PATH_OUTSIDE_DROP, record["image"])
    if not image_path.is_file():
        return reject(formats.IMAGE_MISSING, record["image"])
    image_bytes = image_path.read_bytes()
    return {
        "sample_id": f"{drop_name}:{line_number}",
        "drop": drop_name,
        "line": line_number,
        "image": record["image"],
        "image_sha256": hashlib.sha256(image_bytes).hexdigest(),
        "image_size_bytes": len(image_bytes),
        "question": record["question"],
        "answer": record["answer"],
        **optional,
        "record": text,
    }
