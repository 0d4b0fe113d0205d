"""How a stage's artifact becomes a Dagster materialization: its path, version and headline numbers."""

from typing import Any

import dagster as dg

from vlmtune.artifacts import Artifact


def materialize_result(artifact: Artifact, **metadata: Any) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(artifact.path)),
            "fingerprint": artifact.fingerprint,
            "cached": artifact.cached,  # True: nothing changed upstream, the existing version was reused
            "build_seconds": artifact.summary.get("build_seconds", 0.0),
            **metadata,
        },
        data_version=dg.DataVersion(artifact.fingerprint),
    )


def counts_table(counts: dict[str, int]) -> dg.MetadataValue:
    rows = "\n".join(f"| {name} | {count} |" for name, count in counts.items()) or "| (none) | 0 |"
    return dg.MetadataValue.md(f"| reason | records |\n|---|---|\n{rows}")
