"""Regional torch.compile: each decoder layer compiled, one graph shared by all of them.

Compiling the layers rather than the whole model keeps compile time to one layer's (about 10-25 s
for a 7B LLaVA on an H100) and leaves the vision tower, the loss and PEFT's wrapper eager. Inductor
fuses RMSNorm, rotary embedding, SiLU and the FP8 activation quantization into a few kernels.
"""

from __future__ import annotations

from torch import nn


def compile_decoder_layers(model: nn.Module, mode: str | None = None) -> int:
    """`module.compile(mode=mode)` on every `*DecoderLayer`; returns how many. Apply after the other levers.

    `mode` is torch.compile's (None: its default). Switches FP8 quantization to its plain-torch form,
    process-wide, for Inductor to fuse (the hand-written Triton kernel is for eager runs).
    """
    from vlmtune.speed import fp8_linear

    fp8_linear.use_triton_quantize = False
    layers = [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)
