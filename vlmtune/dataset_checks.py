"""Invariants of a tokenized dataset that a silent bug would break; the asset checks call these."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import datasets

from vlmtune.tokenization import IGNORE_INDEX


def tokenized_dataset_problems(dataset_dir: Path, processor, sample_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """What would make training silently wrong: test images in training, rows with nothing to learn,
    and labels that are not exactly the answer plus one end token (TRL #1880, #3751)."""
    splits = datasets.load_from_disk(str(dataset_dir))
    test_images = set(splits["test"]["image_sha256"])
    shared = {sha for name in ("train", "validation") for sha in splits[name]["image_sha256"] if sha in test_images}
    no_answer = [
        sample_id
        for name in ("train", "validation")
        for sample_id, labels in zip(splits[name]["sample_id"], splits[name]["labels"])
        if all(label == IGNORE_INDEX for label in labels)
    ]
    wrong_targets = [row["sample_id"] for row in _sample(splits, sample_size, seed) if not labels_are_answer(row, processor)]
    return {
        "images_shared_with_test": len(shared),
        "rows_without_answer_tokens": len(no_answer),
        "rows_sampled_for_targets": min(sample_size, sum(splits[name].num_rows for name in splits)),
        "rows_with_wrong_targets": len(wrong_targets),
        "examples": (no_answer + wrong_targets)[:5],
    }


def labels_are_answer(row: dict[str, Any], processor) -> bool:
    """The trained-on tokens decode to the answer, end with one special (end-of-turn) token, and follow the prompt."""
    tokenizer = processor.tokenizer
    trained = [token for token in row["labels"] if token != IGNORE_INDEX]
    first = next((i for i, token in enumerate(row["labels"]) if token != IGNORE_INDEX), None)
    special = set(tokenizer.all_special_ids)
    if not trained or first != row["prompt_length"] or trained[-1] not in special:
        return False
    if sum(token in special for token in trained) != 1:
        return False
    return tokenizer.decode(trained, skip_special_tokens=True).strip() == row["answer"]


def _sample(splits: datasets.DatasetDict, size: int, seed: int) -> list[dict[str, Any]]:
    rows = [(name, index) for name in splits for index in range(splits[name].num_rows)]
    picked = random.Random(seed).sample(rows, min(size, len(rows)))
    columns = ["sample_id", "labels", "prompt_length", "answer"]
    return [{column: splits[name][index][column] for column in columns} for name, index in picked]
