"""Stage 6: fold the adapter into the base weights and prove the merged model answers the same.

The merged folder holds safetensors weights (never pickle), the processor with its chat template
and the generation config, so `AutoModelForImageTextToText.from_pretrained(path)` loads it with no
project code. It is reloaded from disk and compared with base + adapter on test samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch

from vlmtune.collate import TrainingCollator
from vlmtune.config import MergeConfig
from vlmtune.evaluate import load_adapted_model
from vlmtune.generate import greedy_answers
from vlmtune.models import BaseModelRef, load_processor


def merge_adapter(base: BaseModelRef, adapter_dir: Path, dataset_dir: Path, out_dir: Path, config: MergeConfig) -> dict[str, Any]:
    processor = load_processor(adapter_dir)
    splits = datasets.load_from_disk(str(dataset_dir))
    check_rows = splits["test"].select(range(min(config.n_check_samples, splits["test"].num_rows)))
    adapted = load_adapted_model(base, adapter_dir)
    reference_logits = _logits(adapted, processor, check_rows)
    reference_answers, _ = greedy_answers(adapted, processor, check_rows, batch_size=len(check_rows) or 1, max_new_tokens=16)

    merged = adapted.merge_and_unload() if hasattr(adapted, "merge_and_unload") else adapted
    merged.save_pretrained(str(out_dir), max_shard_size="2GB")
    processor.save_pretrained(str(out_dir))
    pickles = sorted(p.name for p in Path(out_dir).glob("*.bin"))
    if pickles:
        raise RuntimeError(f"merged model wrote pickle weights {pickles}; only safetensors are allowed")
    del adapted, merged

    reloaded = _load_standalone(out_dir)
    merged_logits = _logits(reloaded, processor, check_rows)
    merged_answers, _ = greedy_answers(reloaded, processor, check_rows, batch_size=len(check_rows) or 1, max_new_tokens=16)
    max_logit_diff = float((reference_logits - merged_logits).abs().max()) if len(check_rows) else 0.0
    return {
        "n_check_samples": len(check_rows),
        "max_logit_diff": max_logit_diff,
        "answers_identical": reference_answers == merged_answers,
        "within_tolerance": max_logit_diff <= config.max_logit_diff,
        "weight_files": sorted(p.name for p in Path(out_dir).glob("*.safetensors")),
        "size_bytes": sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors")),
    }


def _load_standalone(path: Path):
    """Load exactly as a user would: transformers only, nothing fetched, no project code."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


@torch.inference_mode()
def _logits(model, processor, rows: datasets.Dataset) -> torch.Tensor:
    if len(rows) == 0:
        return torch.empty(0)
    batch = TrainingCollator(processor)([rows[i] for i in range(len(rows))])
    batch.pop("labels")
    device = next(model.parameters()).device
    return model(**{key: value.to(device) for key, value in batch.items()}).logits.float().cpu()
