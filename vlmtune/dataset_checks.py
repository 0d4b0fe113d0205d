"""Invariants of a tokenized dataset that a silent bug would break; the asset checks call these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from vlmtune.tokenization import IGNORE_INDEX


def tokenized_dataset_problems(dataset_dir: Path) -> dict[str, Any]:
    """Images shared between train/validation and test, and rows with no answer token to learn from."""
    splits = datasets.load_from_disk(str(dataset_dir))
    test_images = set(splits["test"]["image_sha256"])
    shared = {sha for name in ("train", "validation") for sha in splits[name]["image_sha256"] if sha in test_images}
    no_answer = [
        sample_id
        for name in ("train", "validation")
        for sample_id, labels in zip(splits[name]["sample_id"], splits[name]["labels"])
        if all(label == IGNORE_INDEX for label in labels)
    ]
    return {"images_shared_with_test": len(shared), "rows_without_answer_tokens": len(no_answer), "examples": no_answer[:5]}
