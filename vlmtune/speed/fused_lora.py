"""One autograd function per LoRA linear: base matmul, LoRA down/up and the sum, with a hand-written backward.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate ops: under autocast that
is a cast of each fp32 adapter weight, a scale pass and an add pass over the (tokens x out) output,
and in the backward as many passes again plus an accumulation into the input gradient. On a 7B
model at batch 8 those elementwise passes cost about as much GPU time as the base matmuls in FP8.
Here the LoRA up-projection lands in the base output through the matmul's epilogue
(`addmm(base_out, h, B^T, alpha=scaling)`), and the backward accumulates the LoRA input gradient the
same way, so no (tokens x features) tensor is read or written beyond what the matmuls need.

Numerically it is the stock computation with fewer bf16 roundings (the sum is taken in the matmul's
fp32 accumulator). It covers the plain case: one adapter, no dropout, no DoRA, a frozen nn.Linear or
`Float8FrozenLinear` base; other layers keep PEFT's forward.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from vlmtune.speed.fp8_linear import Float8FrozenLinear, quantize_rowwise, scaled_mm

COMPUTE_DTYPE = torch.bfloat16


def fuse_lora_linears(model: nn.Module) -> int:
    """Route every eligible PEFT LoRA linear through `_FusedLoraLinear`; returns how many were fused."""
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear and _eligible(module):
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused


def _eligible(layer) -> bool:
    base = layer.base_layer
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1 or any(layer.use_dora.values()) or layer.merged:
        return False
    if not isinstance(layer.lora_dropout[adapters[0]], nn.Identity):
        return False
    if isinstance(base, Float8FrozenLinear):
        return True
    return type(base) is nn.Linear and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = next(iter(self.lora_A.keys()))
    if self.disable_adapters or adapter not in self.active_adapters:
        return self.base_layer(x)
    base = self.base_layer
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
    if isinstance(base, Float8FrozenLinear):
        base_tensors = (None, base.bias, base.weight_fp8, base.weight_scale, base.weight_t_fp8, base.weight_t_scale, base.weight_bf16)
    else:
        base_tensors = (base.weight, base.bias, None, None, None, None, None)
    out = _FusedLoraLinear.apply(x2d, self.lora_A[adapter].weight, self.lora_B[adapter].weight, float(self.scaling[adapter]), *base_tensors)
    return out.view(*shape[:-1], out.shape[-1])


class _FusedLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, weight, bias, w_fp8, w_scale, wt_fp8, wt_scale, w_bf16):
        a, b = lora_a.to(COMPUTE_DTYPE), lora_b.to(COMPUTE_DTYPE)
        h = x @ a.t()  # (tokens, r)
        if w_fp8 is not None:
            x_fp8, x_scale = quantize_rowwise(x)
            base_out = scaled_mm(x_fp8, w_fp8.t(), x_scale, w_scale)
        elif w_bf16 is not None:  # FP8 on the backward only: the forward is the exact bf16 one
            base_out = x @ w_bf16.t()
        else:
            base_out = x @ weight.to(COMPUTE_DTYPE).t()
        if bias is not None:
            base_out = base_out + bias.to(COMPUTE_DTYPE)
        out = torch.addmm(base_out, h, b.t(), alpha=scaling)
        ctx.scaling = scaling
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(x, h, a, b, weight, wt_fp8, wt_scale, w_bf16)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, h, a, b, weight, wt_fp8, wt_scale, w_bf16 = ctx.saved_tensors
        grad_out = grad_out.contiguous().to(COMPUTE_DTYPE)
        grad_h = (grad_out @ b) * ctx.scaling  # (tokens, r)
        grad_b = (grad_out.t() @ h) * ctx.scaling if ctx.needs_input_grad[2] else None
        grad_a = grad_h.t() @ x if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            if wt_fp8 is not None:
                grad_fp8, grad_scale = quantize_rowwise(grad_out)
                grad_x = scaled_mm(grad_fp8, wt_fp8.t(), grad_scale, wt_scale)
            elif w_bf16 is not None:
                grad_x = grad_out @ w_bf16
            else:
                grad_x = grad_out @ weight.to(COMPUTE_DTYPE)
            grad_x = grad_x.addmm_(grad_h, a)
        grad_a = grad_a.to(ctx.dtypes[0]) if grad_a is not None else None
        grad_b = grad_b.to(ctx.dtypes[1]) if grad_b is not None else None
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None, None
