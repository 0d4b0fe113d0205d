import dagster as dg
from pydantic import Field

from vlmtune.artifacts import ArtifactStore


class ArtifactStoreResource(dg.ConfigurableResource):
    """The versioned, content-addressed folder every stage writes to (`$VQA_HOME`)."""

    root: str = Field(description="Folder holding every artifact, one sub-folder per asset, partition and version.")

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root)
