import dagster as dg
from pydantic import Field

from vlmtune.config import PipelineConfig, Profile, profile_config


class PipelineSettings(dg.ConfigurableResource):
    """The run profile that sets every stage's defaults; per-run overrides come from each asset's config."""

    profile: Profile = Field(default="demo", description="`demo`: the full easy-VQA run; `smoke`: a small subset and a few steps.")

    seed: int = Field(default=0, description="Seeds the tiny base's pretraining and the adapter's training (`VQA_SEED`).")

    def config(self) -> PipelineConfig:
        return profile_config(self.profile, self.seed)
