import dagster as dg

from assets.results import counts_table, materialize_result
from pipelines.partitions import drops_partitions
from resources import ArtifactStoreResource, DropsResource
from vlmtune.artifacts import fingerprint
from vlmtune.code_version import stage_code_version
from vlmtune.ingest import drop_fingerprint, ingest_drop

CODE_VERSION = stage_code_version(["assets.raw_samples"], ("pillow", "pyarrow"))


@dg.asset(partitions_def=drops_partitions, code_version=CODE_VERSION, group_name="data", kinds={"parquet"})
def raw_samples(context: dg.AssetExecutionContext, drops: DropsResource, artifacts: ArtifactStoreResource) -> dg.MaterializeResult:
    """Every sample of one drop, in any layout the readers know, with its image's sha256 and size; unreadable records quarantined with a reason."""
    drop = context.partition_key
    drop_dir = drops.drop_dir(drop)
    version = fingerprint("raw_samples", CODE_VERSION, drop, drop_fingerprint(drop_dir))
    artifact = artifacts.store().build("raw_samples", version, lambda out: ingest_drop(drop_dir, drop, out), partition=drop)
    summary = artifact.summary
    return materialize_result(
        artifact,
        format=summary["format"],
        n_in=summary["n_in"],
        n_kept=summary["n_kept"],
        n_quarantined=summary["n_quarantined"],
        n_images=summary["n_images"],
        quarantine_reasons=counts_table(summary["quarantine_reasons"]),
        **{"dagster/row_count": summary["n_kept"]},
    )
