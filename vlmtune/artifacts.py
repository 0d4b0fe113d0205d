"""Content-addressed artifact store: every stage output lives in a folder named by its fingerprint.

A stage's fingerprint hashes everything its output depends on (input fingerprints, resolved config,
code version). If a folder with that fingerprint is already complete, the stage is a cache hit and
nothing is recomputed. Folders are written under a temporary name and renamed into place, so a
killed stage never leaves a half-written artifact that a later run could take for done; a
`CURRENT` pointer, also replaced atomically, names the latest complete version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.provenance import provenance

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
_NO_PARTITION = "_all"


@dataclass(frozen=True)
class Artifact:
    """A complete, published stage output."""

    path: Path
    fingerprint: str
    summary: dict[str, Any]
    cached: bool  # True when this run reused an existing version instead of building it


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dict key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(root: Path, suffixes: tuple[str, ...] | None = None) -> str:
    """Hash of every file's relative path and bytes under `root` (optionally only some suffixes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if suffixes and not path.name.endswith(suffixes):
            continue
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class ArtifactStore:
    """Versioned stage outputs under `root/<asset>/<partition>/<fingerprint>/`."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()

    def _slot(self, asset: str, partition: str | None) -> Path:
        return self.root / asset / (partition or _NO_PARTITION)

    def version_dir(self, asset: str, fp: str, partition: str | None = None) -> Path:
        return self._slot(asset, partition) / fp

    def work_dir(self, asset: str, fp: str, partition: str | None = None) -> Path:
        """Scratch space that survives a crash (training checkpoints), outside the published folder."""
        path = self.root / "_work" / asset / (partition or _NO_PARTITION) / fp
        path.mkdir(parents=True, exist_ok=True)
        return path

    def find(self, asset: str, fp: str, partition: str | None = None) -> Artifact | None:
        path = self.version_dir(asset, fp, partition)
        if not (path / MANIFEST).is_file():
            return None
        return Artifact(path, fp, read_json(path / SUMMARY), cached=True)

    def current(self, asset: str, partition: str | None = None) -> Artifact | None:
        """The latest published version of an asset (partition), or None if it was never built."""
        pointer = self._slot(asset, partition) / "CURRENT"
        if not pointer.is_file():
            return None
        return self.find(asset, pointer.read_text().strip(), partition)

    def require_current(self, asset: str, partition: str | None = None) -> Artifact:
        found = self.current(asset, partition)
        if found is None:
            where = f"{asset}[{partition}]" if partition else asset
            raise FileNotFoundError(f"{where} has no materialization under {self.root}; materialize it first")
        return found

    def publish(self, asset: str, fp: str, partition: str | None = None) -> None:
        slot = self._slot(asset, partition)
        tmp = slot / f".CURRENT.{uuid.uuid4().hex}.tmp"
        tmp.write_text(fp)
        os.replace(tmp, slot / "CURRENT")

    @contextmanager
    def _staging(self, asset: str, fp: str, partition: str | None) -> Iterator[Path]:
        final = self.version_dir(asset, fp, partition)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{fp}.{uuid.uuid4().hex}.partial"
        staging.mkdir()
        try:
            yield staging
            if final.exists():  # a concurrent run finished the same version first: keep theirs
                shutil.rmtree(staging)
            else:
                os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def build(
        self,
        asset: str,
        fp: str,
        build_fn: Callable[[Path], dict[str, Any]],
        *,
        partition: str | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> Artifact:
        """Return the version `fp` of `asset`, building it with `build_fn(out_dir) -> summary` if missing."""
        if (hit := self.find(asset, fp, partition)) is not None:
            self.publish(asset, fp, partition)
            return hit
        started = time.time()
        with self._staging(asset, fp, partition) as out_dir:
            summary = build_fn(out_dir)
            summary.setdefault("build_seconds", round(time.time() - started, 3))
            write_json(out_dir / SUMMARY, summary)
            write_json(
                out_dir / MANIFEST,
                {"asset": asset, "partition": partition, "fingerprint": fp, "created_unix": time.time(), **provenance(), **(manifest or {})},
            )
        self.publish(asset, fp, partition)
        return Artifact(self.version_dir(asset, fp, partition), fp, summary, cached=False)
