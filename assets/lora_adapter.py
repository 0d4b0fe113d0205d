import dataclasses
import json

import dagster as dg

from assets.results import materialize_result
from assets.upstream import upstream, upstream_or_none
from pipelines.train_worker import REPORTED
from resources import ArtifactStoreResource, PipelineSettings, TrainingLauncher
from vlmtune.artifacts import fingerprint, write_json
from vlmtune.base_model import ref_from_summary
from vlmtune.code_version import stage_code_version
from vlmtune.config import as_dict, with_overrides
from vlmtune.formats import PROCESSOR_DIR

CODE_VERSION = stage_code_version(["assets.lora_adapter", "pipelines.train_worker"], ("bitsandbytes", "peft", "torch", "transformers"))


class TrainOverrides(dg.Config):
    """Per-run changes to the profile's training settings; unset fields keep the profile's value."""

    method: str | None = None  # "lora", "qlora" (CUDA only) or "full"; validated by TrainConfig
    qlora_dtype: str | None = None  # qlora: "float32" (stock numerics) or "bfloat16" for the unquantized weights
    init_from: str | None = None  # "fresh", or "previous" to continue from the current adapter
    lora_rank: int | None = None
    use_dora: bool | None = None
    use_rslora: bool | None = None
    target_modules: list[str] | None = None  # module-name suffixes (q_proj, ...); default: every linear layer of the language model
    lora_on_vision: bool | None = None
    train_projector: bool | None = None
    gradient_checkpointing: bool | None = None
    answer_only_loss: bool | None = None
    fused_lora: bool | None = None
    fuse_shared_inputs: bool | None = None  # with fused_lora: q/k/v and gate/up as one fused call each
    compile: bool | None = None  # torch.compile the decoder layers (GPU)
    vision_cuda_graphs: bool | None = None  # replay the frozen vision tower from CUDA graphs (GPU, fixed-resolution towers)
    padding_free: bool | None = None  # pack each batch into one row without padding (LLaVA / Idefics3 / SmolVLM families)
    fp8_base: str | None = None  # "off", "backward" (grad-input only, bf16 loss), "all" or "mlp" (GPU with compute capability >= 8.9)
    learning_rate: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    seed: int | None = None


@dg.asset(
    deps=["tokenized_dataset", "base_model"], code_version=CODE_VERSION, group_name="model", kinds={"pytorch", "peft"}, pool="gpu"
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: TrainOverrides,
    artifacts: ArtifactStoreResource,
    settings: PipelineSettings,
    launcher: TrainingLauncher,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """A PEFT LoRA adapter on every linear layer of the language model, trained in its own process (Dagster Pipes)."""
    store = artifacts.store()
    base, data = upstream(context, store, "base_model"), upstream(context, store, "tokenized_dataset")
    train_config = with_overrides(settings.config().train, config.model_dump())
    inputs = {"base_model": base.fingerprint, "tokenized_dataset": data.fingerprint, "drop_versions": data.summary["drop_versions"]}
    current = upstream_or_none(context, store, "lora_adapter")  # the latest adapter Dagster recorded
    warm_start = current if train_config.init_from == "previous" and current is not None else None
    if warm_start and (warm_start.summary["inputs"], warm_start.summary["config"]) == (inputs, as_dict(train_config)):
        return materialize_result(warm_start, **_reported(warm_start.summary))  # no new data to continue on
    version = fingerprint("lora_adapter", CODE_VERSION, inputs, as_dict(train_config), warm_start.fingerprint if warm_start else None)
    reported = {}
    already_built = store.find("lora_adapter", version) is not None
    if not already_built:
        work = store.work_dir("lora_adapter", version)
        write_json(work / "spec.json", {
            "store_root": str(store.root), "version": version, "config": as_dict(train_config), "inputs": inputs,
            "base": ref_from_summary(base.summary, base.path).to_dict(), "processor_dir": str(base.path / PROCESSOR_DIR),
            "dataset_dir": str(data.path / "dataset"), "checkpoint_dir": str(work / "checkpoints"),
            "warm_start_dir": str(warm_start.path) if warm_start else None,
            "warm_start_from": warm_start.fingerprint if warm_start else None, "pins": data.summary["pins"],
        })
        invocation = pipes_subprocess_client.run(
            command=[*launcher.command("pipelines.train_worker"), str(work / "spec.json")], context=context
        )
        reported = dict(invocation.get_materialize_result().metadata)
    artifact = store.find("lora_adapter", version)
    if artifact is None:
        raise RuntimeError(f"the training process exited without publishing adapter {version}; see its log above")
    artifact = dataclasses.replace(artifact, cached=already_built)
    store.publish("lora_adapter", version)
    return materialize_result(artifact, **{**_reported(artifact.summary), **reported})


def _reported(summary: dict) -> dict:
    return {key: summary[key] for key in REPORTED if summary.get(key) is not None} | {
        "best_eval_loss": summary["best_eval_loss"] if summary.get("best_eval_loss") is not None else float("nan"),
        "trained_on": json.dumps(summary["inputs"]["drop_versions"]),
        "warm_start_from": str(summary.get("warm_start_from")),
    }
