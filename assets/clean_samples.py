import dagster as dg

from assets.results import counts_table, materialize_result
from pipelines.partitions import drops_partitions
from resources import ArtifactStoreResource, DropsResource, PipelineSettings
from vlmtune.artifacts import fingerprint
from vlmtune.clean import clean_drop
from vlmtune.config import as_dict

CODE_VERSION = "1"


@dg.asset(
    partitions_def=drops_partitions, deps=["raw_samples"], code_version=CODE_VERSION, group_name="data", kinds={"parquet"}
)
def clean_samples(
    context: dg.AssetExecutionContext, drops: DropsResource, artifacts: ArtifactStoreResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    """Decoded RGB images and normalised text, de-duplicated and split; rejected records quarantined with a reason."""
    drop = context.partition_key
    store = artifacts.store()
    raw = store.require_current("raw_samples", drop)
    config = settings.config().clean
    version = fingerprint("clean_samples", CODE_VERSION, raw.fingerprint, as_dict(config))
    artifact = store.build("clean_samples", version, lambda out: clean_drop(raw.path, drops.drop_dir(drop), out, config), partition=drop)
    summary = artifact.summary
    return materialize_result(
        artifact,
        n_in=summary["n_in"],
        n_kept=summary["n_kept"],
        n_quarantined=summary["n_quarantined"],
        n_images=summary["n_images"],
        splits=summary["splits"],
        quarantine_reasons=counts_table(summary["quarantine_reasons"]),
        **{"dagster/row_count": summary["n_kept"]},
    )
