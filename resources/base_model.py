import dagster as dg
from pydantic import Field

from vlmtune.config import TINY_MODEL_ID


class BaseModelResource(dg.ConfigurableResource):
    """Which pretrained VLM the adapter is trained on."""

    model_id: str = Field(
        default=TINY_MODEL_ID,
        description=f"Hugging Face model id or local folder; {TINY_MODEL_ID!r} builds and pretrains the offline tiny default.",
    )
    revision: str | None = Field(default=None, description="Branch, tag or commit on the hub; resolved to a commit and recorded.")
    trust_remote_code: bool = Field(
        default=False, description="Run the model repository's own Python code (CogVLM / CogAgent need it). Opt in only for repos you trust."
    )
