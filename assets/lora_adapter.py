import dagster as dg

from assets.results import materialize_result
from resources import ArtifactStoreResource, PipelineSettings
from vlmtune.artifacts import fingerprint
from vlmtune.base_model import PROCESSOR_DIR, ref_from_summary
from vlmtune.config import as_dict, with_overrides
from vlmtune.train import train_adapter

CODE_VERSION = "1"


class TrainOverrides(dg.Config):
    """Per-run changes to the profile's training settings; unset fields keep the profile's value."""

    method: str | None = None  # "lora", "qlora" (CUDA only) or "full"; validated by TrainConfig
    lora_rank: int | None = None
    use_dora: bool | None = None
    use_rslora: bool | None = None
    target_modules: list[str] | None = None  # module-name suffixes (q_proj, ...); default: every linear layer of the language model
    lora_on_vision: bool | None = None
    train_projector: bool | None = None
    gradient_checkpointing: bool | None = None
    learning_rate: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    seed: int | None = None


@dg.asset(
    deps=["tokenized_dataset", "base_model"], code_version=CODE_VERSION, group_name="model", kinds={"pytorch", "peft"}, pool="gpu"
)
def lora_adapter(
    context: dg.AssetExecutionContext, config: TrainOverrides, artifacts: ArtifactStoreResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    """A PEFT LoRA adapter on every linear layer of the language model, with validation loss and early stopping."""
    store = artifacts.store()
    base, data = store.require_current("base_model"), store.require_current("tokenized_dataset")
    train_config = with_overrides(settings.config().train, config.model_dump())
    version = fingerprint("lora_adapter", CODE_VERSION, base.fingerprint, data.fingerprint, as_dict(train_config))
    artifact = store.build(
        "lora_adapter",
        version,
        lambda out: train_adapter(
            ref_from_summary(base.summary, base.path),
            base.path / PROCESSOR_DIR,
            data.path / "dataset",
            out,
            train_config,
            checkpoint_dir=store.work_dir("lora_adapter", version) / "checkpoints",
            log=context.log.info,
        ),
        manifest={"config": as_dict(train_config), "base_model": base.fingerprint, "tokenized_dataset": data.fingerprint},
    )
    summary = artifact.summary
    return materialize_result(
        artifact,
        method=summary["method"],
        steps=summary["steps"],
        resumed_from_step=summary["resumed_from_step"],
        train_loss_last=summary["train_loss_last"],
        best_eval_loss=summary["best_eval_loss"] if summary["best_eval_loss"] is not None else float("nan"),
        trainable_params=summary["trainable_params"],
        trainable_share=summary["trainable_share"],
        train_seconds=summary["train_seconds"],
        samples_per_second=summary["samples_per_second"],
        drops=summary["drops"],
    )
