from pathlib import Path

import dagster as dg
from pydantic import Field


class DropsResource(dg.ConfigurableResource):
    """Where raw data drops arrive: one folder per drop under `$VQA_DATA_DIR/drops/`."""

    root: str = Field(description="Folder whose sub-folders are drops; each becomes a `drops` partition.")

    def drop_dir(self, name: str) -> Path:
        path = Path(self.root) / name
        if not path.is_dir():
            raise FileNotFoundError(f"drop {name!r} has no folder at {path}")
        return path
