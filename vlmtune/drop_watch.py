"""Which drop folders are complete and new or changed: the logic behind the new-drops sensor.

A drop is complete when it holds a `_READY` marker, or when its annotations are present (any
layout `vlmtune.readers` reads) and the folder's fingerprint did not change between two looks
(an upload still in progress changes it). A complete drop is due for ingestion when its fingerprint differs from the one last ingested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.formats import READY_MARKER
from vlmtune.ingest import drop_fingerprint
from vlmtune.readers import UnknownDropFormat, detect_format


@dataclass
class WatchState:
    """Kept between looks (the sensor's cursor): what each drop looked like, and what was ingested."""

    last_seen: dict[str, str] = field(default_factory=dict)
    ingested: dict[str, str] = field(default_factory=dict)


def due_drops(drops_dir: Path, state: WatchState) -> tuple[dict[str, str], WatchState]:
    """Drops to ingest now (name -> fingerprint), and the state to keep for the next look."""
    drops_dir = Path(drops_dir)
    seen, due = {}, {}
    folders = sorted(p for p in drops_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) if drops_dir.is_dir() else []
    for folder in folders:
        if not _has_annotations(folder):
            continue
        current = drop_fingerprint(folder)
        seen[folder.name] = current
        settled = (folder / READY_MARKER).is_file() or state.last_seen.get(folder.name) == current
        if settled and state.ingested.get(folder.name) != current:
            due[folder.name] = current
    return due, WatchState(last_seen=seen, ingested={**state.ingested, **due})


def _has_annotations(folder: Path) -> bool:
    try:
        detect_format(folder)
    except UnknownDropFormat:
        return False
    return True
