"""QLoRA: nf4 + double quantization + bf16 compute, the other weights in fp32 (as the stock recipe) or bf16.

PEFT's `prepare_model_for_kbit_training` casts every weight that is not 4-bit (embeddings, norms,
lm_head, anything skipped by the quantizer) to fp32, so the residual stream runs in fp32 while the
matmuls run in bf16 under autocast. `prepare_qlora` does the same by default, so that a QLoRA run
with vlmtune's speed levers learns what the stock recipe learns (`benchmarks/NOTES.md`: with bf16
norms the loss curve left the seed noise); `dtype=torch.bfloat16` keeps those weights in bf16 for a
little less memory. It freezes the base and turns on non-reentrant checkpointing, which needs no
`enable_input_require_grads` hack (that is only for the reentrant variant, whose recompute ignores
inputs without grad). On the 7B benchmark the stock recipe peaked at 10.1 GiB at batch 8, not the
57 GiB reported for it: the memory goes to activations, which checkpointing bounds.

Use `nf4_quantization_config()` with `from_pretrained(..., quantization_config=...)` for real weights,
or `quantize_to_nf4` for a model already in memory (the benchmark's random 7B model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


def nf4_quantization_config(skip_modules: Iterable[str] = ("lm_head",)):
    """The QLoRA recipe's BitsAndBytesConfig: nf4, double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(skip_modules),
    )


def quantize_to_nf4(model: nn.Module, skip_modules: Iterable[str] = ("lm_head",), only_under: str | None = None) -> int:
    """Replace every nn.Linear (except `skip_modules`, matched by leaf name) by a bitsandbytes nf4 Linear4bit.

    `only_under` limits it to modules whose dotted name contains that part (e.g. "language_model":
    the frozen vision tower runs forward-only and costs 0.6 GB in bf16, but quantized it dequantizes
    every weight on every step).

    Quantizes where the weights are (a CUDA model quantizes on the GPU). Marks the model
    `is_loaded_in_4bit` as `from_pretrained` would, so PEFT treats it as a k-bit model. Returns the count.
    """
    import bitsandbytes as bnb

    skip = set(skip_modules)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, bnb.nn.Linear4bit)
        and name.rsplit(".", 1)[-1] not in skip
        and (only_under is None or only_under in name.split("."))
    ]
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,  # double quantization of the absmax statistics
            quant_type="nf4",
            device="meta",
        )
        weight = bnb.nn.Params4bit(linear.weight.data.to(torch.bfloat16), requires_grad=False, compress_statistics=True, quant_type="nf4")
        quantized.weight = weight.to(linear.weight.device)  # .to() on a not-yet-quantized Params4bit quantizes it
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to(torch.bfloat16), requires_grad=False)
        setattr(parent, leaf, quantized)
        del linear
    model.is_loaded_in_4bit = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(targets)


def cast_non_quantized(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every floating-point weight that is not 4-bit to `dtype` (in place); returns how many changed."""
    changed = 0
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype and param.__class__.__name__ != "Params4bit":
            param.data = param.data.to(dtype)
            changed += 1
    return changed


def prepare_qlora(
    model: nn.Module, gradient_checkpointing: bool = True, checkpoint_every: int = 1, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Freeze the k-bit base, cast its non-quantized weights to `dtype`, and enable non-reentrant checkpointing.

    `checkpoint_every=k` checkpoints every k-th decoder layer only (`checkpointing.enable_checkpointing`).
    """
    from vlmtune.speed.checkpointing import enable_checkpointing

    for param in model.parameters():
        param.requires_grad_(False)
    cast_non_quantized(model, dtype)
    if gradient_checkpointing:
        enable_checkpointing(model, every=checkpoint_every)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return model
