"""Padding-free batches: a batch's samples packed end to end into one sequence, none attending to another.

A right-padded batch costs every row the longest row's length; on variable-length data (long and
short conversations, one image each) that is compute spent on pad tokens. Packed, the batch is one
row of the samples' summed length: `position_ids` restart at 0 for each sample, and `cu_seq_lens`
(the samples' cumulative boundaries) tell the attention where each one begins. The samples per step,
and so the loss (a mean over the batch's answer tokens), are those of the padded batch: only the pad
tokens are gone. `vlmtune.speed.varlen_attention` runs the attention per sample from `cu_seq_lens`.

Only families whose positions are one counter per token and whose attention is causal pack:
multimodal RoPE (Qwen2-VL, Qwen2.5-VL, GLM-4V) computes positions per sequence from the image
grids, PaliGemma attends bidirectionally over its prefix, and CogVLM's remote code builds its own
mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlmtune import families
from vlmtune.speed.answer_loss import IGNORE_INDEX  # light: the benchmark imports this module without the data stack

# Packed lengths are rounded up to this with a pad-only segment: FP8 and Tensor-Core matmul shapes
# want multiples of 16, and rounding keeps the number of distinct shapes torch.compile sees small.
PAD_TO_MULTIPLE_OF = 64


def pack_sequences(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF
) -> dict[str, torch.Tensor | int | bool]:
    """One (1 x total) row holding every sample, with per-sample positions and boundaries.

    The first label of each sample is ignored, so no sample is trained to predict the next one's
    first token; a trailing pad segment (its own sequence, unlabelled) rounds the length up.
    """
    lengths = [len(ids) for ids in input_ids]
    if not lengths or min(lengths) == 0:
        raise ValueError(f"cannot pack an empty sample (lengths {lengths})")
    total = sum(lengths)
    padding = -total % pad_to_multiple_of
    segments = lengths + ([padding] if padding else [])
    packed_ids = torch.tensor([token for ids in input_ids for token in ids] + [pad_token_id] * padding, dtype=torch.long)
    packed_labels = torch.tensor([label for row in labels for label in row] + [IGNORE_INDEX] * padding, dtype=torch.long)
    boundaries = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    packed_labels[boundaries[:-1].long()] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(length) for length in segments])
    longest = max(segments)
    return {
        "input_ids": packed_ids[None],
        "labels": packed_labels[None],
        "position_ids": position_ids[None],
        # the names transformers passes down to every attention call (TransformersKwargs)
        "cu_seq_lens_q": boundaries,
        "cu_seq_lens_k": boundaries,
        "max_length_q": longest,
        "max_length_k": longest,
        # With a KV cache transformers stops looking for packed samples and lets them attend to each other.
        "use_cache": False,
    }


def check_packable(model: nn.Module) -> None:
    """Refuse, naming the reason, a model whose positions or attention a packed row would break."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = families.family_for(base)
    text_config = getattr(base.config, "text_config", base.config)
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    if family.remote_code:
        reason = "its remote code builds its own attention mask"
    elif family.prompt_style == "prefix_suffix":
        reason = "it attends bidirectionally over the image and prompt prefix"
    elif "mrope_section" in rope:
        reason = "its multimodal RoPE positions are computed per sequence from the image grids"
    else:
        return
    raise ValueError(f"padding_free=True cannot pack {family.name} ({type(base).__name__}): {reason}; train it with padding_free=False")
