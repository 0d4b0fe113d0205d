"""Experiment trackers: the run's manifest and metrics to TensorBoard, and to MLflow when asked for.

TensorBoard is written whenever it is installed (it is a dependency); MLflow only when the user
sets `MLFLOW_TRACKING_URI` and has `mlflow` installed. The manifest (resolved config, data and
processor hashes, git commit, library versions, seed) goes to both, so a curve can be traced to
exactly what produced it (LLaMA-Factory #8652).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

TENSORBOARD_DIR = "runs"  # where the Trainer's TensorBoard callback writes, under its output_dir


def report_to() -> list[str]:
    """The Trainer's `report_to`: what is installed and asked for."""
    trackers = []
    if importlib.util.find_spec("tensorboard") is not None:
        trackers.append("tensorboard")
    if os.environ.get("MLFLOW_TRACKING_URI") and importlib.util.find_spec("mlflow") is not None:
        trackers.append("mlflow")
    return trackers


class ManifestToTrackers(TrainerCallback):
    """Logs the manifest once, at the start of training, beside the Trainer's own metrics."""

    def __init__(self, manifest: dict[str, Any], log_dir: Path):
        self.manifest, self.log_dir = manifest, Path(log_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        text = json.dumps(self.manifest, indent=2, sort_keys=True, default=str)
        trackers = report_to()
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(self.log_dir)) as writer:
                writer.add_text("manifest", f"```\n{text}\n```", global_step=state.global_step)
        if "mlflow" in trackers:
            import mlflow

            mlflow.log_dict(self.manifest, "manifest.json")
