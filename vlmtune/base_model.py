"""The `base_model` stage: pin the exact weights and processor that everything downstream uses.

For a Hugging Face id or local path it records the id, the resolved revision and a hash of the
weights, and saves the processor. For the tiny offline default it builds the model from a config
and pretrains it in full on generated shape scenes (vlmtune.shapes; LoRA on random weights learns
next to nothing), then saves it like any pretrained checkpoint. The pretraining never sees an
easy-VQA image or an easy-VQA question.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmtune.artifacts import sha256_file, sha256_tree
from vlmtune.config import TinyModelConfig, TrainConfig
from vlmtune.formats import PROCESSOR_DIR, WEIGHTS_DIR
from vlmtune.models import BaseModelRef, build_tiny_vlm, is_tiny_default, load_processor
from vlmtune.pinning import processor_pins
from vlmtune.shapes import scene_sample
from vlmtune.tokenization import dataset_from_rows, encode_batch
from vlmtune.train import Log, fit



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
    n_train = tiny.pretrain_steps * tiny.pretrain_batch_size  # every step sees scenes it has never seen
    train_set = SceneQuestions(processor, seed=tiny.seed, size=n_train)
    validation = SceneQuestions(processor, seed=tiny.seed + 1, size=512)
    eval_set = dataset_from_rows([validation.row(index, as_bytes=True) for index in range(len(validation))])
    config = TrainConfig(
        method="full",
        learning_rate=tiny.pretrain_learning_rate,
        max_steps=tiny.pretrain_steps,
        batch_size=tiny.pretrain_batch_size,
        warmup_ratio=0.02,
        eval_steps=max(1, tiny.pretrain_steps // 4),
        max_eval_samples=512,
        early_stopping_patience=10**6,  # a fixed pretraining budget; early stopping is the fine-tuning's concern
        gradient_checkpointing=False,  # a 2-layer model's activations are small; recomputing them only costs time
        seed=tiny.seed,
    )
    log(f"pretraining the tiny base on {n_train} generated shape scenes for {tiny.pretrain_steps} steps")
    summary = fit(model, processor, train_set, eval_set, config, checkpoint_dir, log)
    model.save_pretrained(str(weights_dir))
    processor.save_pretrained(str(weights_dir))
    return {
        "pretrain_samples": n_train,
        "pretrain_steps": summary["steps"],
        "pretrain_loss_last": summary["train_loss_last"],
        "pretrain_eval_loss": summary["best_eval_loss"],
        "pretrain_seconds": summary["train_seconds"],
        "total_params": summary["total_params"],
    }


class SceneQuestions(torch.utils.data.Dataset):
    """Generated shape scenes (vlmtune.shapes) as tokenized training rows, made when asked for."""

    def __init__(self, processor, seed: int, size: int):
        self.processor, self.seed, self.size = processor, seed, size
        self._encoded: dict[tuple[str, str], dict[str, Any]] = {}
        # The tiny default's processor gives every image the same number of image tokens (a fixed
        # resize), so the prompt's ids do not depend on the scene: a blank image stands in.
        self._blank = Image.new("RGB", (8, 8))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.row(index)

    def row(self, index: int, as_bytes: bool = False) -> dict[str, Any]:
        sample = scene_sample(self.seed, index)
        key = (sample["question"], sample["answer"])
        if key not in self._encoded:  # a few hundred distinct question-answer pairs: tokenize each once
            self._encoded[key] = encode_batch(self.processor, [key[0]], [key[1]], [self._blank])[0]
        image = sample["image"]
        if as_bytes:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image = {"bytes": buffer.getvalue(), "path": None}
        return {
            "sample_id": f"scene:{self.seed}:{index}", "drop": "pretrain", "split": "train", "image_sha256": "",
            "image": image, "question": sample["question"], "answer": sample["answer"],
            "answer_type": "", "question_type": "", **self._encoded[key],
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
