"""CogVLM / CogAgent inputs, as their remote code's `build_conversation_input_ids` builds them.

These models have no processor: the prompt is `<bos>`, one placeholder (the pad token) per vision
token, then the text; `token_type_ids` route each position to the language (0) or vision (1)
expert. Images are passed separately as `images` (and, for CogAgent, a high-resolution copy as
`cross_images` for its cross-attention), each a list of one normalised tensor per sample. The VQA
template is "Question: {q} Short answer:" (CogAgent prefixes "<EOI>"); the answer ends with EOS.
Plain functions, so they are tested offline; the models themselves need their remote code (see
`vlmtune.families.COGVLM_TRANSFORMERS`).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from vlmtune.tokenization import IGNORE_INDEX

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vqa_prompt(question: str, cogagent: bool = False) -> str:
    return f"{'<EOI>' if cogagent else ''}Question: {question} Short answer:"


def encode_example(tokenizer, question: str, answer: str, *, image_size: int, patch_size: int, cogagent: bool = False) -> dict[str, Any]:
    """input_ids / token_type_ids / labels for one sample; labels keep only the answer and its EOS."""
    vision_tokens = (image_size // patch_size) ** 2 + 2  # the patch grid plus begin- and end-of-image
    prompt_ids = tokenizer.encode(vqa_prompt(question, cogagent), add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt = [tokenizer.bos_token_id] + [tokenizer.pad_token_id] * vision_tokens + prompt_ids
    token_types = [LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * vision_tokens + [LANGUAGE_TOKEN_TYPE] * (len(prompt_ids) + len(answer_ids))
    return {
        "input_ids": prompt + answer_ids,
        "token_type_ids": token_types,
        "labels": [IGNORE_INDEX] * len(prompt) + answer_ids,
        "prompt_length": len(prompt),
    }


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize to size x size and CLIP normalisation, as CogVLM's torchvision transform does."""
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def collate(rows: list[dict[str, Any]], pad_token_id: int, *, image_size: int, cross_image_size: int | None = None) -> dict[str, Any]:
    """Right-padded batch in the remote code's forward signature (`images`: one-tensor list per sample)."""
    longest = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), longest), pad_token_id, dtype=torch.long),
        "token_type_ids": torch.full((len(rows), longest), LANGUAGE_TOKEN_TYPE, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), longest), dtype=torch.long),
        "labels": torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for key in ("input_ids", "token_type_ids", "labels"):
            batch[key][i, :n] = torch.as_tensor(row[key])
        batch["attention_mask"][i, :n] = 1
    batch["images"] = [[image_tensor(row["image"], image_size)] for row in rows]
    if cross_image_size is not None:
        batch["cross_images"] = [[image_tensor(row["image"], cross_image_size)] for row in rows]
    return batch
