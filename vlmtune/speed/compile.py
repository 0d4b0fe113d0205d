"""Regional torch.compile: each decoder layer compiled, one graph shared by all of them.

Compiling the layers rather than the whole model keeps compile time to one layer's (about 10-25 s
for a 7B LLaVA on an H100) and leaves the loss and PEFT's wrapper eager. Inductor fuses RMSNorm,
rotary embedding, SiLU and the FP8 activation quantization into a few kernels. `vision=True`
compiles the vision tower's encoder layers too (frozen and forward-only, so only their norms,
activations and attention glue gain).
"""

from __future__ import annotations

from torch import nn

LAYER_SUFFIXES = ("DecoderLayer",)
VISION_LAYER_SUFFIXES = ("EncoderLayer", "VisionBlock")  # CLIP / SigLIP / Idefics3; Qwen2-VL's vision blocks


def compile_decoder_layers(model: nn.Module, mode: str | None = None, vision: bool = False) -> int:
    """`module.compile(mode=mode)` on every `*DecoderLayer` (and vision encoder layer); returns how many.

    Apply after the other levers. `mode` is torch.compile's (None: its default). Switches FP8
    quantization to its plain-torch form, process-wide, for Inductor to fuse (the hand-written
    Triton kernel is for eager runs).
    """
    from vlmtune.speed import fp8_linear

    fp8_linear.use_triton_quantize = False
    suffixes = LAYER_SUFFIXES + (VISION_LAYER_SUFFIXES if vision else ())
    layers = [module for module in model.modules() if type(module).__name__.endswith(suffixes)]
    for layer in layers:
        layer.compile(mode=mode)
    return len(layers)
