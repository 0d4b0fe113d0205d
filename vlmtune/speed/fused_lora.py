"""One autograd function per LoRA linear (or per group of LoRA linears that read the same input).

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate ops: under autocast that
is a cast of each fp32 adapter weight, a scale pass and an add pass over the (tokens x out) output,
and in the backward as many passes again plus an accumulation into the input gradient. On a 7B
model at batch 8 those elementwise passes cost about as much GPU time as the base matmuls in FP8.
Here the LoRA up-projection is added to the base output in one pass that reads it and writes the
result (`low_rank_add.add_low_rank`, a Triton kernel on GPU; `addmm` on CPU or with
`low_rank_kernel=False`), and the backward adds the LoRA share of the input gradient the same way.

Projections that read one input (an attention's q/k/v, a gated MLP's gate/up) can go further as a
group: one base matmul over their concatenated weights, one down-projection over their stacked A's,
and in the backward one bf16 grad-input matmul instead of one per projection plus their sum. (With
FP8 grad-input weights the backward keeps one FP8 matmul per member, each gradient quantized with its
own scales: one scale per token across q/k/v rounded the smaller members' gradients away and moved
the loss curve on the H100 benchmark.) The first member called with an input computes the group and
the others pick their outputs up (Llama-style attention and MLP call them back to back on the same
tensor). A member called with another input than the group's computes the group again, so a model
that feeds them different tensors stays correct, only slower.

Numerically it is the stock computation with fewer bf16 roundings (the sum is taken in the matmul's
fp32 accumulator). It covers the plain case: one adapter, no dropout, no DoRA, a frozen nn.Linear,
`Float8FrozenLinear` or bitsandbytes NF4 base (QLoRA: `nf4.nf4_linear` computes the base output,
dequantizing the members' weights into one matrix); other layers keep PEFT's forward.
"""

from __future__ import annotations

import types
from itertools import accumulate

import torch
from torch import nn

from vlmtune.speed.fp8_linear import Float8FrozenLinear, quantize_rowwise, scaled_mm
from vlmtune.speed.low_rank_add import add_low_rank, addmm_low_rank
from vlmtune.speed.nf4 import is_nf4_linear, nf4_linear, nf4_weight

COMPUTE_DTYPE = torch.bfloat16
LORA_INPUTS = 8  # _FusedLoraLinears.apply's arguments before the members' A and B weights
# Leaf names of projections that read the same input, per parent module (Llama, Mistral, Qwen2,
# Gemma, GLM-4 and their VLM wrappers all name them so).
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_lora_linears(model: nn.Module, share_inputs: bool = True, low_rank_kernel: bool = True) -> int:
    """Route every eligible PEFT LoRA linear through `_FusedLoraLinears`; returns how many were fused.

    `share_inputs` groups the projections of `SHARED_INPUT_GROUPS` that are all eligible and have
    concatenable bases (their base weights are then stored once, concatenated). `low_rank_kernel`
    adds the rank-r products with `add_low_rank` (its Triton kernel on GPU) instead of cuBLAS `addmm`.
    """
    eligible = [module for module in model.modules() if type(module) in _lora_linear_types() and _eligible(module)]
    ungrouped = {id(module) for module in eligible}
    groups = []
    if share_inputs:
        for parent in model.modules():
            for leaves in SHARED_INPUT_GROUPS:
                members = [getattr(parent, leaf, None) for leaf in leaves]
                if all(id(member) in ungrouped for member in members) and _concatenable(members):
                    groups.append(members)
                    ungrouped -= {id(member) for member in members}
    groups += [[module] for module in eligible if id(module) in ungrouped]
    for members in groups:
        LoraGroup(members, low_rank_kernel)
    return len(eligible)


def _lora_linear_types() -> tuple[type, ...]:
    """PEFT's LoRA wrapper of a plain linear, and of a bitsandbytes 4-bit linear where bitsandbytes is there."""
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except (ImportError, RuntimeError):
        return (LoraLinear,)
    return (LoraLinear, LoraLinear4bit)


def _eligible(layer) -> bool:
    base = layer.base_layer
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1 or any(layer.use_dora.values()) or layer.merged:
        return False
    if not isinstance(layer.lora_dropout[adapters[0]], nn.Identity):
        return False
    if isinstance(base, Float8FrozenLinear) or is_nf4_linear(base):
        return True
    return type(base) is nn.Linear and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)


def _concatenable(layers) -> bool:
    bases = [layer.base_layer for layer in layers]
    if len({base.in_features for base in bases}) != 1 or len({base.bias is None for base in bases}) != 1:
        return False
    if all(type(base) is nn.Linear for base in bases):
        return len({(base.weight.dtype, base.weight.device) for base in bases}) == 1
    if all(isinstance(base, Float8FrozenLinear) for base in bases):
        return len({(base.forward_precision, base.backward) for base in bases}) == 1
    return all(is_nf4_linear(base) for base in bases)  # dequantized into one matrix on every call


class LoraGroup:
    """LoRA linears that read one input, computed by one `_FusedLoraLinears` call."""

    def __init__(self, layers: list[nn.Module], low_rank_kernel: bool = True):
        self.layers, self.low_rank_kernel = layers, low_rank_kernel
        self.adapters = [next(iter(layer.lora_A.keys())) for layer in layers]
        self.out_features = [layer.base_layer.out_features for layer in layers]
        # NF4 bases stay with their members: they are dequantized together on each call
        self.nf4 = is_nf4_linear(layers[0].base_layer)
        if self.nf4:
            self.nf4_weights = [nf4_weight(layer.base_layer) for layer in layers]
            biases = [layer.base_layer.bias for layer in layers]
            self.nf4_bias = None if biases[0] is None else torch.cat([bias.detach() for bias in biases]).to(COMPUTE_DTYPE)
        if self.nf4 or len(layers) == 1:
            self.base = layers[0].base_layer
        else:
            self.base = _concatenated_base([layer.base_layer for layer in layers])
        self.pending: list | None = None  # [input, outputs, members still to collect]
        start = 0
        for index, layer in enumerate(layers):
            if len(layers) > 1 and not self.nf4:  # the members' own weights go: the concatenated copy replaces them
                layer.base_layer = SharedBaseSlice(self.base, start, start + self.out_features[index], layer.base_layer)
                start += self.out_features[index]
            layer.lora_group, layer.lora_group_index = self, index
            layer.forward = types.MethodType(_fused_forward, layer)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        base, base_out = self.base, None
        if self.nf4:
            base_out = nf4_linear(x2d, self.nf4_weights, self.nf4_bias)
            base_tensors = (None, None, None, None, None)
        elif isinstance(base, Float8FrozenLinear):
            base_tensors = (None, base.bias, base.weight_fp8, base.weight_scale, base.weight_bf16)
        else:
            base_tensors = (base.weight, base.bias, None, None, None)
        lora, backward_fp8 = [], []
        for layer, adapter in zip(self.layers, self.adapters):
            lora += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
            member_base = layer.base_layer  # its own FP8 grad-input weight, whether grouped or not
            backward_fp8 += [getattr(member_base, "weight_t_fp8", None), getattr(member_base, "weight_t_scale", None)]
        scalings = tuple(float(layer.scaling[adapter]) for layer, adapter in zip(self.layers, self.adapters))
        # The dtype stock gives: autocast's bf16 for a linear; for NF4 the input's, as bitsandbytes casts its
        # output back, so QLoRA's fp32 residual stream (stock numerics) gets fp32 projections (bf16 ones
        # moved its loss curve out of the seed noise on the H200: benchmarks/NOTES.md)
        out_dtype = x.dtype if self.nf4 else COMPUTE_DTYPE
        static = (scalings, tuple(self.out_features), self.low_rank_kernel, out_dtype)
        outputs = _FusedLoraLinears.apply(x2d, static, base_out, *base_tensors, *lora, *backward_fp8)
        return [out.view(*shape[:-1], out.shape[-1]) for out in outputs]

    def output_for(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output on `x`: computed with the whole group once, then handed out."""
        if len(self.layers) == 1:
            return self(x)[0]
        pending = self.pending
        if pending is None or pending[0] is not x:
            pending = self.pending = [x, self(x), len(self.layers)]
        pending[2] -= 1
        if pending[2] == 0:
            self.pending = None  # nothing outlives the call that used it
        return pending[1][index]


class SharedBaseSlice(nn.Module):
    """A grouped member's base layer: its rows of the group's concatenated base.

    An FP8 grad-input weight stays the member's own (`weight_t_fp8`, with its own per-input scales):
    the backward quantizes each member's incoming gradient with its own per-token scale, because one
    scale across q/k/v (or gate/up) rounds the smaller members' gradients away and changed the loss
    curve on the H100 benchmark (max |diff| 0.20 against a seed noise of 0.10; with per-member scales,
    in another run, 0.105 against 0.138).
    """

    def __init__(self, shared: nn.Module, start: int, stop: int, own: nn.Module):
        super().__init__()
        self.shared, self.start, self.stop = shared, start, stop
        self.in_features, self.out_features = shared.in_features, stop - start
        self.register_buffer("weight_t_fp8", getattr(own, "weight_t_fp8", None), persistent=False)
        self.register_buffer("weight_t_scale", getattr(own, "weight_t_scale", None), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only with the adapter disabled (the base model's own output): correct, not fast.
        return self.shared(x)[..., self.start : self.stop]


def _concatenated_base(bases: list[nn.Module]) -> nn.Module:
    """One frozen linear whose output rows are the bases' outputs, one after another.

    Concatenating output rows is exact for every weight the forward uses (FP8 weights carry one scale
    per output row); the FP8 grad-input weights stay with their members (`SharedBaseSlice`).
    """
    bias = torch.cat([base.bias.detach() for base in bases]) if bases[0].bias is not None else None
    first = bases[0]
    if isinstance(first, Float8FrozenLinear):
        layer = Float8FrozenLinear(first.in_features, sum(base.out_features for base in bases), first.backward, first.forward_precision)
        if first.weight_fp8 is not None:
            layer.weight_fp8 = torch.cat([base.weight_fp8 for base in bases])
            layer.weight_scale = torch.cat([base.weight_scale for base in bases], dim=1)
        if first.weight_bf16 is not None:
            layer.weight_bf16 = torch.cat([base.weight_bf16 for base in bases])
        layer.bias = bias
        return layer
    weight = torch.cat([base.weight.detach() for base in bases])
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.disable_adapters or self.lora_group.adapters[self.lora_group_index] not in self.active_adapters:
        return self.base_layer(x)
    return self.lora_group.output_for(self.lora_group_index, x)


class _FusedLoraLinears(torch.autograd.Function):
    """Outputs `base_i(x) + scaling_i * x A_i^T B_i^T` for each member i; the base is their concatenation.

    `base_out`, where given, is the base's output computed outside (an NF4 base, `nf4.nf4_linear`):
    its gradient goes back to that function, which computes the base's share of the input gradient.
    Each member's output is a tensor of its own (not a view of the group's), so a member kept for the
    backward (attention keeps v) does not keep its siblings' outputs alive.
    """

    @staticmethod
    def forward(ctx, x, static, base_out, weight, bias, w_fp8, w_scale, w_bf16, *lora_and_backward_fp8):
        scalings, out_features, low_rank_kernel, out_dtype = static
        members = len(scalings)
        lora, backward_fp8 = lora_and_backward_fp8[: 2 * members], lora_and_backward_fp8[2 * members :]
        a_list = [a.to(COMPUTE_DTYPE) for a in lora[0::2]]
        b_list = [b.to(COMPUTE_DTYPE) for b in lora[1::2]]
        a = a_list[0] if len(a_list) == 1 else torch.cat(a_list)
        h = x @ a.t()  # (tokens, total rank): every member's down-projection in one matmul
        ctx.external_base = base_out is not None
        if base_out is None:
            base_out = _base_output(x, weight, bias, w_fp8, w_scale, w_bf16)
        rows, cols = _offsets(a_list), _offsets(out_features)
        add = add_low_rank if low_rank_kernel else addmm_low_rank
        outputs = tuple(
            add(_columns(base_out, cols, i), h[:, rows[i] : rows[i + 1]], b, s, out_dtype) for i, (b, s) in enumerate(zip(b_list, scalings))
        )
        ctx.scalings, ctx.rows, ctx.cols, ctx.low_rank_kernel = scalings, rows, cols, low_rank_kernel
        ctx.dtypes = [t.dtype for t in lora]
        ctx.save_for_backward(x, h, a, weight, w_bf16, *b_list, *backward_fp8)
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        x, h, a, weight, w_bf16, *rest = ctx.saved_tensors
        members = len(ctx.scalings)
        b_list, backward_fp8 = rest[:members], rest[members:]
        rows, cols = ctx.rows, ctx.cols
        # a member whose output went unused gets a zero gradient
        grads = [
            (g if g is not None else x.new_zeros(x.shape[0], cols[i + 1] - cols[i])).contiguous().to(COMPUTE_DTYPE)
            for i, g in enumerate(grad_outputs)
        ]
        grad_h_list = [(g @ b) * s for g, b, s in zip(grads, b_list, ctx.scalings)]
        grad_h = grad_h_list[0] if len(grads) == 1 else torch.cat(grad_h_list, dim=1)  # (tokens, total rank)
        grad_lora: list[torch.Tensor | None] = [None] * (2 * len(grads))
        if any(ctx.needs_input_grad[LORA_INPUTS : LORA_INPUTS + 2 * members]):
            grad_a = grad_h.t() @ x
            for i, (g, s) in enumerate(zip(grads, ctx.scalings)):
                grad_lora[2 * i] = grad_a[rows[i] : rows[i + 1]].to(ctx.dtypes[2 * i])
                grad_lora[2 * i + 1] = ((g.t() @ h[:, rows[i] : rows[i + 1]]) * s).to(ctx.dtypes[2 * i + 1])
        grad_x = grad_base_out = None
        if ctx.external_base:
            grad_base_out = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
            if ctx.needs_input_grad[0]:
                grad_x = grad_h @ a  # the LoRA share; the base's comes from the base's own function
        elif ctx.needs_input_grad[0]:
            if backward_fp8[0] is not None:  # one FP8 matmul per member, each gradient with its own scales
                for i, g in enumerate(grads):
                    grad_fp8, grad_scale = quantize_rowwise(g)
                    part = scaled_mm(grad_fp8, backward_fp8[2 * i].t(), grad_scale, backward_fp8[2 * i + 1])
                    grad_x = part if grad_x is None else grad_x + part
            else:  # one matmul over the concatenated gradient and weight
                grad_out = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
                grad_x = grad_out @ (w_bf16 if w_bf16 is not None else weight.to(COMPUTE_DTYPE))
            grad_x = (add_low_rank if ctx.low_rank_kernel else addmm_low_rank)(grad_x, grad_h, a.t(), 1.0)
        return (grad_x, None, grad_base_out, *[None] * 5, *grad_lora, *[None] * (2 * members))


def _base_output(x, weight, bias, w_fp8, w_scale, w_bf16) -> torch.Tensor:
    if w_fp8 is not None:
        x_fp8, x_scale = quantize_rowwise(x)
        out = scaled_mm(x_fp8, w_fp8.t(), x_scale, w_scale)
    elif w_bf16 is not None:  # FP8 on the backward only: the forward is the exact bf16 one
        out = x @ w_bf16.t()
    else:
        out = x @ weight.to(COMPUTE_DTYPE).t()
    return out if bias is None else out + bias.to(COMPUTE_DTYPE)



def _offsets(parts) -> list[int]:
    """Start offsets of consecutive parts (tensors by their rows, or sizes), and the total at the end."""
    return [0, *accumulate(part.shape[0] if isinstance(part, torch.Tensor) else part for part in parts)]


def _columns(tensor: torch.Tensor, offsets: list[int], index: int) -> torch.Tensor:
    return tensor if len(offsets) == 2 else tensor[:, offsets[index] : offsets[index + 1]]
