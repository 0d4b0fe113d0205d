import dagster as dg

from assets.results import counts_table, materialize_result
from assets.upstream import upstream, upstream_or_none
from pipelines.partitions import drops_partitions
from resources import ArtifactStoreResource, PipelineSettings
from vlmtune.artifacts import fingerprint
from vlmtune.code_version import stage_code_version
from vlmtune.config import as_dict
from vlmtune.formats import PROCESSOR_DIR
from vlmtune.models import load_processor
from vlmtune.tokenization import assemble_splits, tokenize_drop

CODE_VERSION = stage_code_version(["assets.tokenized_dataset"], ("datasets", "tokenizers", "transformers"))


@dg.asset(deps=["clean_samples", "base_model"], code_version=CODE_VERSION, group_name="data", kinds={"arrow"})
def tokenized_dataset(
    context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    """A train / validation / test DatasetDict for the base model's processor; each drop tokenized once into its own shard."""
    store = artifacts.store()
    base = upstream(context, store, "base_model")
    config = settings.config().tokenize
    drops = sorted(context.instance.get_dynamic_partitions(drops_partitions.name))
    cleaned = {drop: upstream_or_none(context, store, "clean_samples", drop) for drop in drops}
    missing = [drop for drop, artifact in cleaned.items() if artifact is None]
    if missing:
        raise RuntimeError(f"drops {missing} are registered but have no clean_samples; materialize them first")
    processor = None
    shards, reused = [], 0
    for drop, clean in cleaned.items():
        shard_version = fingerprint("tokenized_shard", CODE_VERSION, clean.fingerprint, base.summary["pins"], as_dict(config))
        if store.find("tokenized_shard", shard_version, drop) is None and processor is None:
            processor = load_processor(base.path / PROCESSOR_DIR)
        shard = store.build("tokenized_shard", shard_version, lambda out, clean=clean: tokenize_drop(clean.path, processor, out, config), partition=drop)
        reused += shard.cached
        shards.append(shard)
    version = fingerprint("tokenized_dataset", CODE_VERSION, [shard.fingerprint for shard in shards], base.summary["pins"])
    drop_versions = {drop: clean.fingerprint for drop, clean in cleaned.items()}
    artifact = store.build(
        "tokenized_dataset",
        version,
        # the processor pins travel with the data: training, evaluation and merging must match them
        lambda out: {**assemble_splits([shard.path for shard in shards], out), "drop_versions": drop_versions, "pins": base.summary["pins"]},
    )
    summary = artifact.summary
    context.log.info(f"{len(shards)} drop shards, {reused} reused without re-tokenizing")
    return materialize_result(
        artifact,
        splits=summary["splits"],
        tokens=summary["n_tokens"],
        drops=drops,
        shards_reused=reused,
        shards_tokenized=len(shards) - reused,
        too_long=sum(shard.summary["quarantine_reasons"].get("too_long", 0) for shard in shards),
        quarantine_reasons=counts_table(summary["quarantine_reasons"]),
        chat_template_sha256=base.summary["pins"]["chat_template_sha256"],
        image_processor_sha256=base.summary["pins"]["image_processor_sha256"],
        **{"dagster/row_count": sum(summary["splits"].values())},
    )
