"""Keep LoRA inputs in the compute dtype instead of PEFT's cast to the adapter's fp32 dtype.

PEFT keeps adapter weights in fp32 when the base is bf16 (`autocast_adapter_dtype=True`), and each
LoRA layer casts its input to that dtype before `lora_A`: a full fp32 copy of every layer input. Under
bf16 autocast the matmul casts it straight back to bf16, so the copy changes no number (bf16 -> fp32
-> bf16 is exact); it only costs memory traffic. The fp32 adapter weights themselves stay, so the
optimizer still updates fp32 masters.
"""

from __future__ import annotations

from torch import nn


def keep_lora_inputs_bf16(model: nn.Module) -> int:
    """Disable PEFT's input cast on every LoRA layer; returns how many layers were changed."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed
