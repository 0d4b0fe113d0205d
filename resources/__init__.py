"""Dagster resources: the systems the assets talk to, never stage logic."""

from resources.artifact_store import ArtifactStoreResource
from resources.base_model import BaseModelResource
from resources.drops import DropsResource
from resources.launcher import TrainingLauncher
from resources.settings import PipelineSettings

__all__ = ["ArtifactStoreResource", "BaseModelResource", "DropsResource", "PipelineSettings", "TrainingLauncher"]
