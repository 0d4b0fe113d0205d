"""The speed levers a `TrainConfig` switches on, applied in the one order that composes.

Each lever and what it buys on one H100 is in benchmarks/NOTES.md; `benchmarks/train_throughput.py`
measures them against the stock recipe in one invocation.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmtune.config import TrainConfig

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def apply_speed_levers(model: nn.Module, config: TrainConfig) -> dict[str, int]:
    """FP8 base linears, fused LoRA linears, bf16 LoRA inputs, compiled decoder layers, then the vision
    tower's CUDA graphs; returns counts."""
    applied = {}
    bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if config.method != "full":
        if config.fp8_base != "off":
            from vlmtune.speed.fp8_linear import convert_lora_base_to_fp8

            applied["fp8_linears"] = convert_lora_base_to_fp8(
                model,
                only=MLP_PROJECTIONS if config.fp8_base == "mlp" else None,
                forward="bf16" if config.fp8_base == "backward" else "fp8",  # "backward": FP8 grad-input only, bf16 loss
            )
        if config.fused_lora and bf16_gpu:  # its kernels compute in bf16: an fp32 CPU run keeps PEFT's own path
            from vlmtune.speed.fused_lora import fuse_lora_linears

            # only layers without dropout or DoRA qualify
            applied["fused_lora_linears"] = fuse_lora_linears(model, share_inputs=config.fuse_shared_inputs)
        if config.bf16_lora_inputs and bf16_gpu:
            from vlmtune.speed.lora_inputs import keep_lora_inputs_bf16

            # under bf16 autocast PEFT's fp32 cast of every LoRA input is a round trip that changes nothing
            applied["bf16_lora_inputs"] = keep_lora_inputs_bf16(model)
    if config.compile:
        from vlmtune.speed.compile import compile_decoder_layers

        # the vision tower's layers too when it is replayed from graphs: compiled alone, it only moved
        # the wait to the CPU (benchmarks/NOTES.md)
        applied["compiled_layers"] = compile_decoder_layers(model, vision=config.vision_cuda_graphs and torch.cuda.is_available())
    if config.vision_cuda_graphs and torch.cuda.is_available():
        from vlmtune.speed.vision_graphs import graph_frozen_vision_towers

        applied["vision_towers_graphed"] = graph_frozen_vision_towers(model)
    return applied
