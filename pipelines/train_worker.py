"""The training process that `lora_adapter` launches through Dagster Pipes (`python -m pipelines.train_worker SPEC`).

Running training outside the Dagster run process means a crash or OOM kills only this process,
its GPU memory is released when it exits, and it can be started with `accelerate launch`. Logs
(step, loss, throughput, ETA) stream back into the Dagster run; the result comes back as
materialization metadata.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

from vlmtune.artifacts import ArtifactStore
from vlmtune.config import TrainConfig
from vlmtune.models import BaseModelRef, load_processor
from vlmtune.pinning import check_pins
from vlmtune.train import train_adapter

# The figures every adapter version reports; the asset shows exactly these.
REPORTED = ("method", "steps", "resumed_from_step", "train_loss_last", "best_eval_loss", "trainable_params",
            "trainable_share", "train_seconds", "samples_per_second", "drops", "device")


# Expandable segments let the caching allocator grow blocks in place instead of reserving new ones
# for every shape: QLoRA at batch 2 on the 7B shape reserved 8.5 GiB without, 7.8 GiB with
# (7.3-7.4 GiB allocated either way; H200, benchmarks/NOTES.md). The user's own setting wins.
CUDA_ALLOCATOR_DEFAULT = "expandable_segments:True"


def main() -> None:
    use_allocator_default()
    spec = json.loads(Path(sys.argv[1]).read_text())
    if int(os.environ.get("RANK", "0")) != 0:
        # Under `accelerate launch` every rank trains (the Trainer keeps them in step); rank 0 alone publishes and reports.
        _train(spec, Path(tempfile.mkdtemp(prefix="vlmtune-rank-")), log=lambda message: None)
        return
    if PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes() as pipes:
            summary, version = _train_and_publish(spec, pipes.log.info)
            pipes.report_asset_materialization(
                metadata={key: summary[key] for key in REPORTED if summary.get(key) is not None}, data_version=version
            )
    else:  # started by hand or by a test: same work, logs to stdout
        _train_and_publish(spec, print)


def use_allocator_default() -> None:
    """Before anything touches CUDA: the allocator reads its configuration once, at its first allocation."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR_DEFAULT)


def _train_and_publish(spec: dict, log) -> tuple[dict, str]:
    check_pins(load_processor(spec["processor_dir"]), spec["pins"], "training")
    artifact = ArtifactStore(spec["store_root"]).build(
        "lora_adapter",
        spec["version"],
        lambda out: {
            **_train(spec, out, log),
            # what this version was trained on, so retraining can tell whether anything is new
            "inputs": spec["inputs"],
            "config": spec["config"],
            "warm_start_from": spec["warm_start_from"],
        },
        manifest={**spec["inputs"], **{key: spec[key] for key in ("inputs", "config", "warm_start_from", "pins")}},
    )
    return artifact.summary, artifact.fingerprint


def _train(spec: dict, out: Path, log) -> dict:
    return train_adapter(
        BaseModelRef(**spec["base"]),
        Path(spec["processor_dir"]),
        Path(spec["dataset_dir"]),
        out,
        TrainConfig(**spec["config"]),
        checkpoint_dir=Path(spec["checkpoint_dir"]),
        log=log,
        warm_start_dir=Path(spec["warm_start_dir"]) if spec["warm_start_dir"] else None,
        manifest={key: spec[key] for key in ("inputs", "pins", "warm_start_from")},
    )


if __name__ == "__main__":
    main()
