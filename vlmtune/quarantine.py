"""Collects rejected records with their reasons; every stage that drops a record goes through here."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlmtune.formats import QUARANTINE_SCHEMA


class QuarantineLog:
    """Rows of QUARANTINE_SCHEMA: where a record came from, the original record and why it was rejected."""

    def __init__(self, stage: str):
        self.stage = stage
        self.rows: list[dict] = []

    def add(self, *, drop: str, file: str, line: int, reason: str, record: str, detail: str = "") -> None:
        self.rows.append(
            {"drop": drop, "file": file, "line": line, "stage": self.stage, "reason": reason, "detail": detail, "record": record}
        )

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(row["reason"] for row in self.rows).items()))

    def write(self, path: Path) -> None:
        pq.write_table(pa.Table.from_pylist(self.rows, schema=QUARANTINE_SCHEMA), path)


def quarantine_preview(path: Path, n_rows: int = 10) -> str:
    """The first rejected records of a quarantine table as Markdown: enough to see what went wrong, from the UI."""
    rows = pq.read_table(path, columns=["drop", "file", "line", "reason", "detail"]).slice(0, n_rows).to_pylist()
    lines = ["| drop | file | line | reason | detail |", "|---|---|---:|---|---|"]
    for row in rows:
        detail = (row["detail"] or "").replace("|", "\\|").replace("\n", " ")[:120]
        lines.append(f"| {row['drop']} | {row['file']} | {row['line']} | {row['reason']} | {detail} |")
    return "\n".join(lines) if rows else "(nothing quarantined)"
