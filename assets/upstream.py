"""Which version of an upstream asset a step reads: the one its lineage records, never a pointer another run can move.

A step reads the version materialized in its own run (or in the run it re-executes, and that run's
parent, up to the original), and otherwise the latest materialization Dagster has recorded for the
asset (partition). The version is the `fingerprint` in that materialization's metadata, and the
artifact is looked up by it in the store. The store's CURRENT pointer is never consulted here: two
runs whose steps interleave move it under each other.
"""

from __future__ import annotations

import dagster as dg

from vlmtune.artifacts import Artifact, ArtifactStore


def upstream(context, store: ArtifactStore, asset: str, partition: str | None = None) -> Artifact:
    """The version of `asset` (partition) this step must read; a clear error when there is none."""
    found = upstream_or_none(context, store, asset, partition)
    if found is None:
        raise FileNotFoundError(f"{_where(asset, partition)} has no materialization in this Dagster instance; materialize it first")
    return found


def upstream_or_none(context, store: ArtifactStore, asset: str, partition: str | None = None) -> Artifact | None:
    own = run_fingerprint(context.instance, context.run, asset, partition)
    latest = latest_fingerprint(context.instance, asset, partition)
    if own is not None and own != latest:
        # Dagster records the latest version as this step's input; reading ours would make that a lie
        raise dg.Failure(
            f"{_where(asset, partition)} version {own}, materialized in this run (or the run it re-executes), was superseded by "
            f"{latest} from another run before this step read it; re-run to continue from the newer version"
        )
    fp = own or latest
    if fp is None:
        return None
    artifact = store.find(asset, fp, partition)
    if artifact is None:
        raise FileNotFoundError(f"{asset} version {fp}, which Dagster recorded, is not under {store.root} (deleted or another VQA_HOME)")
    return artifact


def run_fingerprint(instance: dg.DagsterInstance, run: dg.DagsterRun | None, asset: str, partition: str | None) -> str | None:
    """The version of `asset` materialized in `run`, or in the runs it re-executes (nearest first)."""
    key = dg.AssetKey(asset)
    while run is not None:
        records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, ascending=False).records
        for record in records:
            materialization = record.event_log_entry.asset_materialization
            if materialization.asset_key == key and materialization.partition == partition:
                return materialization.metadata["fingerprint"].value
        run = instance.get_run_by_id(run.parent_run_id) if run.parent_run_id else None
    return None


def latest_fingerprint(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> str | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(dg.AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0].asset_materialization.metadata["fingerprint"].value if records else None


def require_latest(context, artifact: Artifact, asset: str, why: str) -> None:
    """Refuse to go on with a version of `asset` other than the latest, which Dagster records as this step's input."""
    latest = latest_fingerprint(context.instance, asset)
    if latest != artifact.fingerprint:
        raise dg.Failure(f"{why}: it uses {asset} version {artifact.fingerprint}, but the latest {asset} is {latest}")


def _where(asset: str, partition: str | None) -> str:
    return f"{asset}[{partition}]" if partition else asset


def materialized_fingerprints(instance: dg.DagsterInstance, asset: str, metadata_key: str = "fingerprint", limit: int = 1000) -> list[str]:
    """`metadata_key` of every materialization of `asset`, newest first."""
    records = instance.fetch_materializations(dg.AssetRecordsFilter(dg.AssetKey(asset)), limit=limit).records
    return [r.asset_materialization.metadata[metadata_key].value for r in records if metadata_key in r.asset_materialization.metadata]


def trained_on(store: ArtifactStore, adapter: Artifact) -> tuple[Artifact, Artifact]:
    """The base model and tokenized dataset versions `adapter` was trained on, which everything about it must use."""
    found = []
    for asset in ("base_model", "tokenized_dataset"):
        fp = adapter.summary["inputs"][asset]
        artifact = store.find(asset, fp)
        if artifact is None:
            raise FileNotFoundError(f"{asset} version {fp}, which adapter {adapter.fingerprint} was trained on, is not under {store.root}")
        found.append(artifact)
    return found[0], found[1]
