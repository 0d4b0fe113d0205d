"""Images + one annotation table: `annotations.jsonl`, `annotations.csv` or `annotations.parquet`.

Columns `image`, `question`, `answer`, optional `split`, `answer_type`, `question_type` and
`answers` (every human answer; in CSV a JSON list or `|`-separated). Each line or row is one
sample; a line that cannot be parsed is rejected alone and the rest of the file is still read.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from vlmtune import formats
from vlmtune.readers.base import SourceRecord, record_text, rejected, sample_from_mapping

MAX_CSV_RECORD_LINES = 64  # a quoted field may span lines; an unclosed quote must not swallow the rest of the file


def detect(drop_dir: Path) -> Path | None:
    return next((drop_dir / name for name in formats.TABLE_ANNOTATION_FILES if (drop_dir / name).is_file()), None)


def read(drop_dir: Path) -> Iterator[SourceRecord]:
    annotations = detect(drop_dir)
    if annotations is None:
        raise FileNotFoundError(f"{drop_dir} has none of {formats.TABLE_ANNOTATION_FILES}")
    readers = {".jsonl": read_jsonl, ".csv": read_csv, ".parquet": read_parquet}
    yield from readers[annotations.suffix](annotations)


def read_jsonl(path: Path) -> Iterator[SourceRecord]:
    with open(path, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue  # blank lines are layout, not records
            try:
                text = raw_line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                yield rejected(path.name, line_number, _lossy(raw_line), formats.INVALID_UTF8, str(error))
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield rejected(path.name, line_number, text, formats.INVALID_JSON, str(error))
                continue
            if not isinstance(record, dict):
                yield rejected(path.name, line_number, text, formats.NOT_AN_OBJECT, type(record).__name__)
                continue
            yield SourceRecord(path.name, line_number, text, sample_from_mapping(record))


def read_csv(path: Path) -> Iterator[SourceRecord]:
    """Rows parsed strictly; a row that does not parse (a broken quote) is rejected and reading resumes on the next line."""
    lines = path.read_bytes().splitlines(keepends=True)
    if not lines:
        return
    try:
        header = next(csv.reader([lines[0].decode("utf-8-sig")], strict=True))
    except (UnicodeDecodeError, csv.Error) as error:
        yield rejected(path.name, 1, _lossy(lines[0]), formats.INVALID_CSV, f"unreadable header: {error}")
        return
    index = 1
    while index < len(lines):
        line_number, first = index + 1, lines[index]
        if not first.strip():
            index += 1
            continue
        end = index + 1
        chunk = first
        while chunk.count(b'"') % 2 and end < len(lines) and end - index < MAX_CSV_RECORD_LINES:
            chunk += lines[end]  # a quoted field continues on the next line
            end += 1
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as error:
            yield rejected(path.name, line_number, _lossy(first), formats.INVALID_UTF8, str(error))
            index += 1
            continue
        row, problem = _parse_csv_row(text, header)
        if problem:
            # Only this physical line is given up; the lines it tried to absorb are read again on their own.
            yield rejected(path.name, line_number, _lossy(first).rstrip("\r\n"), formats.INVALID_CSV, problem)
            index += 1
            continue
        mapping = {name: (value if value != "" else None) for name, value in zip(header, row)}
        if mapping.get("answers"):
            mapping["answers"] = _csv_answers(mapping["answers"])
        yield SourceRecord(path.name, line_number, text.rstrip("\r\n"), sample_from_mapping(mapping))
        index = end


def read_parquet(path: Path) -> Iterator[SourceRecord]:
    row_number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):  # streamed: image bytes may be in the table
        for mapping in batch.to_pylist():
            row_number += 1
            yield SourceRecord(path.name, row_number, record_text(mapping), sample_from_mapping(mapping))


def _parse_csv_row(text: str, header: list[str]) -> tuple[list[str], str]:
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as error:
        return [], f"malformed CSV: {error}"
    if len(rows) != 1:
        return [], f"expected one row, parsed {len(rows)}"
    if len(rows[0]) != len(header):
        return [], f"{len(rows[0])} fields, the header has {len(header)}"
    return rows[0], ""


def _csv_answers(value: str) -> list[str] | str:
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # left for validation to reject as an invalid field
    return value.split("|")


def _lossy(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")
