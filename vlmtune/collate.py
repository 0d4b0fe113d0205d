"""Batches: right-padded for training, left-padded prompts for generation; pixels made here, per batch.

Right padding keeps positions of real tokens at 0..n-1 in training; generation needs left padding
so every row's next token is the last column (TRL #5785).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from vlmtune.tokenization import IGNORE_INDEX


class TrainingCollator:
    """Rows of the tokenized dataset -> model inputs with labels; padding is masked out of the loss."""

    def __init__(self, processor):
        self.image_processor = processor.image_processor
        self.pad_token_id = pad_token_id(processor)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **pixel_inputs(self.image_processor, rows)}


def generation_batch(processor, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Prompts only (the answer stripped), left-padded, with their pixels."""
    prompts = [row["input_ids"][: row["prompt_length"]] for row in rows]
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(rows), longest), pad_token_id(processor), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, longest - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[i, longest - len(prompt) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **pixel_inputs(processor.image_processor, rows)}


def pixel_inputs(image_processor, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Run the image processor on the batch's images (every key it returns: pixel_values, grids, sizes)."""
    images = [_rgb(row["image"]) for row in rows]
    return dict(image_processor(images=images, return_tensors="pt"))


def pad_token_id(processor) -> int:
    tokenizer = processor.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
