"""Batches: right-padded (or packed) for training, left-padded prompts for generation; pixels made here, per batch.

Right padding keeps positions of real tokens at 0..n-1 in training; generation needs left padding
so every row's next token is the last column (TRL #5785). `padding_free` packs a training batch
into one row instead (vlmtune.packing).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from vlmtune import families
from vlmtune.packing import pack_sequences
from vlmtune.tokenization import IGNORE_INDEX


class TrainingCollator:
    """Rows of the tokenized dataset -> model inputs with labels; padding is masked out of the loss.

    With `padding_free` the rows come back as one packed row without padding (vlmtune.packing).
    """

    def __init__(self, processor, padding_free: bool = False):
        self.processor = processor
        self.pad_token_id = pad_token_id(processor)
        self.padding_free = padding_free

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            packed = pack_sequences([row["input_ids"] for row in rows], [row["labels"] for row in rows], self.pad_token_id)
            return {**packed, **pixel_inputs(self.processor.image_processor, rows)}
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention_mask[i, :n] = 1
        prompt_lengths = [row["prompt_length"] for row in rows]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **token_type_inputs(self.processor, input_ids, prompt_lengths, left_padded=False),
            **pixel_inputs(self.processor.image_processor, rows),
        }


def generation_batch(processor, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Prompts only (the answer stripped), left-padded, with their pixels."""
    prompts = [row["input_ids"][: row["prompt_length"]] for row in rows]
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(rows), longest), pad_token_id(processor), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, longest - len(prompt) :] = torch.as_tensor(prompt)
        attention_mask[i, longest - len(prompt) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        **token_type_inputs(processor, input_ids, [len(prompt) for prompt in prompts], left_padded=True),
        **pixel_inputs(processor.image_processor, rows),
    }


def pixel_inputs(image_processor, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Run the image processor on the batch's images (every key it returns: pixel_values, grids, sizes)."""
    # One list per row: image-splitting processors (Idefics3, SmolVLM) read a flat list as one sample's images.
    images = [[_rgb(row["image"])] for row in rows]
    return dict(image_processor(images=images, return_tensors="pt"))


def token_type_inputs(processor, input_ids: torch.Tensor, prompt_lengths: list[int], left_padded: bool) -> dict[str, torch.Tensor]:
    """The per-token type ids some families need beside input_ids.

    PaliGemma: `token_type_ids` 0 on the prefix (image + prompt, attended bidirectionally) and 1 on the
    answer and padding (causal). Qwen2-VL / Qwen2.5-VL / GLM-4V: `mm_token_type_ids` marking image
    tokens, from which their multimodal RoPE positions are computed.
    """
    extra = {}
    if families.family_of_processor(processor).prompt_style == "prefix_suffix":
        token_type_ids = torch.ones_like(input_ids)
        for i, n_prompt in enumerate(prompt_lengths):
            start = input_ids.shape[1] - n_prompt if left_padded else 0
            token_type_ids[i, start : start + n_prompt] = 0
        extra["token_type_ids"] = token_type_ids
    if families.family_of_processor(processor).prompt_style == "cogvlm_vqa":  # CogVLM: 1 routes a token to the vision expert
        extra["token_type_ids"] = processor.token_type_ids(input_ids, prompt_lengths, left_padded)
    if _wants_mm_token_type_ids(processor):
        extra["mm_token_type_ids"] = torch.as_tensor(processor.create_mm_token_type_ids(input_ids.tolist()), dtype=torch.long)
    return extra


def _wants_mm_token_type_ids(processor) -> bool:
    """Whether the processor's model reads `mm_token_type_ids`: a processor attribute from transformers
    5.24, a default of the processor's text kwargs before (5.17), where the model refuses a batch without it."""
    if getattr(processor, "return_mm_token_type_ids", False):
        return True
    defaults = getattr(getattr(processor, "valid_processor_kwargs", None), "_defaults", None) or {}
    return bool(defaults.get("text_kwargs", {}).get("return_mm_token_type_ids"))


def pad_token_id(processor) -> int:
    tokenizer = processor.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
