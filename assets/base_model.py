import dagster as dg

from assets.results import materialize_result
from resources import ArtifactStoreResource, BaseModelResource, PipelineSettings
from vlmtune.artifacts import fingerprint
from vlmtune.base_model import prepare_base_model
from vlmtune.code_version import stage_code_version
from vlmtune.config import as_dict
from vlmtune.models import is_tiny_default

CODE_VERSION = stage_code_version(["assets.base_model"], ("tokenizers", "torch", "transformers"))


@dg.asset(code_version=CODE_VERSION, group_name="model", kinds={"pytorch", "huggingface"}, pool="gpu")
def base_model(
    context: dg.AssetExecutionContext, base: BaseModelResource, artifacts: ArtifactStoreResource, settings: PipelineSettings
) -> dg.MaterializeResult:
    """The exact base weights and processor (id, resolved revision, weight hash); the tiny default is built and pretrained here."""
    tiny = settings.config().tiny_model
    spec = {"model_id": base.model_id, "revision": base.revision, "trust_remote_code": base.trust_remote_code}
    version = fingerprint("base_model", CODE_VERSION, spec, as_dict(tiny) if is_tiny_default(base.model_id) else None)
    store = artifacts.store()
    artifact = store.build(
        "base_model",
        version,
        lambda out: prepare_base_model(
            base.model_id, base.revision, base.trust_remote_code, tiny, out, store.work_dir("base_model", version), context.log.info
        ),
    )
    summary = artifact.summary
    return materialize_result(
        artifact,
        model_id=base.model_id,
        revision=str(summary["ref"]["revision"]),
        weights_sha256=summary["weights_sha256"],
        processor_sha256=summary["processor_sha256"],
        chat_template_sha256=summary["chat_template_sha256"],
        **{key: summary[key] for key in ("total_params", "pretrain_samples", "pretrain_steps", "pretrain_eval_loss", "pretrain_seconds") if key in summary},
    )
