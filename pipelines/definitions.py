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
    clean_counts_conserved,
    lora_really_trained,
    merged_matches_adapter,
    ready_to_ship,
    tokenized_dataset_sound,
    uses_the_image,
)
from pipelines.jobs import build_jobs
from pipelines.schedules import build_retraining_schedule
from pipelines.sensors import build_new_drops_sensor
from resources import ArtifactStoreResource, BaseModelResource, DropsResource, PipelineSettings, TrainingLauncher
from vlmtune.config import TINY_MODEL_ID

ASSETS = [raw_samples, clean_samples, base_model, tokenized_dataset, lora_adapter, full_finetune_reference, evaluation_report, merged_model]
CHECKS = [clean_counts_conserved, tokenized_dataset_sound, lora_really_trained, ready_to_ship, uses_the_image, merged_matches_adapter]


def build_definitions(
    profile: str | None = None,
    home: str | None = None,
    data_dir: str | None = None,
    model_id: str | None = None,
    retries: int | None = None,
    automation: bool | None = None,
) -> dg.Definitions:
    """Definitions for one profile and set of folders; arguments default to the environment (see README)."""
    env = os.environ.get
    data_root = Path(data_dir or env("VQA_DATA_DIR", "data")).resolve()
    ingest_job, train_job, lora_vs_full_job = build_jobs(retries if retries is not None else int(env("VQA_RETRIES", "1")))
    automation = automation if automation is not None else env("VQA_AUTOMATION", "on") == "on"
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        jobs=[ingest_job, train_job, lora_vs_full_job],
        sensors=[build_new_drops_sensor(ingest_job, dg.DefaultSensorStatus.RUNNING if automation else dg.DefaultSensorStatus.STOPPED)],
        schedules=[
            build_retraining_schedule(
                train_job, env("VQA_RETRAIN_CRON", "0 2 * * *"),
                dg.DefaultScheduleStatus.RUNNING if automation else dg.DefaultScheduleStatus.STOPPED,
            )
        ],
        resources={
            "artifacts": ArtifactStoreResource(root=str(Path(home or env("VQA_HOME", "artifacts")).resolve())),
            "drops": DropsResource(root=str(data_root / "drops")),
            "settings": PipelineSettings(profile=profile or env("VQA_PROFILE", "demo"), seed=int(env("VQA_SEED", "0"))),
            "base": BaseModelResource(
                model_id=model_id or env("VQA_BASE_MODEL", TINY_MODEL_ID),
                # an environment switch, since run config for a resource replaces all of its fields (model_id too)
                trust_remote_code=env("VQA_TRUST_REMOTE_CODE", "false").lower() in ("1", "true", "yes"),
            ),
            "launcher": TrainingLauncher(),
            "pipes_subprocess_client": dg.PipesSubprocessClient(),
        },
    )


def ingest_drop_job() -> dg.JobDefinition:
    """Re-importable handles on the jobs, built from the environment, for `dg.reconstructable`."""
    return build_definitions().resolve_job_def("ingest_drop")


def train_and_ship_job() -> dg.JobDefinition:
    return build_definitions().resolve_job_def("train_and_ship")


defs = build_definitions()
