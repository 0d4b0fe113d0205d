import dagster as dg

from assets.results import counts_table, materialize_result
from assets.upstream import upstream
from pipelines.partitions import drops_partitions
from resources import ArtifactStoreResource, DropsResource, PipelineSettings
from vlmtune.artifacts import fingerprint
from vlmtune.clean import clean_drop
from vlmtune.code_version import stage_code_version
from vlmtune.config import as_dict
from vlmtune.formats import QUARANTINE_FILE
from vlmtune.quarantine import quarantine_preview

CODE_VERSION = stage_code_version(["assets.clean_samples"], ("datasets", "imagehash", "pillow", "pyarrow"))


@dg.asset(
    partitions_def=drops_partitions, deps=["raw_samples"], code_version=CODE_VERSION, group_name="data", kinds={"parquet"}
)
def clean_samples(
    context: dg.AssetExecutionContext, drops: DropsResource, artifacts: ArtifactStoreResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    """Decoded RGB images and normalised text, exact and near duplicates removed, split without test leakage; rejected records quarantined with a reason."""
    drop = context.partition_key
    store = artifacts.store()
    raw = upstream(context, store, "raw_samples", drop)
    config = settings.config().clean
    output_settings = {name: value for name, value in as_dict(config).items() if name != "num_proc"}  # num_proc changes speed, not output
    version = fingerprint("clean_samples", CODE_VERSION, raw.fingerprint, output_settings)
    artifact = store.build("clean_samples", version, lambda out: clean_drop(raw.path, drops.drop_dir(drop), out, config), partition=drop)
    summary = artifact.summary
    return materialize_result(
        artifact,
        n_in=summary["n_in"],
        n_kept=summary["n_kept"],
        n_quarantined=summary["n_quarantined"],
        n_images=summary["n_images"],
        splits=summary["splits"],
        n_first_frames_of_animations=summary.get("n_first_frames_of_animations", 0),
        quarantine_reasons=counts_table(summary["quarantine_reasons"]),
        quarantine_preview=dg.MetadataValue.md(quarantine_preview(artifact.path / QUARANTINE_FILE)),
        **{"dagster/row_count": summary["n_kept"]},
    )
