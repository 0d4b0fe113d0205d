"""Frozen NF4 base linears under LoRA: the bitsandbytes weight dequantized on the fly, gradient to the input only.

bitsandbytes' `Linear4bit` does per call, in Python: its GEMM dispatch heuristic, one kernel that
dequantizes the 8-bit block scales (double quantization), an offset add, the 4-bit dequantization
and the matmul; its backward dequantizes again. At small batch on a 7B model that overhead, not
the GPU, sets the step time (H200, batch 2: 0.72 s a step for 0.18 s of kernels).
`nf4_linear` computes the same thing: eagerly through bitsandbytes' own kernels, and under
torch.compile as plain torch ops (a table lookup per nibble, a scale per block of 64, a scale
per 256 block scales), which Inductor fuses into one kernel per weight launched from the compiled
graph. Projections that read one input (q/k/v) are dequantized into one concatenated weight and
multiplied once. Through the fused LoRA path and compiled, that batch-2 step took 0.30-0.35 s.

The arithmetic is bitsandbytes' (fp32 products rounded once to bf16), so the weights are the same
values: bit for bit on CPU (`tests/test_speed.py`) and on an H200 (a 11008 x 4096 weight, compiled,
in 0.08 ms against bitsandbytes' 0.11-0.13 ms).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Nf4Weight(NamedTuple):
    """One `Linear4bit` weight as tensors (what a traced graph can take) and its static layout."""

    packed: torch.Tensor  # uint8, two 4-bit codes a byte, high nibble first
    absmax: torch.Tensor  # one scale per block of `blocksize` values: uint8 codes if nested, else fp32
    code: torch.Tensor  # the 16 NF4 values (fp32)
    absmax2: torch.Tensor | None  # nested: fp32 scale per `blocksize2` block scales
    code2: torch.Tensor | None  # nested: the 256 values of the 8-bit block-scale code (fp32)
    offset: torch.Tensor | None  # nested: added to every dequantized block scale
    layout: tuple  # (shape, dtype, blocksize, blocksize2)


def is_nf4_linear(module: nn.Module) -> bool:
    """A frozen bitsandbytes `Linear4bit` holding an NF4 weight."""
    try:
        import bitsandbytes as bnb
    except (ImportError, RuntimeError):
        return False
    if not isinstance(module, bnb.nn.Linear4bit) or module.weight.requires_grad:
        return False
    state = getattr(module.weight, "quant_state", None)
    return state is not None and state.quant_type == "nf4" and (module.bias is None or not module.bias.requires_grad)


def nf4_weight(linear: nn.Module) -> Nf4Weight:
    state = linear.weight.quant_state
    nested = state.nested
    return Nf4Weight(
        packed=linear.weight.data,
        absmax=state.absmax,
        code=state.code.to(state.absmax.device),
        absmax2=state.state2.absmax if nested else None,
        code2=state.state2.code.to(state.absmax.device) if nested else None,
        offset=state.offset if nested else None,
        layout=(tuple(state.shape), state.dtype, state.blocksize, state.state2.blocksize if nested else 0),
    )


def nf4_linear(x: torch.Tensor, weights: list[Nf4Weight], bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (tokens x in) @ [W_1; W_2; ...]^T (+ bias): the weights dequantized and concatenated by output rows."""
    layouts = tuple(weight.layout for weight in weights)
    tensors = [tensor for weight in weights for tensor in weight[:6]]
    out = _Nf4Matmul.apply(x, layouts, *tensors)
    return out if bias is None else out + bias


def dequantize_nf4(weight: Nf4Weight) -> torch.Tensor:
    """The dense weight, exactly as bitsandbytes' `dequantize_4bit` computes it."""
    return _dequantize(weight.layout, *weight[:6])


class _Nf4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized here, and again in the backward: nothing dense is kept between them."""

    @staticmethod
    def forward(ctx, x, layouts, *tensors):
        ctx.layouts = layouts
        ctx.save_for_backward(*tensors)
        return x @ _concatenated(layouts, tensors).t()

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors  # once: checkpointing lets each saved tensor be unpacked a single time
        grad_x = grad_out.to(ctx.layouts[0][1]) @ _concatenated(ctx.layouts, tensors) if ctx.needs_input_grad[0] else None
        return grad_x, None, *[None] * len(tensors)


def _concatenated(layouts: tuple, tensors: tuple) -> torch.Tensor:
    parts = [_dequantize(layout, *tensors[6 * i : 6 * i + 6]) for i, layout in enumerate(layouts)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _dequantize(layout, packed, absmax, code, absmax2, code2, offset) -> torch.Tensor:
    shape, dtype, blocksize, blocksize2 = layout
    if not torch.compiler.is_compiling():  # eager: bitsandbytes' kernels, one launch per level
        if absmax2 is not None:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, absmax2, code2, blocksize2, torch.float32) + offset
        return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, "nf4", list(shape), dtype)
    # traced: the same arithmetic as torch ops, which Inductor fuses into one kernel
    count = shape[0] * shape[1]
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:count].long()
    if absmax2 is not None:
        absmax = code2[absmax.long()] * absmax2[torch.arange(absmax.numel(), device=absmax.device) // blocksize2] + offset
    values = code[codes] * absmax[torch.arange(count, device=absmax.device) // blocksize]
    return values.view(shape).to(dtype)
