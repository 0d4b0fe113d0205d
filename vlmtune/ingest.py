"""Stage 1: read a drop, in any layout `vlmtune.readers` knows, into a table of raw records.

Nothing is judged here beyond what is needed to find the record and its image: a record that
cannot be parsed, lacks a field, or names an image that is missing or outside the drop is
quarantined with its reason. The image is hashed, not decoded; decoding and content rules belong
to `clean`. Images carried inside records (HF datasets) are written once to `embedded/<sha256>`
beside the table, so no stage holds a drop's images in memory at once.

`n_in` counts samples: one per record, one per answer turn of a multi-turn conversation.
A broken record never fails the run; an operational failure (permission denied, disk full) does.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vlmtune import formats
from vlmtune.artifacts import fingerprint
from vlmtune.quarantine import QuarantineLog
from vlmtune.readers import SourceRecord, detect_format, read_drop

REQUIRED_FIELDS = ("image", "question", "answer")
OPTIONAL_TEXT_FIELDS = ("split", "answer_type", "question_type", "history")
EMBEDDED_DIR = "embedded"
WRITE_BATCH_ROWS = 4096
_READ_CHUNK = 1 << 20


def ingest_drop(drop_dir: Path, drop_name: str, out_dir: Path) -> dict[str, Any]:
    """Write `raw_samples.parquet` and `quarantine.parquet` for one drop; return the counts."""
    drop_dir, out_dir = Path(drop_dir).resolve(), Path(out_dir)
    drop_format = detect_format(drop_dir)
    quarantine = QuarantineLog(stage="raw_samples")
    n_in, n_kept, image_hashes = 0, 0, set()
    with operational_errors(f"ingesting drop {drop_name!r} from {drop_dir}"), pq.ParquetWriter(out_dir / formats.RAW_SAMPLES_FILE, formats.RAW_SCHEMA) as writer:
        for rows in _batches(_raw_rows(drop_dir, drop_format, drop_name, out_dir, quarantine), WRITE_BATCH_ROWS):
            writer.write_table(pa.Table.from_pylist(rows, schema=formats.RAW_SCHEMA))
            n_kept += len(rows)
            image_hashes.update(row["image_sha256"] for row in rows)
        n_in = n_kept + len(quarantine)
        quarantine.write(out_dir / formats.QUARANTINE_FILE)
    return {
        "drop": drop_name,
        "drop_dir": str(drop_dir),
        "format": drop_format,
        "n_in": n_in,
        "n_kept": n_kept,
        "n_quarantined": len(quarantine),
        "quarantine_reasons": quarantine.counts(),
        "n_images": len(image_hashes),
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


@contextmanager
def operational_errors(action: str) -> Iterator[None]:
    """Re-raise what no record can be blamed for (permissions, a full disk) with what was being done."""
    try:
        yield
    except PermissionError as error:
        raise PermissionError(error.errno, f"permission denied while {action}: {error.filename}; fix the permissions and re-run") from error
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(error.errno, f"disk full while {action}: {error.filename or ''}; free space and re-run") from error
        raise


def _raw_rows(drop_dir: Path, drop_format: str, drop_name: str, out_dir: Path, quarantine: QuarantineLog) -> Iterator[dict[str, Any]]:
    for source in read_drop(drop_dir, drop_format):
        if source.sample is None:
            quarantine.add(drop=drop_name, file=source.file, line=source.line, reason=source.reason, detail=source.detail, record=source.record)
            continue
        row, problem = _raw_row(source, drop_dir, drop_name, out_dir)
        if problem:
            quarantine.add(drop=drop_name, file=source.file, line=source.line, reason=problem[0], detail=problem[1], record=source.record)
            continue
        yield row


def _raw_row(source: SourceRecord, drop_dir: Path, drop_name: str, out_dir: Path) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    sample = source.sample
    image_bytes = sample.get("image_bytes")
    for field in REQUIRED_FIELDS:
        if field == "image" and image_bytes:
            continue
        if sample.get(field) is None:
            return None, (formats.MISSING_FIELD, field)
        if not isinstance(sample[field], str):
            return None, (formats.INVALID_FIELD, f"{field} must be a string, got {type(sample[field]).__name__}")
    optional = {}
    for field in OPTIONAL_TEXT_FIELDS:
        value = sample.get(field)
        if value is not None and not isinstance(value, str):
            return None, (formats.INVALID_FIELD, f"{field} must be a string, got {type(value).__name__}")
        optional[field] = value or None
    answers = sample.get("answers")
    if answers is not None and not (isinstance(answers, list) and all(isinstance(item, str) for item in answers)):
        return None, (formats.INVALID_FIELD, "answers must be a list of strings")
    if optional["split"] is not None and optional["split"] not in formats.SPLITS:
        return None, (formats.INVALID_SPLIT, f"{optional['split']!r} is not one of {formats.SPLITS}")
    if image_bytes:
        image, sha256, size = _store_embedded(image_bytes, out_dir), hashlib.sha256(image_bytes).hexdigest(), len(image_bytes)
    else:
        image_path = resolve_inside(drop_dir, sample["image"])
        if image_path is None:
            return None, (formats.PATH_OUTSIDE_DROP, sample["image"])
        if not image_path.is_file():
            return None, (formats.IMAGE_MISSING, sample["image"])
        image, (sha256, size) = sample["image"], _hash_file(image_path)
    line_id = f"{source.line}" if source.turn is None else f"{source.line}#{source.turn}"
    return {
        "sample_id": f"{drop_name}:{line_id}",
        "drop": drop_name,
        "line": source.line,
        "image": image,
        "image_sha256": sha256,
        "image_size_bytes": size,
        "question": sample["question"],
        "answer": sample["answer"],
        **optional,
        "record": source.record,
        "file": source.file,
        "answers": answers,
        "image_embedded": bool(image_bytes),
    }, None


def _store_embedded(image_bytes: bytes, out_dir: Path) -> str:
    relative = f"{EMBEDDED_DIR}/{hashlib.sha256(image_bytes).hexdigest()}"
    path = out_dir / relative
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image_bytes)
    return relative


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:  # in chunks: one image may be large, and only its hash is needed here
        while block := handle.read(_READ_CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _batches(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
