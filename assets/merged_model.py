import dagster as dg

from assets.results import materialize_result
from resources import ArtifactStoreResource, PipelineSettings
from vlmtune.artifacts import fingerprint
from vlmtune.base_model import ref_from_summary
from vlmtune.config import as_dict
from vlmtune.merge import merge_adapter

CODE_VERSION = "1"


@dg.asset(
    deps=["evaluation_report", "lora_adapter", "base_model"], code_version=CODE_VERSION, group_name="model", kinds={"safetensors"}, pool="gpu"
)
def merged_model(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource, settings: PipelineSettings) -> dg.MaterializeResult:
    """The adapter merged into the base weights: safetensors + processor, loadable with no project code."""
    store = artifacts.store()
    base, data, adapter = (store.require_current(name) for name in ("base_model", "tokenized_dataset", "lora_adapter"))
    config = settings.config().merge
    version = fingerprint("merged_model", CODE_VERSION, adapter.fingerprint, data.fingerprint, as_dict(config))
    artifact = store.build(
        "merged_model",
        version,
        lambda out: merge_adapter(ref_from_summary(base.summary, base.path), adapter.path, data.path / "dataset", out, config),
        manifest={"config": as_dict(config), "lora_adapter": adapter.fingerprint, "base_model": base.fingerprint},
    )
    summary = artifact.summary
    return materialize_result(
        artifact,
        max_logit_diff=summary["max_logit_diff"],
        answers_identical=summary["answers_identical"],
        n_check_samples=summary["n_check_samples"],
        size_bytes=summary["size_bytes"],
    )
