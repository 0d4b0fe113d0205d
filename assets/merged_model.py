import dagster as dg

from assets.results import materialize_result
from assets.upstream import require_latest, trained_on, upstream
from resources import ArtifactStoreResource, PipelineSettings
from vlmtune.artifacts import fingerprint, read_json
from vlmtune.base_model import ref_from_summary
from vlmtune.code_version import stage_code_version
from vlmtune.config import as_dict
from vlmtune.merge import merge_adapter
from vlmtune.models import load_processor
from vlmtune.pinning import check_pins
from vlmtune.promotion import gate_config, promotion_problems

CODE_VERSION = stage_code_version(["assets.merged_model"], ("peft", "safetensors", "torch", "transformers"))


@dg.asset(
    deps=["evaluation_report", "lora_adapter", "base_model"], code_version=CODE_VERSION, group_name="model", kinds={"safetensors"}, pool="gpu"
)
def merged_model(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource, settings: PipelineSettings) -> dg.MaterializeResult:
    """The adapter its evaluation report passed, merged into the base shard by shard: safetensors, processor, generation config and model card."""
    store = artifacts.store()
    report = upstream(context, store, "evaluation_report")
    adapter = shippable_adapter(store, report)
    require_latest(context, adapter, "lora_adapter", f"the latest adapter has no evaluation yet (report {report.fingerprint} evaluated the one before); materialize evaluation_report first")
    base, data = trained_on(store, adapter)
    for asset, artifact in (("base_model", base), ("tokenized_dataset", data)):
        require_latest(context, artifact, asset, f"adapter {adapter.fingerprint} was trained on an older {asset}; retrain it")
    config = settings.config().merge
    check_pins(load_processor(adapter.path), data.summary["pins"], "merging")  # one template, one pixel budget
    version = fingerprint("merged_model", CODE_VERSION, adapter.fingerprint, data.fingerprint, report.fingerprint, as_dict(config))
    artifact = store.build(
        "merged_model",
        version,
        lambda out: merge_adapter(
            ref_from_summary(base.summary, base.path), adapter.path, data.path / "dataset", out, config,
            {**report.summary, "adapter_version": adapter.fingerprint, "report_version": report.fingerprint}, adapter.summary.get("drops"),
        ),
        manifest={"config": as_dict(config), "lora_adapter": adapter.fingerprint, "base_model": base.fingerprint, "evaluation_report": report.fingerprint},
    )
    summary = artifact.summary
    return materialize_result(
        artifact,
        lora_adapter=adapter.fingerprint,  # the shipped adapter: the next evaluation's "previous adapter"
        evaluation_report=report.fingerprint,
        evaluated_accuracy=report.summary["accuracy"],
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


def shippable_adapter(store, report):
    """The adapter `report` evaluated, if the promotion rules pass it; otherwise the reasons, as an error.

    The rules run here again, on the report's own numbers and the evaluation config it was made
    under, so a merge launched on its own (or re-executed) can never ship what `ready_to_ship` refused.
    """
    manifest = read_json(report.path / "manifest.json")
    problems = promotion_problems(report.summary, gate_config(manifest["config"]))
    if problems:
        raise dg.Failure(
            f"evaluation report {report.fingerprint} did not pass the promotion gate, so its adapter "
            f"{manifest['lora_adapter']} is not merged: " + "; ".join(problems),
            metadata={"evaluation_report": report.fingerprint, "lora_adapter": manifest["lora_adapter"], "problems": "; ".join(problems)},
        )
    adapter = store.find("lora_adapter", manifest["lora_adapter"])
    if adapter is None:
        raise dg.Failure(f"adapter {manifest['lora_adapter']}, which report {report.fingerprint} evaluated, is no longer under {store.root}")
    return adapter
