import dagster as dg

from assets.results import materialize_result
from resources import ArtifactStoreResource, PipelineSettings
from vlmtune.artifacts import fingerprint
from vlmtune.base_model import ref_from_summary
from vlmtune.code_version import stage_code_version
from vlmtune.config import as_dict
from vlmtune.merge import merge_adapter
from vlmtune.models import load_processor
from vlmtune.pinning import check_pins

CODE_VERSION = stage_code_version(["assets.merged_model"], ("peft", "safetensors", "torch", "transformers"))


@dg.asset(
    deps=["evaluation_report", "lora_adapter", "base_model"], code_version=CODE_VERSION, group_name="model", kinds={"safetensors"}, pool="gpu"
)
def merged_model(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource, settings: PipelineSettings) -> dg.MaterializeResult:
    """The adapter merged into the base shard by shard: safetensors, processor, generation config and model card, loadable with no project code."""
    store = artifacts.store()
    base, data, adapter, report = (store.require_current(name) for name in ("base_model", "tokenized_dataset", "lora_adapter", "evaluation_report"))
    config = settings.config().merge
    check_pins(load_processor(adapter.path), data.summary["pins"], "merging")  # one template, one pixel budget
    version = fingerprint("merged_model", CODE_VERSION, adapter.fingerprint, data.fingerprint, report.fingerprint, as_dict(config))
    artifact = store.build(
        "merged_model",
        version,
        lambda out: merge_adapter(
            ref_from_summary(base.summary, base.path), adapter.path, data.path / "dataset", out, config, report.summary, adapter.summary.get("drops")
        ),
        manifest={"config": as_dict(config), "lora_adapter": adapter.fingerprint, "base_model": base.fingerprint, "evaluation_report": report.fingerprint},
    )
    summary = artifact.summary
    return materialize_result(
        artifact,
        max_logit_diff=summary["max_logit_diff"],
        mean_logit_diff=summary["mean_logit_diff"],
        tolerance=summary["tolerance"],
        answers_identical=summary["answers_identical"],
        n_check_samples=summary["n_check_samples"],
        dtype=summary["dtype"],
        weight_files=len(summary["weight_files"]),
        size_bytes=summary["size_bytes"],
        model_card=dg.MetadataValue.md((artifact.path / "README.md").read_text()),
    )
