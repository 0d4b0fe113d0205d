"""Causal-LM loss computed only where it counts: lm_head and cross-entropy on the answer tokens.

A VQA sample of LLaVA-1.5 is 576 image tokens, a prompt and a short answer; only the answer carries
labels. The stock forward still projects every position onto the full vocabulary (B x T x 32k
logits, upcast to fp32 for the loss, and their gradient), then throws all but a few rows away.
`answer_loss` runs the backbone alone, gathers the hidden states whose next-token label is not
ignored, and projects only those, in chunks that are recomputed in the backward so a long answer
never holds a full logits tensor. The value is the same mean over labelled tokens as Hugging Face's
`ForCausalLMLoss`, so it is a drop-in replacement for `model(**batch).loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 2048) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of `batch` (a collator's output)."""
    backbone, head = backbone_and_head(model)
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key not in ("labels", "use_cache")}
    hidden = backbone(**inputs, use_cache=False, return_dict=True).last_hidden_state
    targets = labels[:, 1:]
    positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    answer_hidden = hidden[:, :-1][positions]
    answer_targets = targets[positions]
    count = answer_targets.numel()
    if count == 0:
        return hidden.sum() * 0.0  # keeps the graph (and DDP) intact on an all-prompt batch
    if count <= chunk_tokens:
        return _chunk_cross_entropy(answer_hidden, head.weight, head.bias, answer_targets) / count
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(
            _chunk_cross_entropy, answer_hidden[start:end], head.weight, head.bias, answer_targets[start:end], use_reentrant=False
        )
    return total / count


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The `...ForConditionalGeneration`'s inner model (vision + projector + LM) and its lm_head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or not isinstance(head, nn.Linear):
        raise ValueError(f"answer_loss needs a model with .model and a linear lm_head; {type(base).__name__} has neither")
    text_config = getattr(base.config, "text_config", base.config)
    if getattr(text_config, "final_logit_softcapping", None) or getattr(text_config, "logit_scale", None):
        raise ValueError(f"{type(base).__name__} transforms its logits after lm_head; use the model's own loss")
    return backbone, head


def _chunk_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()  # fp32 softmax, as the stock loss upcasts
    return F.cross_entropy(logits, targets, reduction="sum")
