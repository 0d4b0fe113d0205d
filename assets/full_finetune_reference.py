import dagster as dg

from assets.results import materialize_result
from assets.upstream import trained_on, upstream
from resources import ArtifactStoreResource
from vlmtune.artifacts import fingerprint, read_json
from vlmtune.base_model import ref_from_summary
from vlmtune.code_version import stage_code_version
from vlmtune.config import TrainConfig, as_dict
from vlmtune.formats import PROCESSOR_DIR
from vlmtune.train import train_adapter

CODE_VERSION = stage_code_version(["assets.full_finetune_reference"], ("torch", "transformers"))


class FullFinetuneOverrides(dg.Config):
    """Full fine-tuning usually wants a lower learning rate than LoRA; everything else stays the adapter's."""

    learning_rate: float | None = None  # None: the adapter's learning rate


@dg.asset(
    deps=["lora_adapter", "tokenized_dataset", "base_model"], code_version=CODE_VERSION, group_name="model", kinds={"pytorch"}, pool="gpu"
)
def full_finetune_reference(
    context: dg.AssetExecutionContext, config: FullFinetuneOverrides, artifacts: ArtifactStoreResource
) -> dg.MaterializeResult:
    """The current adapter's training run with every weight trained (same data, steps, batch, seed): the ceiling LoRA is measured against.

    Not part of `train_and_ship` (it costs a second training run); run the `lora_vs_full` job.
    """
    store = artifacts.store()
    adapter = upstream(context, store, "lora_adapter")
    base, data = trained_on(store, adapter)
    adapter_config = read_json(adapter.path / "manifest.json")["config"]
    train_config = TrainConfig(**adapter_config | {"method": "full", "learning_rate": config.learning_rate or adapter_config["learning_rate"]})
    version = fingerprint("full_finetune_reference", CODE_VERSION, base.fingerprint, data.fingerprint, as_dict(train_config))
    artifact = store.build(
        "full_finetune_reference",
        version,
        lambda out: train_adapter(
            ref_from_summary(base.summary, base.path), base.path / PROCESSOR_DIR, data.path / "dataset", out, train_config,
            checkpoint_dir=store.work_dir("full_finetune_reference", version) / "checkpoints", log=context.log.info,
        ),
        manifest={"config": as_dict(train_config), "base_model": base.fingerprint, "tokenized_dataset": data.fingerprint},
    )
    summary = artifact.summary
    return materialize_result(
        artifact, steps=summary["steps"], train_loss_last=summary["train_loss_last"], train_seconds=summary["train_seconds"],
        best_eval_loss=summary["best_eval_loss"] if summary["best_eval_loss"] is not None else float("nan"),
    )
