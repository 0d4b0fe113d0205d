"""What every reader yields: one `SourceRecord` per sample, or per record it could not read."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class SourceRecord:
    """A sample as its source gave it, or (sample None) a record rejected with a reason.

    `sample` holds the raw values under the names of RAW_SCHEMA (`image`, `question`, `answer`,
    optional `answers`, `split`, `answer_type`, `question_type`, `history`) plus `image_bytes`
    when the record carries its image; types are checked once, in `ingest`, for every format.
    """

    file: str  # relative to the drop
    line: int  # 1-based line (text files) or row / list index (JSON lists, Parquet, Arrow)
    record: str  # the original record as text, kept in the quarantine
    sample: dict[str, Any] | None = None
    reason: str = ""
    detail: str = ""
    turn: int | None = None  # which answer turn of a multi-turn conversation


def rejected(file: str, line: int, record: str, reason: str, detail: str = "") -> SourceRecord:
    return SourceRecord(file=file, line=line, record=record, reason=reason, detail=detail)


def sample_from_mapping(mapping: dict[str, Any]) -> dict[str, Any]:
    """The known fields of a flat record (JSON line, CSV row, Parquet row); unknown fields stay in `record` only."""
    image_path, image_bytes = image_source(mapping.get("image"))
    answers = mapping.get("answers")
    answer = mapping.get("answer")
    if answer is None:
        answer = mapping.get("multiple_choice_answer")
    if answer is None and isinstance(answers, list):
        answer = most_common_answer(answers)
    return {
        "image": image_path,
        "image_bytes": image_bytes,
        "question": mapping.get("question"),
        "answer": answer,
        "answers": answer_texts(answers) if answers is not None else None,
        "split": mapping.get("split"),
        "answer_type": mapping.get("answer_type"),
        "question_type": mapping.get("question_type"),
        "history": None,
    }


def image_source(value: Any) -> tuple[Any, bytes | None]:
    """(path, bytes) of an image value: a path string, or a HF `Image` struct {bytes, path}."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return value.get("path") or None, bytes(data)
        return value.get("path"), None
    if isinstance(value, (bytes, bytearray)):
        return None, bytes(value)
    return value, None


def answer_texts(answers: Any) -> Any:
    """VQAv2 answers come as [{"answer": ...}, ...]; plain lists of strings pass through. Anything else is left for validation."""
    if isinstance(answers, list):
        return [item.get("answer") if isinstance(item, dict) else item for item in answers]
    return answers


def most_common_answer(answers: list[Any]) -> Any:
    texts = [text for text in answer_texts(answers) if isinstance(text, str) and text.strip()]
    return Counter(texts).most_common(1)[0][0] if texts else None


def record_text(mapping: Any) -> str:
    """JSON of a record for the quarantine, with image bytes replaced by their length."""

    def shrink(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray)):
            return f"<{len(value)} bytes>"
        if isinstance(value, dict):
            return {key: shrink(item) for key, item in value.items()}
        if isinstance(value, list):
            return [shrink(item) for item in value]
        return value

    return json.dumps(shrink(mapping), default=str, ensure_ascii=False)


def walk_files(root: Path, suffixes: tuple[str, ...]) -> Iterator[Path]:
    """Files under `root` with one of the suffixes, sorted; symlinked folders are not entered (they may lead out of the drop)."""
    for folder, subfolders, names in sorted(os.walk(root, followlinks=False)):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(names):
            if name.lower().endswith(suffixes) and not name.startswith("."):
                yield Path(folder) / name


def peek(path: Path, size: int = 1 << 16) -> str:
    """The start of a file, for telling formats apart without parsing a large JSON."""
    with open(path, "rb") as handle:
        return handle.read(size).decode("utf-8", errors="replace")
