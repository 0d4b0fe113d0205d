from pathlib import Path

import dagster as dg

from assets.results import materialize_result
from assets.upstream import materialized_fingerprints, require_latest, trained_on, upstream, upstream_or_none
from resources import ArtifactStoreResource, PipelineSettings
from vlmtune.artifacts import fingerprint, read_json
from vlmtune.base_model import ref_from_summary
from vlmtune.code_version import stage_code_version
from vlmtune.config import as_dict
from vlmtune.evaluate import evaluate_adapter, full_reference_matches, pick_previous_adapter
from vlmtune.models import load_processor
from vlmtune.pinning import check_pins
from vlmtune.report import with_inline_images

CODE_VERSION = stage_code_version(["assets.evaluation_report"], ("datasets", "peft", "torch", "transformers"))


@dg.asset(
    deps=["lora_adapter", "tokenized_dataset", "base_model", "full_finetune_reference"],
    code_version=CODE_VERSION, group_name="model", kinds={"markdown"}, pool="gpu",
)
def evaluation_report(
    context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    """Accuracy with a 95 % CI against majority, blind, base model, previous adapter, image-shuffle and (if trained) full fine-tuning."""
    store = artifacts.store()
    adapter = upstream(context, store, "lora_adapter")
    base, data = trained_on(store, adapter)
    for asset, artifact in (("base_model", base), ("tokenized_dataset", data)):
        require_latest(context, artifact, asset, f"adapter {adapter.fingerprint} was trained on an older {asset}; retrain it")
    config = settings.config().eval
    check_pins(load_processor(adapter.path), data.summary["pins"], "evaluation")  # one template, one pixel budget
    shipped = materialized_fingerprints(context.instance, "merged_model", metadata_key="lora_adapter")  # newest first
    previous, previous_note = pick_previous_adapter(
        [(fp, str(store.version_dir("lora_adapter", fp))) for fp in shipped], adapter.fingerprint, base.fingerprint
    )
    full = upstream_or_none(context, store, "full_finetune_reference")
    full = full if full and full_reference_matches(read_json(full.path / "manifest.json"), read_json(adapter.path / "manifest.json")) else None
    version = fingerprint("evaluation_report", CODE_VERSION, adapter.fingerprint, data.fingerprint, as_dict(config), previous_note, full and full.fingerprint)
    artifact = store.build(
        "evaluation_report",
        version,
        lambda out: evaluate_adapter(
            ref_from_summary(base.summary, base.path), adapter.path, data.path / "dataset", out, config, context.log.info,
            previous_adapter_dir=previous and Path(previous), previous_adapter_note=previous_note, full_finetune_dir=full and full.path,
        ),
        manifest={"config": as_dict(config), "lora_adapter": adapter.fingerprint, "tokenized_dataset": data.fingerprint,
                  "previous_adapter": previous, "full_finetune_reference": full and full.fingerprint},
    )
    summary = artifact.summary
    markdown = with_inline_images((artifact.path / "report.md").read_text(), artifact.path)
    optional = {f"{name}_accuracy": summary["baselines"][name] for name in ("previous_adapter", "full_finetune") if name in summary["baselines"]}
    return materialize_result(
        artifact,
        lora_adapter=adapter.fingerprint,
        previous_adapter=previous_note,
        accuracy=summary["accuracy"],
        ci95_low=summary["ci95"][0],
        ci95_high=summary["ci95"][1],
        n=summary["n"],
        blind_accuracy=summary["baselines"]["blind"],
        majority_accuracy=summary["baselines"]["majority"],
        base_model_accuracy=summary["baselines"]["base_model"],
        image_shuffle_accuracy=summary["baselines"]["image_shuffle"],
        image_shuffle_drop=summary["image_shuffle_drop"],
        **optional,
        lora_to_full_ratio=summary["lora_to_full_ratio"] if summary["lora_to_full_ratio"] is not None else "not measured",
        per_answer_type=summary["per_answer_type"],
        questions_per_second=summary["questions_per_second"],
        hit_max_new_tokens_rate=summary["hit_max_new_tokens_rate"],
        report=dg.MetadataValue.md(markdown),
        report_json=dg.MetadataValue.path(str(artifact.path / "report.json")),
    )

