"""The `base_model` stage: pin the exact weights and processor that everything downstream uses.

For a Hugging Face id or local path it records the id, the resolved revision and a hash of the
weights, and saves the processor. For the tiny offline default it builds the model from a config
and pretrains it in full on the pretraining share of easy-VQA (LoRA on random weights learns next
to nothing), then saves it like any pretrained checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


from vlmtune.artifacts import sha256_file, sha256_tree
from vlmtune.config import TinyModelConfig, TrainConfig
from vlmtune.easyvqa import pretraining_samples
from vlmtune.models import BaseModelRef, build_tiny_vlm, is_tiny_default, load_processor
from vlmtune.pinning import processor_pins
from vlmtune.tokenization import dataset_from_rows, encode_batch
from vlmtune.train import Log, fit

PROCESSOR_DIR = "processor"
WEIGHTS_DIR = "weights"


def prepare_base_model(
    model_id: str,
    revision: str | None,
    trust_remote_code: bool,
    tiny: TinyModelConfig,
    out_dir: Path,
    checkpoint_dir: Path,
    log: Log = print,
) -> dict[str, Any]:
    """Write `processor/` (and `weights/` for the tiny default) into `out_dir`; return the pinned reference."""
    out_dir = Path(out_dir)
    if is_tiny_default(model_id):
        summary = _pretrain_tiny(tiny, out_dir / WEIGHTS_DIR, checkpoint_dir, log)
        ref = BaseModelRef(model_id, revision="built-from-config", weights_dir=WEIGHTS_DIR)
        weights_sha256 = _weights_hash(out_dir / WEIGHTS_DIR)
    else:
        summary = {}
        local = Path(model_id)
        resolved_revision = "local" if local.is_dir() else _resolve_hub_revision(model_id, revision)
        ref = BaseModelRef(model_id, revision=resolved_revision, trust_remote_code=trust_remote_code)
        weights_sha256 = _weights_hash(local) if local.is_dir() else f"hub:{model_id}@{resolved_revision}"
    source = out_dir / WEIGHTS_DIR if ref.weights_dir else ref.model_id
    processor = load_processor(source, revision=None if ref.weights_dir else ref.revision, trust_remote_code=trust_remote_code)
    processor.save_pretrained(str(out_dir / PROCESSOR_DIR))
    return {
        "ref": ref.to_dict(),
        "weights_sha256": weights_sha256,
        "processor_sha256": sha256_tree(out_dir / PROCESSOR_DIR),
        "chat_template_sha256": hashlib.sha256((getattr(processor, "chat_template", None) or "").encode()).hexdigest(),
        "pins": processor_pins(processor),
        **summary,
    }


def ref_from_summary(summary: dict[str, Any], artifact_dir: Path) -> BaseModelRef:
    """The reference with a built model's weights folder made absolute (summaries store it relative)."""
    ref = dict(summary["ref"])
    if ref["weights_dir"]:
        ref["weights_dir"] = str(Path(artifact_dir) / ref["weights_dir"])
    return BaseModelRef(**ref)


def _pretrain_tiny(tiny: TinyModelConfig, weights_dir: Path, checkpoint_dir: Path, log: Log) -> dict[str, Any]:
    model, processor = build_tiny_vlm(tiny)
    samples = pretraining_samples(tiny.pretrain_fraction, tiny.pretrain_max_samples, seed=tiny.seed)
    encoded = encode_batch(processor, [s["question"] for s in samples], [s["answer"] for s in samples], [s["image_bytes"] for s in samples])
    rows = [
        {
            "sample_id": f"pretrain:{index}", "drop": "pretrain", "split": sample["split"], "image_sha256": "",
            "image": {"bytes": sample["image_bytes"], "path": None}, "question": sample["question"], "answer": sample["answer"],
            "answer_type": "", "question_type": "", **example,
        }
        for index, (sample, example) in enumerate(zip(samples, encoded))
    ]
    dataset = dataset_from_rows(rows)
    train_set = dataset.filter(lambda split: split == "train", input_columns="split")
    eval_set = dataset.filter(lambda split: split == "validation", input_columns="split")
    config = TrainConfig(
        method="full",
        learning_rate=tiny.pretrain_learning_rate,
        max_steps=tiny.pretrain_steps,
        batch_size=tiny.pretrain_batch_size,
        eval_steps=max(1, tiny.pretrain_steps // 4),
        max_eval_samples=512,
        early_stopping_patience=10**6,  # a fixed pretraining budget; early stopping is the fine-tuning's concern
        gradient_checkpointing=False,  # a 2-layer model's activations are small; recomputing them only costs time
        seed=tiny.seed,
    )
    log(f"pretraining the tiny base on {train_set.num_rows} easy-VQA questions for {tiny.pretrain_steps} steps")
    summary = fit(model, processor, train_set, eval_set, config, checkpoint_dir, log)
    model.save_pretrained(str(weights_dir))
    processor.save_pretrained(str(weights_dir))
    return {
        "pretrain_samples": train_set.num_rows,
        "pretrain_steps": summary["steps"],
        "pretrain_loss_last": summary["train_loss_last"],
        "pretrain_eval_loss": summary["best_eval_loss"],
        "pretrain_seconds": summary["train_seconds"],
        "total_params": summary["total_params"],
    }


def _weights_hash(folder: Path) -> str:
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _resolve_hub_revision(model_id: str, revision: str | None) -> str:
    """The commit a hub revision (branch, tag or None) points at, so later runs load the same weights."""
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(model_id, revision=revision).sha
    except Exception as error:
        raise RuntimeError(
            f"cannot resolve {model_id!r} at revision {revision!r} on the Hugging Face Hub ({error}). "
            "Pass a local path, or pin a commit and make sure the hub (or HF_ENDPOINT mirror) is reachable."
        ) from error
