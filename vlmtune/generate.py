"""Batched greedy generation with a KV cache and left padding: the one way answers are produced."""

from __future__ import annotations

from typing import Any

import datasets
import torch

from vlmtune.collate import generation_batch, pad_token_id
from vlmtune.families import answer_format


@torch.inference_mode()
def greedy_answers(model, processor, rows: datasets.Dataset | list[dict[str, Any]], batch_size: int, max_new_tokens: int) -> tuple[list[str], list[bool]]:
    """Decoded answers for each row, and whether each one ran into `max_new_tokens` without stopping."""
    model.eval()
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    # Trained answers end with the template's end-of-turn token (Qwen2-VL's <|im_end|>), which may not be EOS.
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(answer_format(processor).end_token)})
    answers, hit_limit = [], []
    for start in range(0, len(rows), batch_size):
        batch = _rows(rows, start, start + batch_size)
        inputs = {key: value.to(device) for key, value in generation_batch(processor, batch).items()}
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id(processor),
            eos_token_id=stop_ids,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for sequence in new_tokens.tolist():
            stop_at = next((index for index, token in enumerate(sequence) if token in stop_ids), None)
            stopped = stop_at is not None
            if stopped:
                sequence = sequence[:stop_at]
            answers.append(tokenizer.decode(sequence, skip_special_tokens=True).strip())
            hit_limit.append(not stopped)
    return answers, hit_limit


def _rows(rows, start: int, stop: int) -> list[dict[str, Any]]:
    if isinstance(rows, datasets.Dataset):
        columns = rows[start:stop]
        return [dict(zip(columns, values)) for values in zip(*columns.values())]
    return list(rows[start:stop])
