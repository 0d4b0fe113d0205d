"""Batched greedy generation with a KV cache and left padding: the one way answers are produced.

Rows are answered in order of prompt length, so a batch pads its prompts to a near-equal length
instead of the longest in the split, and put back in their original order afterwards.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch

from vlmtune.collate import TrainingCollator, generation_batch, pad_token_id
from vlmtune.families import answer_format


@torch.inference_mode()
def greedy_answers(model, processor, rows: datasets.Dataset | list[dict[str, Any]], batch_size: int, max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """Decoded answers for each row, and whether each one ran into `max_new_tokens` without stopping."""
    model.eval()
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    # Trained answers end with the template's end-of-turn token (Qwen2-VL's <|im_end|>), which may not be EOS.
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(answer_format(processor).end_token)})
    lengths = rows["prompt_length"] if isinstance(rows, datasets.Dataset) else [row["prompt_length"] for row in rows]
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    answers: list[str] = [""] * len(order)
    hit_limit: list[bool] = [False] * len(order)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        inputs = {key: _on(device, value) for key, value in generation_batch(processor, _rows(rows, indices)).items()}
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_token_id(processor),
            eos_token_id=stop_ids,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for index, sequence in zip(indices, new_tokens.tolist()):
            stop_at = next((position for position, token in enumerate(sequence) if token in stop_ids), None)
            stopped = stop_at is not None
            if stopped:
                sequence = sequence[:stop_at]
            answers[index] = tokenizer.decode(sequence, skip_special_tokens=True).strip()
            hit_limit[index] = not stopped
    return answers, hit_limit


@torch.inference_mode()
def teacher_forced_logits(model, processor, rows: datasets.Dataset | list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) of prompt + reference answer, right-padded, and their labels."""
    batch = TrainingCollator(processor)(_rows(rows, range(len(rows))))
    labels = batch.pop("labels")
    device = next(model.parameters()).device
    logits = model(**{key: _on(device, value) for key, value in batch.items()}).logits.float().cpu()
    return logits, labels


def answer_losses(model, processor, rows: datasets.Dataset, batch_size: int) -> list[float]:
    """Mean cross-entropy of each row's reference answer tokens: how far the model is from the right answer."""
    losses = []
    for start in range(0, len(rows), batch_size):
        logits, labels = teacher_forced_logits(model, processor, _rows(rows, range(start, min(start + batch_size, len(rows)))))
        shifted, targets = logits[:, :-1], labels[:, 1:]
        token_loss = torch.nn.functional.cross_entropy(shifted.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        counted = (targets != -100).sum(dim=1).clamp(min=1)
        losses += (token_loss.sum(dim=1) / counted).tolist()
    return losses


def _on(device: torch.device, value):
    """A tensor, or CogVLM's per-sample lists of image tensors, on `device`."""
    return [_on(device, item) for item in value] if isinstance(value, list) else value.to(device)


def _rows(rows, indices) -> list[dict[str, Any]]:
    if isinstance(rows, datasets.Dataset):
        columns = rows[list(indices)]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]
    return [rows[index] for index in indices]
