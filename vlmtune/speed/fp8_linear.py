"""FP8 matmuls for the frozen base linears under LoRA (Hopper and newer GPUs).

`convert_lora_base_to_fp8` swaps the `base_layer` of every PEFT LoRA linear for a `Float8FrozenLinear`:
the weight is quantized once to float8_e4m3 with one scale per output row (and a transposed copy with
one scale per input column, for the backward), activations and incoming gradients are quantized per
row on the fly, and both products run through `torch._scaled_mm` with bf16 output. The base weight
never needs a gradient, so the backward is one FP8 matmul (grad-input) and nothing is saved for it
but the weights. LoRA A/B stay as they were (fp32 masters, bf16 compute under autocast).

Two FP8 copies take the same memory as the one bf16 weight they replace. Rowwise scaling keeps one
outlier row or column from flattening the rest (torchao's "rowwise" recipe does the same).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
Precision = Literal["fp8", "bf16"]
# Off under torch.compile: Inductor fuses the eager quantization into one kernel by itself, and
# tracing the backward must not launch a Triton kernel on fake tensors.
use_triton_quantize = True


def convert_lora_base_to_fp8(model: nn.Module, backward: Precision = "fp8", only: Iterable[str] | None = None, forward: Precision = "fp8") -> int:
    """Replace the frozen nn.Linear base of every LoRA layer by its FP8 version; returns the count.

    `only` limits it to layers with these leaf names (e.g. the MLP's gate/up/down projections, two
    thirds of a Llama layer's matmul work, leaving attention in bf16).

    On CPU the same quantized operands are multiplied in fp32 (slow; for tests only).

    `backward="bf16"` keeps the bf16 weight for an exact grad-input (only the forward in FP8), at
    the cost of 1.5x the weight memory. `forward="bf16"` is the other way round: the forward, and so
    every activation and the loss, is exactly the bf16 one; only the grad-input matmuls of the
    backward (half the matmul work of LoRA training) run in FP8, which perturbs the LoRA gradients
    by a few percent but never the values they are computed from. Not for DoRA, whose magnitude
    needs the dense weight.
    """
    if forward == "bf16" and backward == "bf16":
        raise ValueError("FP8 in neither direction: leave the base linears as they are")
    from peft.tuners.lora import LoraLayer

    wanted = set(only) if only is not None else None
    converted = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer) or not isinstance(getattr(module, "base_layer", None), nn.Linear):
            continue
        if wanted is not None and name.rsplit(".", 1)[-1] not in wanted:
            continue
        if any(module.use_dora.values()):
            raise ValueError("DoRA needs the dense base weight: leave fp8 off with use_dora")
        if module.base_layer.weight.is_cuda and not fp8_supported():
            raise RuntimeError("FP8 matmuls need a GPU with compute capability >= 8.9 (Ada, Hopper or newer)")
        module.base_layer = Float8FrozenLinear.from_linear(module.base_layer, backward=backward, forward=forward)
        converted += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return converted


def fp8_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


class Float8FrozenLinear(nn.Module):
    """y = x W^T + b with W frozen in float8_e4m3 (rowwise scales); gradient flows to x only."""

    def __init__(self, in_features: int, out_features: int, backward: Precision = "fp8", forward: Precision = "fp8"):
        super().__init__()
        self.in_features, self.out_features, self.backward, self.forward_precision = in_features, out_features, backward, forward
        # Buffers, not parameters: frozen, moved with the module, left out of checkpoints.
        self.register_buffer("weight_fp8", None, persistent=False)  # (out, in), scale per out row
        self.register_buffer("weight_scale", None, persistent=False)  # (1, out) fp32
        self.register_buffer("weight_t_fp8", None, persistent=False)  # (in, out), scale per in column
        self.register_buffer("weight_t_scale", None, persistent=False)  # (1, in) fp32
        self.register_buffer("weight_bf16", None, persistent=False)  # only where one direction stays bf16
        self.register_buffer("bias", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backward: Precision = "fp8", forward: Precision = "fp8") -> "Float8FrozenLinear":
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"FP8 matmuls need both sizes divisible by 16, got {linear.in_features}x{linear.out_features}")
        layer = cls(linear.in_features, linear.out_features, backward, forward)
        weight = linear.weight.detach().to(torch.bfloat16)
        if forward == "fp8":
            layer.weight_fp8, scale = quantize_rowwise(weight)
            layer.weight_scale = scale.view(1, -1)
        if backward == "fp8":
            layer.weight_t_fp8, scale_t = quantize_rowwise(weight.t().contiguous())
            layer.weight_t_scale = scale_t.view(1, -1)
        if "bf16" in (forward, backward):
            layer.weight_bf16 = weight.clone()
        if linear.bias is not None:
            layer.bias = linear.bias.detach().to(torch.bfloat16).clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = _Float8FrozenMatmul.apply(x2d, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale, self.weight_bf16)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"forward={self.forward_precision}, backward={self.backward}")


class _Float8FrozenMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_fp8, weight_scale, weight_t_fp8, weight_t_scale, weight_bf16):
        ctx.save_for_backward(weight_t_fp8, weight_t_scale, weight_bf16)
        if weight_fp8 is None:
            return x @ weight_bf16.t()
        x_fp8, x_scale = quantize_rowwise(x)
        # _scaled_mm wants its second operand column-major: W^T as a view of the row-major W is.
        return scaled_mm(x_fp8, weight_fp8.t(), x_scale, weight_scale)

    @staticmethod
    def backward(ctx, grad_out):
        weight_t_fp8, weight_t_scale, weight_bf16 = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        grad_out = grad_out.contiguous().to(torch.bfloat16)
        if weight_t_fp8 is None:
            return grad_out @ weight_bf16, None, None, None, None, None
        grad_fp8, grad_scale = quantize_rowwise(grad_out)
        return scaled_mm(grad_fp8, weight_t_fp8.t(), grad_scale, weight_t_scale), None, None, None, None, None


def scaled_mm(a_fp8: torch.Tensor, b_fp8_colmajor: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale) in bf16; a_scale is (M, 1), b_scale is (1, N), both fp32."""
    if a_fp8.is_cuda:
        return torch._scaled_mm(a_fp8, b_fp8_colmajor, scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16)
    # CPU reference (tests, --tiny): same quantized operands, dequantized and multiplied in fp32.
    return ((a_fp8.float() * a_scale) @ (b_fp8_colmajor.float() * b_scale)).to(torch.bfloat16)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor -> (float8_e4m3 tensor, fp32 scale of shape (rows, 1)) with x ~= q * scale."""
    if x.is_cuda and _triton_quantize is not None and use_triton_quantize and not torch.compiler.is_compiling():
        return _triton_quantize(x)
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _build_triton_quantize():
    """One pass per row (read bf16, write fp8 + scale) instead of the four of the eager version."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def rowwise_kernel(x_ptr, q_ptr, scale_ptr, n_cols, x_stride, q_stride, BLOCK: tl.constexpr, FMAX: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
        q = tl.clamp(x * (FMAX / amax), -FMAX, FMAX)
        tl.store(q_ptr + row * q_stride + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, amax / FMAX)

    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.stride(1) != 1:
            x = x.contiguous()
        rows, cols = x.shape
        q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(cols)
        rowwise_kernel[(rows,)](x, q, scale, cols, x.stride(0), q.stride(0), BLOCK=block, FMAX=FP8_MAX, num_warps=min(16, max(4, block // 1024)))
        return q, scale

    return quantize


_triton_quantize = _build_triton_quantize() if torch.cuda.is_available() else None
