"""Fine-tuning methods: how the base model is loaded and wrapped for LoRA, QLoRA (with DoRA / rsLoRA
as LoRA options) or full fine-tuning.

Precision follows the hardware: bf16 base weights where the GPU has bf16 (LoRA's own weights are
kept in fp32 by PEFT), fp32 on CPU, and an fp32 master copy for full fine-tuning. QLoRA stores the
language model's linear layers in 4-bit NF4 with double quantization and computes in bf16.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from vlmtune import families
from vlmtune.config import TrainConfig
from vlmtune.models import BaseModelRef, base_family, load_model


def load_for_training(base: BaseModelRef, config: TrainConfig) -> nn.Module:
    """The base model in the precision (and quantization) the method trains it in, wrapped with LoRA unless full."""
    model = load_base_for(base, config)
    return model if config.method == "full" else apply_lora(model, config)


def load_base_for(base: BaseModelRef, config: TrainConfig) -> nn.Module:
    """The base weights alone, in the precision (and quantization) the method trains them in."""
    if config.method == "full":
        return load_model(base, dtype=torch.float32)
    if config.method == "qlora":
        from vlmtune.speed.qlora import cast_non_quantized

        model = load_model(base, dtype=torch.bfloat16, quantization_config=qlora_quantization_config(base_family(base)))
        cast_non_quantized(model, getattr(torch, config.qlora_dtype))  # fp32: the stock recipe's numerics
        return model
    return load_model(base, dtype=base_dtype())


def checkpointing_the_model_supports(model: nn.Module, config: TrainConfig, log: Callable[[str], None]) -> TrainConfig:
    """`config` with gradient checkpointing turned off, and said so, for a model class that refuses it
    (CogVLM's and CogAgent's remote code: `supports_gradient_checkpointing = False`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not config.gradient_checkpointing or getattr(base, "supports_gradient_checkpointing", True):
        return config
    log(f"gradient checkpointing off: {type(base).__name__} does not support it (supports_gradient_checkpointing = False)")
    return dataclasses.replace(config, gradient_checkpointing=False)


def base_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def apply_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap the language model's linear layers (or `config.target_modules`) with LoRA; freeze the rest.

    The projector is trained in full with `train_projector`; `lm_head`, the embeddings and the vision
    tower stay frozen (the tower gets LoRA too only with `lora_on_vision`).
    """
    from peft import LoraConfig, get_peft_model

    target_modules = config.target_modules
    if target_modules is None:
        target_modules = families.lora_target_regex(model, include_vision=config.lora_on_vision)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    projectors = families.projector_module_names(model) if config.train_projector else []
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        target_modules=target_modules,
        modules_to_save=projectors or None,
    )
    if config.gradient_checkpointing:
        # With frozen embeddings the first checkpointed block gets inputs that need no grad. Non-reentrant
        # checkpointing (what `fit` asks for) copes, but remote code calling torch.utils.checkpoint with
        # its reentrant default (CogVLM) would silently train nothing without this.
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config)


def qlora_quantization_config(family: families.Family):
    """NF4 + double quantization, bf16 compute; the vision tower, projector and lm_head are not quantized.

    What PEFT's `prepare_model_for_kbit_training` does besides is done here instead: the weights
    left unquantized are cast to `TrainConfig.qlora_dtype` (fp32, as it casts them, by default:
    `load_base_for`), inputs that require grad (`apply_lora`) and non-reentrant gradient
    checkpointing (`fit`).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("method='qlora' needs a CUDA GPU (bitsandbytes 4-bit training); use method='lora' on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("method='qlora' needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=families.quantization_skip_modules(family),
    )
