"""Asset checks: the invariants a reviewer would otherwise have to verify by hand, visible in the UI."""

import dagster as dg
import pyarrow.parquet as pq

from assets.clean_samples import clean_samples
from assets.evaluation_report import evaluation_report
from assets.lora_adapter import lora_adapter
from assets.merged_model import merged_model
from assets.tokenized_dataset import tokenized_dataset
from assets.upstream import trained_on, upstream, upstream_or_none
from pipelines.partitions import drops_partitions
from resources import ArtifactStoreResource
from vlmtune import formats
from vlmtune.adapter_checks import adapter_report
from vlmtune.artifacts import read_json
from vlmtune.dataset_checks import tokenized_dataset_problems
from vlmtune.formats import PROCESSOR_DIR
from vlmtune.models import load_processor
from vlmtune.promotion import gate_config, promotion_problems
from vlmtune.self_contained import self_contained_problems


@dg.asset_check(asset=clean_samples, description="Every record of every drop is kept or quarantined: n_in == n_kept + n_quarantined.")
def clean_counts_conserved(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStoreResource) -> dg.AssetCheckResult:
    store = artifacts.store()
    per_drop = {}
    for drop in context.instance.get_dynamic_partitions(drops_partitions.name):
        raw, clean = upstream_or_none(context, store, "raw_samples", drop), upstream_or_none(context, store, "clean_samples", drop)
        if raw is None or clean is None:
            continue
        kept = pq.read_metadata(clean.path / formats.CLEAN_SAMPLES_FILE).num_rows
        quarantined = pq.read_metadata(clean.path / formats.QUARANTINE_FILE).num_rows
        per_drop[drop] = {"n_in": raw.summary["n_in"], "n_kept": kept, "n_quarantined": quarantined}
    broken = {drop: c for drop, c in per_drop.items() if c["n_in"] != c["n_kept"] + c["n_quarantined"]}
    return dg.AssetCheckResult(passed=not broken and bool(per_drop), metadata={"drops_checked": len(per_drop), "broken": broken or "none"})


@dg.asset_check(
    asset=tokenized_dataset,
    blocking=True,
    description="No image in both training and test; every row has answer tokens, and its labels are exactly the answer plus one end token.",
)
def tokenized_dataset_sound(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStoreResource) -> dg.AssetCheckResult:
    store = artifacts.store()
    data, base = upstream(context, store, "tokenized_dataset"), upstream(context, store, "base_model")
    problems = tokenized_dataset_problems(data.path / "dataset", load_processor(base.path / PROCESSOR_DIR))
    passed = not (problems["images_shared_with_test"] or problems["rows_without_answer_tokens"] or problems["rows_with_wrong_targets"])
    return dg.AssetCheckResult(passed=passed, metadata=problems)


@dg.asset_check(
    asset=lora_adapter,
    blocking=True,
    description="Every LoRA layer moved from its initial value and every target pattern matched a module; adapted modules counted per component.",
)
def lora_really_trained(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStoreResource) -> dg.AssetCheckResult:
    adapter = upstream(context, artifacts.store(), "lora_adapter")
    if not (adapter.path / "adapter_config.json").is_file():
        return dg.AssetCheckResult(passed=True, metadata={"method": "full fine-tuning: no adapter layers"})
    report = adapter_report(adapter.path)
    passed = report["n_lora_modules"] > 0 and not report["untrained_modules"] and not report["unmatched_target_patterns"]
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"n_lora_modules": report["n_lora_modules"], "per_component": report["per_component"],
                  "untrained_modules": report["untrained_modules"][:20], "unmatched_target_patterns": report["unmatched_target_patterns"]},
    )


@dg.asset_check(
    asset=evaluation_report,
    blocking=True,
    description="Ship only an adapter that beats the blind baseline, is not worse than the previous version beyond a tolerance, and stops its answers by itself.",
)
def ready_to_ship(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStoreResource) -> dg.AssetCheckResult:
    report = upstream(context, artifacts.store(), "evaluation_report")
    manifest, summary = read_json(report.path / "manifest.json"), report.summary
    config = gate_config(manifest["config"])
    problems = promotion_problems(summary, config)  # the rules merged_model applies again
    baselines, leads = summary["baselines"], summary.get("lead_ci95", {})
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "evaluation_report": report.fingerprint, "lora_adapter": manifest["lora_adapter"],
            "accuracy": summary["accuracy"], "blind": baselines["blind"], "margin_over_blind": summary["accuracy"] - baselines["blind"],
            "gate": config.gate + (" (smoke profile: point estimates)" if config.gate == "point" else " (paired 95 % intervals)"),
            "margin_over_blind_ci95_low": leads["blind"][0] if "blind" in leads else "not recorded",
            "previous_adapter": baselines.get("previous_adapter", "none"), "hit_max_new_tokens_rate": summary["hit_max_new_tokens_rate"],
            "problems": "; ".join(problems) or "none",
        },
    )


@dg.asset_check(asset=evaluation_report, description="Accuracy drops (paired 95 % CI above zero) when each question gets another sample's image: the model reads the image.")
def uses_the_image(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStoreResource) -> dg.AssetCheckResult:
    summary = upstream(context, artifacts.store(), "evaluation_report").summary
    low, high = summary["image_shuffle_drop_ci95"]
    return dg.AssetCheckResult(
        passed=low > 0,  # the paired 95 % interval on the drop excludes zero
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"accuracy": summary["accuracy"], "image_shuffle_accuracy": summary["baselines"]["image_shuffle"],
                  "drop": summary["image_shuffle_drop"], "drop_ci95_low": low, "drop_ci95_high": high},
    )


@dg.asset_check(asset=merged_model, description="The reloaded merged model matches base + adapter (logits within the dtype's tolerance, identical greedy answers) and is self-contained: safetensors, processor with the pinned template and pixel budget, generation config.")
def merged_matches_adapter(context: dg.AssetCheckExecutionContext, artifacts: ArtifactStoreResource) -> dg.AssetCheckResult:
    store = artifacts.store()
    merged = upstream(context, store, "merged_model")
    _, data = trained_on(store, store.find("lora_adapter", read_json(merged.path / "manifest.json")["lora_adapter"]))
    summary = merged.summary
    missing = self_contained_problems(merged.path, data.summary["pins"])
    passed = summary["within_tolerance"] and summary["answers_identical"] and summary["n_check_samples"] > 0 and not missing
    keys = ("max_logit_diff", "mean_logit_diff", "tolerance", "dtype", "answers_identical", "answers_agreeing", "n_check_samples")
    return dg.AssetCheckResult(passed=passed, metadata={**{key: summary[key] for key in keys}, "self_contained_problems": "; ".join(missing) or "none"})
