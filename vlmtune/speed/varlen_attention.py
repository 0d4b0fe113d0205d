"""Attention for packed rows (vlmtune.packing): each sample attends only to itself, at its own cost.

Registered with transformers as the `vlmtune_varlen` attention implementation of the language model.
With `cu_seq_lens_q` in the call (a packed batch) on CUDA it runs PyTorch's variable-length flash
kernel (`torch.nn.attention.varlen`, torch >= 2.9), whose work is the sum of the samples' squared
lengths, not the packed row's. Everywhere else it is transformers' SDPA with the mask transformers
builds: from `position_ids` it finds the packed samples itself and masks across them, so CPU runs
and unpacked batches stay exact, only without the saving.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

NAME = "vlmtune_varlen"


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if cu_seq_lens_q is None or not query.is_cuda or VARLEN_ATTN is None or dropout > 0 or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    heads, dim = query.shape[1], query.shape[3]
    groups = heads // key.shape[1]
    # (1, heads, tokens, dim) -> (tokens, heads, dim), the varlen layout
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, repeat_kv(key, groups), repeat_kv(value, groups)))
    cu_seq_lens = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
    out = VARLEN_ATTN(q, k, v, cu_seq_lens, cu_seq_lens, int(max_length_q), int(max_length_q), scale=scaling, **_CAUSAL)
    return out.view(1, -1, heads, dim), None


def register() -> None:
    """Make `NAME` an attention implementation transformers can dispatch to (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the SDPA fallback's mask, packed samples found from position_ids


@contextmanager
def packed_attention(model: nn.Module) -> Iterator[None]:
    """The language model attends through `NAME` inside the block; its own implementation is restored after."""
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # Only the language model packs: a vision tower sees whole images, batched as always.
    text_key = "text_config" if "text_config" in getattr(base.config, "sub_configs", {}) else ""
    text_config = getattr(base.config, text_key) if text_key else base.config
    previous = text_config._attn_implementation
    base.set_attn_implementation({text_key: NAME} if text_key else NAME)
    try:
        yield
    finally:
        base.set_attn_implementation({text_key: previous} if text_key else previous)


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


VARLEN_ATTN = _varlen_attn()
# torch 2.9-2.10 take `is_causal`; later releases express causality as a (-1, 0) window
_CAUSAL = {"is_causal": True} if VARLEN_ATTN and "is_causal" in inspect.signature(VARLEN_ATTN).parameters else {"window_size": (-1, 0)}
