"""The one `dg.Definitions` of the project; `dagster dev -w workspace.yaml` loads `defs` from here."""

import os
from pathlib import Path

import dagster as dg

from assets.base_model import base_model
from assets.clean_samples import clean_samples
from assets.evaluation_report import evaluation_report
from assets.full_finetune_reference import full_finetune_reference
from assets.lora_adapter import lora_adapter
from assets.merged_model import merged_model
from assets.raw_samples import raw_samples
from assets.tokenized_dataset import tokenized_dataset
from pipelines.checks import (
    beats_blind_baseline,
    clean_counts_conserved,
    merged_matches_adapter,
    tokenized_dataset_sound,
    uses_the_image,
)
from pipelines.jobs import ingest_job, lora_vs_full_job, train_job
from resources import ArtifactStoreResource, BaseModelResource, DropsResource, PipelineSettings
from vlmtune.config import TINY_MODEL_ID

ASSETS = [raw_samples, clean_samples, base_model, tokenized_dataset, lora_adapter, full_finetune_reference, evaluation_report, merged_model]
CHECKS = [clean_counts_conserved, tokenized_dataset_sound, beats_blind_baseline, uses_the_image, merged_matches_adapter]


def build_definitions(
    profile: str | None = None, home: str | None = None, data_dir: str | None = None, model_id: str | None = None
) -> dg.Definitions:
    """Definitions for one profile and set of folders; arguments default to the environment (see README)."""
    data_root = Path(data_dir or os.environ.get("VQA_DATA_DIR", "data")).resolve()
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        jobs=[ingest_job, train_job, lora_vs_full_job],
        resources={
            "artifacts": ArtifactStoreResource(root=str(Path(home or os.environ.get("VQA_HOME", "artifacts")).resolve())),
            "drops": DropsResource(root=str(data_root / "drops")),
            "settings": PipelineSettings(profile=profile or os.environ.get("VQA_PROFILE", "demo")),
            "base": BaseModelResource(model_id=model_id or os.environ.get("VQA_BASE_MODEL", TINY_MODEL_ID)),
        },
    )


defs = build_definitions()
