import base64

import dagster as dg

from assets.results import materialize_result
from resources import ArtifactStoreResource, PipelineSettings
from vlmtune.artifacts import fingerprint
from vlmtune.base_model import ref_from_summary
from vlmtune.config import as_dict
from vlmtune.evaluate import evaluate_adapter

CODE_VERSION = "1"


@dg.asset(
    deps=["lora_adapter", "tokenized_dataset", "base_model"], code_version=CODE_VERSION, group_name="model", kinds={"markdown"}, pool="gpu"
)
def evaluation_report(
    context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    """Accuracy on the test split against the majority and blind (question-only) baselines, as JSON, Markdown and a plot."""
    store = artifacts.store()
    base, data, adapter = (store.require_current(name) for name in ("base_model", "tokenized_dataset", "lora_adapter"))
    config = settings.config().eval
    version = fingerprint("evaluation_report", CODE_VERSION, adapter.fingerprint, data.fingerprint, as_dict(config))
    artifact = store.build(
        "evaluation_report",
        version,
        lambda out: evaluate_adapter(ref_from_summary(base.summary, base.path), adapter.path, data.path / "dataset", out, config, context.log.info),
        manifest={"config": as_dict(config), "lora_adapter": adapter.fingerprint, "tokenized_dataset": data.fingerprint},
    )
    summary = artifact.summary
    plot = base64.b64encode((artifact.path / "plots.png").read_bytes()).decode()
    markdown = (artifact.path / "report.md").read_text().replace("(plots.png)", f"(data:image/png;base64,{plot})")
    return materialize_result(
        artifact,
        accuracy=summary["accuracy"],
        n=summary["n"],
        blind_accuracy=summary["baselines"]["blind"],
        majority_accuracy=summary["baselines"]["majority"],
        per_answer_type=summary["per_answer_type"],
        hit_max_new_tokens_rate=summary["hit_max_new_tokens_rate"],
        report=dg.MetadataValue.md(markdown),
        report_json=dg.MetadataValue.path(str(artifact.path / "report.json")),
    )
