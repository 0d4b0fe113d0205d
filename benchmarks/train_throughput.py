"""Training throughput and peak memory: the stock LoRA/QLoRA recipe against vlmtune's speed levers.

Builds a LLaVA-1.5-7B-shaped model from its config with random weights (nothing downloaded), feeds
random VQA-shaped batches (576 image tokens + 64 text tokens, labels on the last 16), and times
training steps of each variant in one process, so every ratio is against the stock row of the same
run on the same GPU. A loss-curve check then trains stock and ours on identical batches.

    python benchmarks/train_throughput.py                      # default rows on one GPU
    python benchmarks/train_throughput.py --variants stock,ours_fp8 --steps 10
    python benchmarks/train_throughput.py --tiny               # a tiny LLaVA on CPU: a sanity check only
    python benchmarks/train_throughput.py --gpus 2             # DDP scaling: tokens/s per GPU on 2 GPUs vs 1
    python benchmarks/train_throughput.py --varlen 32,512 --variants stock,ours_fp8bwd_compile,ours_fp8bwd_compile_packed

`--varlen MIN,MAX` draws each sample's text length from MIN..MAX: padded variants pad a batch to
its longest sample (stock collation), `padding_free` ones pack it into one row (vlmtune.packing).
Tokens/s counts real tokens only, so padding is work that earns nothing.

Stock: bf16 weights, bf16 autocast, torch AdamW, PEFT LoRA r=16 (alpha 32, no dropout), SDPA
attention, `model(**batch).loss`. QLoRA stock: nf4 + double quantization + bf16 compute, then
`prepare_model_for_kbit_training` (its default checkpointing).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout

from vlmtune.speed.answer_loss import answer_loss  # noqa: E402
from vlmtune.speed.checkpointing import enable_checkpointing  # noqa: E402
from vlmtune.speed.compile import compile_decoder_layers  # noqa: E402
from vlmtune.speed.fused_lora import fuse_lora_linears  # noqa: E402
from vlmtune.speed.fp8_linear import convert_lora_base_to_fp8  # noqa: E402
from vlmtune.speed.lora_inputs import keep_lora_inputs_bf16  # noqa: E402
from vlmtune.packing import pack_sequences  # noqa: E402
from vlmtune.speed import varlen_attention  # noqa: E402
from vlmtune.speed.qlora import bitsandbytes_available, prepare_qlora, quantize_to_nf4  # noqa: E402
from vlmtune.speed.vision_graphs import graph_frozen_vision_towers  # noqa: E402

IGNORE_INDEX = -100
MATMUL_CEILING_TFLOPS = 798.0  # bf16 8192^3 matmul measured on this workplace's H100 (KINDS.md)


@dataclass(frozen=True)
class Variant:
    description: str
    batch: int = 8
    targets: Literal["all", "qv"] = "all"
    quant: Literal["none", "nf4"] = "none"
    # "kbit": peft.prepare_model_for_kbit_training (fp32 upcast, its default checkpointing);
    # "nonreentrant": model.gradient_checkpointing_enable(use_reentrant=False) (with nf4: vlmtune.speed.qlora.prepare_qlora)
    checkpointing: Literal["none", "kbit", "nonreentrant"] = "none"
    answer_loss: bool = False
    fp8: bool = False
    fp8_backward: Literal["fp8", "bf16"] = "fp8"  # grad-input through FP8 or through a kept bf16 weight
    fp8_forward: Literal["fp8", "bf16"] = "fp8"  # the forward through FP8 or through the bf16 weight (exact loss)
    fp8_mlp_only: bool = False  # FP8 for gate/up/down only; attention projections stay bf16
    fused_adamw: bool = False
    bf16_lora_inputs: bool = False
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode for the decoder layers (None: its default)
    compile_vision: bool = False  # with compile: the vision tower's encoder layers too
    fused_lora: bool = False
    share_inputs: bool = True  # with fused_lora: q/k/v and gate/up as one fused call each
    low_rank_kernel: bool = True  # with fused_lora: LoRA's rank-r adds through the Triton kernel, not cuBLAS addmm
    liger: bool = False  # Liger's Triton kernels patched in (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)
    checkpoint_every: int = 1  # with checkpointing: only every k-th decoder layer
    quantize_vision: bool = True  # with nf4: the vision tower too (as from_pretrained does)
    qlora_dtype: Literal["float32", "bfloat16"] = "float32"  # with nf4 and prepare_qlora: the non-quantized weights (stock: fp32)
    use_dora: bool = False
    use_rslora: bool = False
    padding_free: bool = False  # the batch packed into one row, attention per sample (vlmtune.speed.varlen_attention)
    vision_graphs: bool = False  # the frozen vision tower replayed from a CUDA graph (vlmtune.speed.vision_graphs)


OURS = dict(answer_loss=True, fused_adamw=True, bf16_lora_inputs=True, fused_lora=True)
OURS_QLORA = dict(answer_loss=True, fused_adamw=True, bf16_lora_inputs=True, quant="nf4", checkpointing="nonreentrant")
OURS_QLORA_FUSED = dict(OURS_QLORA, fused_lora=True)
VARIANTS: dict[str, Variant] = {
    "stock": Variant("stock LoRA all-linear, b8"),
    "stock_qv": Variant("stock LoRA q,v, b8", targets="qv"),
    "stock_ckpt_b16": Variant("stock LoRA all-linear + ckpt, b16", batch=16, checkpointing="nonreentrant"),
    "stock_qlora": Variant("stock QLoRA all-linear + ckpt (kbit prep), b8", quant="nf4", checkpointing="kbit"),
    "stock_qlora_qv_b2": Variant("stock QLoRA q,v + ckpt (kbit prep), b2", batch=2, targets="qv", quant="nf4", checkpointing="kbit"),
    # one lever at a time on top of stock
    "lever_answer_loss": Variant("stock + answer-only loss", answer_loss=True),
    "lever_lora_inputs": Variant("stock + bf16 LoRA inputs", bf16_lora_inputs=True),
    "lever_fused_adamw": Variant("stock + fused AdamW", fused_adamw=True),
    "lever_fp8": Variant("stock + fp8 base linears", fp8=True),
    "lever_fused_lora": Variant("stock + fused LoRA linears", fused_lora=True),
    "lever_fused_lora_separate": Variant("stock + fused LoRA linears, one call per projection", fused_lora=True, share_inputs=False),
    "stock_liger": Variant("stock + Liger kernels, b8", liger=True),
    "stock_qlora_b2": Variant("stock QLoRA all-linear + ckpt (kbit prep), b2", batch=2, quant="nf4", checkpointing="kbit"),
    # one change at a time on top of stock QLoRA, for the loss-curve check
    "stock_qlora_nonreentrant": Variant("stock QLoRA, prepare_qlora + non-reentrant ckpt", quant="nf4", checkpointing="nonreentrant"),
    "stock_qlora_answer_loss": Variant("stock QLoRA + answer-only loss", quant="nf4", checkpointing="kbit", answer_loss=True),
    "stock_qlora_fused_adamw": Variant("stock QLoRA + fused AdamW", quant="nf4", checkpointing="kbit", fused_adamw=True),
    "dora": Variant("stock DoRA all-linear, b8", use_dora=True),
    "rslora": Variant("stock rsLoRA all-linear, b8", use_rslora=True),
    # ours
    "ours_bf16": Variant("ours bf16 (answer loss, fused LoRA, fused AdamW)", **OURS),
    "ours_fp8": Variant("ours fp8 (+ fp8 base linears)", fp8=True, **OURS),
    "ours_bf16_compile": Variant("ours bf16 + compiled decoder layers", compile=True, **OURS),
    "ours_bf16_compile_separate": Variant("ours bf16 + compiled, q/k/v and gate/up fused apart", compile=True, share_inputs=False, **OURS),
    "ours_fp8_compile": Variant("ours fp8 + compiled decoder layers", fp8=True, compile=True, **OURS),
    "ours_fp8mlp_compile": Variant("ours fp8 MLP only + compiled", fp8=True, fp8_mlp_only=True, compile=True, **OURS),
    "ours_fp8fwd_compile": Variant("ours fp8 fwd / bf16 grad-in + compiled", fp8=True, fp8_backward="bf16", compile=True, **OURS),
    "ours_fp8bwd_compile": Variant("ours bf16 fwd / fp8 grad-in + compiled", fp8=True, fp8_forward="bf16", compile=True, **OURS),
    "ours_fp8bwd_compile_addmm": Variant(
        "ours bf16 fwd / fp8 grad-in + compiled, LoRA adds by cuBLAS addmm", fp8=True, fp8_forward="bf16", compile=True, low_rank_kernel=False, **OURS
    ),
    "ours_bf16_compile_addmm": Variant("ours bf16 + compiled, LoRA adds by cuBLAS addmm", compile=True, low_rank_kernel=False, **OURS),
    # Inductor's autotuned Triton matmul templates for the skinny LoRA matmuls (about 15 ms of the
    # FP8-backward step on an H200): measured, no gain (1.94x against 1.96x, NOTES.md session 5)
    "ours_fp8bwd_autotune": Variant(
        "ours bf16 fwd / fp8 grad-in + compiled, max-autotune", fp8=True, fp8_forward="bf16", compile=True, compile_mode="max-autotune-no-cudagraphs", **OURS
    ),
    "ours_fp8bwd_compile_separate": Variant(
        "ours bf16 fwd / fp8 grad-in + compiled, q/k/v and gate/up fused apart", fp8=True, fp8_forward="bf16", compile=True, share_inputs=False, **OURS
    ),
    "ours_fp8bwd_mlp_compile": Variant("ours bf16 fwd / fp8 grad-in on the MLP + compiled", fp8=True, fp8_forward="bf16", fp8_mlp_only=True, compile=True, **OURS),
    "ours_fp8bwd": Variant("ours bf16 fwd / fp8 grad-in", fp8=True, fp8_forward="bf16", **OURS),
    "ours_qlora_lm_compile": Variant("ours QLoRA, bf16 vision, ckpt, compiled, b8", quantize_vision=False, compile=True, **OURS_QLORA),
    "ours_fp8_ckpt_b16": Variant("ours fp8 + ckpt, b16", batch=16, fp8=True, checkpointing="nonreentrant", **OURS),
    "ours_qlora": Variant("ours QLoRA all-linear + ckpt, b8", **OURS_QLORA),
    "ours_qlora_b2": Variant("ours QLoRA all-linear + ckpt, b2", batch=2, **OURS_QLORA),
    "ours_qlora_lm": Variant("ours QLoRA, bf16 vision, ckpt, b8", quantize_vision=False, **OURS_QLORA),
    "ours_qlora_lm_ck2": Variant("ours QLoRA, bf16 vision, ckpt every 2nd, b8", quantize_vision=False, checkpoint_every=2, **OURS_QLORA),
    "ours_qlora_lm_ck4": Variant("ours QLoRA, bf16 vision, ckpt every 4th, b8", quantize_vision=False, checkpoint_every=4, **OURS_QLORA),
    "ours_qlora_lm_b2": Variant("ours QLoRA, bf16 vision, ckpt, b2", batch=2, quantize_vision=False, **OURS_QLORA),
    "ours_qlora_lm_compile_b2": Variant("ours QLoRA, bf16 vision, ckpt, compiled, b2", batch=2, quantize_vision=False, compile=True, **OURS_QLORA),
    # the fused LoRA path over NF4 bases (vlmtune.speed.nf4): dequantized in the compiled graph
    "ours_qlora_fused_b2": Variant("ours QLoRA fused, bf16 vision, ckpt, b2", batch=2, quantize_vision=False, **OURS_QLORA_FUSED),
    "ours_qlora_fused_compile_b2": Variant("ours QLoRA fused, bf16 vision, ckpt, compiled, b2", batch=2, quantize_vision=False, compile=True, **OURS_QLORA_FUSED),
    "ours_qlora_fused_compile": Variant("ours QLoRA fused, bf16 vision, ckpt, compiled, b8", quantize_vision=False, compile=True, **OURS_QLORA_FUSED),
    # as stock_qlora quantizes (vision tower too), for the loss-curve check against it
    "ours_qlora_fused_compile_all": Variant("ours QLoRA fused, ckpt, compiled, b8", compile=True, **OURS_QLORA_FUSED),
    "ours_qlora_fused_compile_all_bf16": Variant("ours QLoRA fused, bf16 norms, ckpt, compiled, b8", compile=True, qlora_dtype="bfloat16", **OURS_QLORA_FUSED),
    "ours_fp8bwd_compile_packed": Variant(
        "ours bf16 fwd / fp8 grad-in + compiled, padding-free", fp8=True, fp8_forward="bf16", compile=True, padding_free=True, **OURS
    ),
    "ours_fp8bwd_compile_packed_graphs": Variant(
        "ours bf16 fwd / fp8 grad-in + compiled, padding-free, vision as a CUDA graph", fp8=True, fp8_forward="bf16", compile=True,
        padding_free=True, vision_graphs=True, **OURS
    ),
    "ours_bf16_compile_packed": Variant("ours bf16 + compiled, padding-free", compile=True, padding_free=True, **OURS),
    "stock_packed": Variant("stock + padding-free batches", padding_free=True),
    "ours_fp8bwd_compile_vision": Variant(
        "ours bf16 fwd / fp8 grad-in + compiled, vision too", fp8=True, fp8_forward="bf16", compile=True, compile_vision=True, **OURS
    ),
    "ours_fp8bwd_compile_graphs": Variant(
        "ours bf16 fwd / fp8 grad-in + compiled, vision as a CUDA graph", fp8=True, fp8_forward="bf16", compile=True, vision_graphs=True, **OURS
    ),
    "ours_fp8bwd_compile_vision_graphs": Variant(
        "ours bf16 fwd / fp8 grad-in + compiled, vision compiled + CUDA graph", fp8=True, fp8_forward="bf16", compile=True,
        compile_vision=True, vision_graphs=True, **OURS
    ),
}
DEFAULT_VARIANTS = (
    "stock,stock_qv,stock_ckpt_b16,stock_qlora,stock_qlora_qv_b2,"
    "lever_answer_loss,lever_lora_inputs,lever_fused_adamw,lever_fused_lora,lever_fp8,"
    "ours_bf16,ours_fp8,ours_qlora,ours_qlora_b2,ours_qlora_lm,ours_qlora_lm_ck2,ours_qlora_lm_b2,"
    "ours_bf16_compile,ours_fp8_compile,ours_fp8fwd_compile,ours_qlora_lm_compile"
)


@dataclass(frozen=True)
class Shape:
    """The model and sample shape: LLaVA-1.5-7B (CLIP ViT-L/14-336 + Llama-2-7B) or a CPU-sized one."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    text_hidden: int = 4096
    text_intermediate: int = 11008
    text_layers: int = 32
    text_heads: int = 32
    vocab_size: int = 32064  # llava-hf/llava-1.5-7b-hf: Llama-2's 32000 + image and pad tokens, padded
    text_tokens: int = 64  # the longest text a sample has (all of them without text_tokens_min)
    answer_tokens: int = 16
    text_tokens_min: int | None = None  # variable-length samples: text lengths uniform in text_tokens_min..text_tokens

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def sequence_length(self) -> int:
        return self.image_tokens + self.text_tokens


TINY = Shape(image_size=28, vision_hidden=64, vision_intermediate=128, vision_layers=2, vision_heads=4,
             text_hidden=64, text_intermediate=128, text_layers=2, text_heads=4, vocab_size=512, text_tokens=24, answer_tokens=8)
IMAGE_TOKEN_ID, PAD_TOKEN_ID = 32000, 32001


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated rows; all: {','.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loss-steps", type=int, default=30, help="steps of the loss-curve check; 0 skips it")
    parser.add_argument(
        "--loss-pairs", default="stock:ours_bf16,stock:ours_fp8_compile,stock:ours_fp8fwd_compile,stock_qlora:ours_qlora", help="reference:candidate pairs"
    )
    parser.add_argument("--loss-batch", type=int, default=4)
    parser.add_argument("--loss-batches", type=int, default=8, help="distinct batches the loss check cycles through")
    parser.add_argument("--loss-lr", type=float, default=1e-4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA on CPU (or GPU if present): checks the code paths run")
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--profile", default="", help="comma-separated variants to profile for one step (top kernels)")
    parser.add_argument("--profile-dir", type=Path, default=Path("."), help="where the profile tables go")
    parser.add_argument("--skip-checks", action="store_true", help="skip the FP8 / low-rank / NF4 kernel checks before the table")
    parser.add_argument("--gpus", type=int, default=0, help="measure DDP scaling on this many GPUs (gloo processes with --tiny on CPU)")
    parser.add_argument("--scaling-variant", default="stock", help="the variant whose scaling --gpus measures")
    parser.add_argument("--varlen", default="", help="MIN,MAX: each sample's text tokens drawn from MIN..MAX (default: all --text-tokens)")
    parser.add_argument("--batches", type=int, default=2, help="distinct batches the timed steps cycle through")
    args = parser.parse_args()
    if args.gpus:
        return print_scaling(args, parser)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("the 7B benchmark needs a GPU; use --tiny on CPU")
    shape = TINY if args.tiny else Shape()
    if args.varlen:
        shortest, longest = (int(n) for n in args.varlen.split(","))
        if not shape.answer_tokens + 1 <= shortest <= longest:
            parser.error(f"--varlen needs {shape.answer_tokens + 1} <= MIN <= MAX")
        shape = replace(shape, text_tokens=longest, text_tokens_min=shortest)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if "stock" not in names:
        names.insert(0, "stock")  # every ratio is against stock measured in this run
    names.sort(key=lambda name: VARIANTS[name].compile)  # compiled rows last: they switch fp8 quantization to Inductor
    print(environment(device), flush=True)
    reports = []
    for check in () if args.skip_checks else (check_fp8_linear, check_low_rank_add, check_nf4_dequantize, check_varlen_attention):
        try:
            reports.append(check(device, shape))
        except Exception as error:  # the table still tells the rest
            reports.append(f"{check.__name__} failed: {type(error).__name__}: {error}")
        print(reports[-1], flush=True)
    check_report = "\n".join(reports)

    rows = []
    for name in names:
        variant = VARIANTS[name]
        if args.tiny:
            variant = replace(variant, batch=max(1, variant.batch // 4))
        result = run_variant(name, variant, shape, device, args)
        rows.append(result)
        print(f"  {name}: {json.dumps({k: v for k, v in result.items() if k != 'losses'})}", flush=True)

    curves = loss_curves(shape, device, args) if args.loss_steps > 0 else {}
    print()
    print(environment(device))
    print(check_report)
    print(format_table(rows, shape))
    if curves:
        print(format_curves(curves))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": environment(device), "rows": rows, "curves": curves}, indent=2))


class VariantBuilder:
    """Builds a named variant in a spawned rank (a module-level class, so it pickles)."""

    def __init__(self, tiny: bool):
        self.tiny = tiny

    def variant(self, name: str) -> Variant:
        variant = VARIANTS[name]
        return replace(variant, batch=max(1, variant.batch // 4)) if self.tiny else variant

    def batch_of(self, name: str) -> int:
        return self.variant(name).batch

    def __call__(self, name: str, shape: Shape, device: torch.device, lr: float):
        return build_training(self.variant(name), shape, device, lr, lora_seed=0)


def print_scaling(args, parser) -> None:
    from scaling import measure_scaling

    if not args.tiny and torch.cuda.device_count() < args.gpus:
        parser.error(f"--gpus {args.gpus} needs {args.gpus} GPUs; {torch.cuda.device_count()} visible (use --tiny for CPU processes)")
    if args.scaling_variant not in VARIANTS:
        parser.error(f"unknown variant {args.scaling_variant!r}")
    shape = TINY if args.tiny else Shape()
    rows = measure_scaling(args.scaling_variant, args.gpus, args.steps, args.warmup, VariantBuilder(args.tiny), make_batches, shape, args.lr)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(environment(device))
    print(f"DDP scaling of {args.scaling_variant!r}, batch {VariantBuilder(args.tiny).batch_of(args.scaling_variant)} per process")
    print(f"{'processes':>9}{'step s':>9}{'tokens/s':>11}{'per process':>13}{'efficiency':>12}")
    for row in rows:
        print(f"{row['world_size']:>9}{row['step_s']:>9.3f}{row['tokens_per_s']:>11,.0f}{row['tokens_per_s_per_gpu']:>13,.0f}{row['efficiency']:>11.1%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": environment(device), "scaling": rows}, indent=2))


def run_variant(name: str, variant: Variant, shape: Shape, device: torch.device, args) -> dict:
    """Build, warm up, time `args.steps` steps; the row's numbers, or the error that stopped it."""
    row = {"name": name, "description": variant.description, "batch": variant.batch, **{"variant": asdict(variant)}}
    model = optimizer = step = None
    try:
        if variant.quant == "nf4" and not bitsandbytes_available():
            raise RuntimeError("bitsandbytes is not installed")
        started = time.perf_counter()
        model, optimizer, step = build_training(variant, shape, device, args.lr, lora_seed=0)
        row["setup_s"] = round(time.perf_counter() - started, 1)
        row["base_params"] = count_base_params(model)
        batches = make_batches(shape, variant.batch, device, count=args.batches, seed=1, padding_free=variant.padding_free)
        batch_tokens = [real_tokens(batch, shape) for batch in batches]
        reset_memory(device)
        started = time.perf_counter()
        # every distinct batch (shape) once before timing, so torch.compile has seen them all
        for i in range(max(args.warmup, len(batches) if shape.text_tokens_min else 0)):
            step(batches[i % len(batches)])
        synchronize(device)
        row["warmup_s"] = round(time.perf_counter() - started, 1)
        times = []
        for i in range(args.steps):
            started = time.perf_counter()
            step(batches[i % len(batches)])
            synchronize(device)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        tokens_per_s = sum(batch_tokens[i % len(batches)] for i in range(args.steps)) / sum(times)
        if name in args.profile.split(","):
            profile_step(step, batches[0], device, args.profile_dir / f"profile_{name}.txt")
        row.update(
            step_s=median,
            step_spread=(max(times) - min(times)) / median,
            tokens_per_s=tokens_per_s,
            padded_share=1 - sum(batch_tokens) / sum(batch["input_ids"].numel() for batch in batches),
            tflops=4 * row["base_params"] * tokens_per_s / 1e12,
            **peak_memory(device),
        )
    except Exception as error:  # one failed row (OOM, missing backend) must not lose the others
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    finally:
        del model, optimizer, step
        free_memory(device)
    return row


def check_fp8_linear(device: torch.device, shape: Shape) -> str:
    """Error and speed of one FP8 linear (forward + grad-input) against bf16, on fresh random data."""
    from vlmtune.speed.fp8_linear import Float8FrozenLinear

    tokens = 8 * shape.sequence_length
    lines = []
    for in_features, out_features in [(shape.text_hidden, shape.text_hidden), (shape.text_hidden, shape.text_intermediate), (shape.text_intermediate, shape.text_hidden)]:
        linear = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
        fp8 = Float8FrozenLinear.from_linear(linear)
        x = torch.randn(tokens, in_features, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, out_features, device=device, dtype=torch.bfloat16)
        reference_out = x.detach().double() @ linear.weight.double().t()
        reference_grad = grad.double() @ linear.weight.double()
        out = fp8(x)
        (fp8_grad,) = torch.autograd.grad(out, x, grad)
        bf16_out = linear(x)
        (bf16_grad,) = torch.autograd.grad(bf16_out, x, grad)
        rel = lambda a, ref: float((a.detach().double() - ref).norm() / ref.norm())  # noqa: E731
        line = (f"fp8 linear {in_features}->{out_features} x {tokens} tokens: rel err fwd {rel(out, reference_out):.1e} (bf16 {rel(bf16_out, reference_out):.1e}), "
                f"grad-in {rel(fp8_grad, reference_grad):.1e} (bf16 {rel(bf16_grad, reference_grad):.1e})")
        if device.type == "cuda":
            fp8_ms = time_ms(lambda: torch.autograd.grad(fp8(x), x, grad))
            bf16_ms = time_ms(lambda: torch.autograd.grad(linear(x), x, grad))
            line += f"; fwd+grad-in {fp8_ms:.3f} ms vs bf16 {bf16_ms:.3f} ms ({bf16_ms / fp8_ms:.2f}x)"
        lines.append(line)
        del linear, fp8, x, grad, out, bf16_out
    free_memory(device)
    return "\n".join(lines)


def check_low_rank_add(device: torch.device, shape: Shape) -> str:
    """LoRA's rank-r adds and skinny matmuls at the 7B shapes: error, time and bandwidth, kernel against cuBLAS.

    The forward adds `s * h B^T` to a column slice of a group's base output (q of q/k/v); the
    backward adds `grad_h A` (rank 3 x 16 for q/k/v) to the input gradient. Bytes are the (tokens x
    features) tensors read and written once, the least any version must move. Each call is timed
    alone from Python, so for these sub-0.2 ms shapes the time includes the launch (the kernel's
    autotuner and op dispatch, about 0.1 ms), which inside a training step overlaps the GPU's work:
    a step's profile has the kernel's own time.
    """
    from vlmtune.speed.low_rank_add import add_low_rank

    tokens, hidden, rank = 8 * shape.sequence_length, shape.text_hidden, 16
    lines = []
    cases = [
        ("fwd q of q/k/v", 3 * hidden, hidden, rank),
        ("fwd gate of gate/up", 2 * shape.text_intermediate, shape.text_intermediate, rank),
        ("fwd down", hidden, hidden, rank),
        ("bwd grad_x of q/k/v", hidden, hidden, 3 * rank),
        ("bwd grad_x of down", shape.text_intermediate, shape.text_intermediate, rank),
    ]
    for label, width, features, r in cases:
        wide = torch.randn(tokens, width, device=device, dtype=torch.bfloat16)
        c = wide[:, :features]
        h = torch.randn(tokens, r, device=device, dtype=torch.bfloat16)
        b = torch.randn(features, r, device=device, dtype=torch.bfloat16) * 0.1
        reference = c.double() + 0.5 * h.double() @ b.double().t()
        out = add_low_rank(c, h, b, 0.5)
        error = float((out.double() - reference).norm() / reference.norm())
        line = f"low-rank add {label}: {tokens}x{features}, r={r}: rel err {error:.1e}"
        if device.type == "cuda":
            kernel_ms = time_ms(lambda: add_low_rank(c, h, b, 0.5))
            addmm_ms = time_ms(lambda: torch.addmm(c, h, b.t(), alpha=0.5))
            gb = 2 * tokens * features * 2 / 1e9
            line += f"; kernel {kernel_ms:.3f} ms ({gb / kernel_ms:.2f} TB/s) vs addmm {addmm_ms:.3f} ms ({gb / addmm_ms:.2f} TB/s), {addmm_ms / kernel_ms:.2f}x"
        lines.append(line)
        del wide, c, h, b, reference, out
    if device.type == "cuda":  # the other rank-r matmuls of a LoRA step, each reading one (tokens x features) tensor
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        a = torch.randn(rank, hidden, device=device, dtype=torch.bfloat16)
        b = a.t().contiguous()  # a LoRA B weight: (features, rank)
        h = torch.randn(tokens, rank, device=device, dtype=torch.bfloat16)
        gb = tokens * hidden * 2 / 1e9
        for label, fn in [("h = x A^T", lambda: x @ a.t()), ("grad_h = g B", lambda: x @ b),
                          ("grad_B = g^T h", lambda: x.t() @ h), ("grad_A = grad_h^T x", lambda: h.t() @ x)]:
            ms = time_ms(fn)
            lines.append(f"skinny matmul {label}: {tokens}x{hidden}, r={rank}: {ms:.3f} ms ({gb / ms:.2f} TB/s)")
    free_memory(device)
    return "\n".join(lines)


def check_nf4_dequantize(device: torch.device, shape: Shape) -> str:
    """vlmtune's NF4 dequantization (torch ops, compiled) against bitsandbytes' kernels on an MLP weight: equal values, time."""
    if not bitsandbytes_available():
        return "nf4 dequantize check skipped: bitsandbytes is not installed"
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from vlmtune.speed.nf4 import dequantize_nf4, nf4_weight

    linear = torch.nn.Linear(shape.text_hidden, shape.text_intermediate, bias=False, device=device, dtype=torch.bfloat16)
    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4").to(device)
    weight = nf4_weight(quantized)
    reference = F.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state)
    compiled = torch.compile(dequantize_nf4)
    ours = compiled(weight)
    differing = (ours != reference).sum().item()
    line = f"nf4 dequantize {tuple(reference.shape)}: {differing} of {reference.numel()} values differ from bitsandbytes'"
    if device.type == "cuda":
        ours_ms = time_ms(lambda: compiled(weight))
        bnb_ms = time_ms(lambda: F.dequantize_4bit(quantized.weight.data, quantized.weight.quant_state))
        gb = reference.numel() * 2.5 / 1e9  # half a byte in, two bytes out, per value
        line += f"; compiled {ours_ms:.3f} ms ({gb / ours_ms:.2f} TB/s) vs bitsandbytes {bnb_ms:.3f} ms ({gb / bnb_ms:.2f} TB/s)"
    del linear, quantized, weight, reference, ours
    free_memory(device)
    return line


def check_varlen_attention(device: torch.device, shape: Shape) -> str:
    """Packed attention (forward + backward) against SDPA run on each sample alone, at the 7B head shape; its time
    against the padded batch's SDPA (the stock cost) and against SDPA over the packed row with a block mask."""
    if device.type != "cuda":
        return "varlen attention check skipped: it runs on CUDA only (elsewhere packed rows take the SDPA fallback)"
    import torch.nn.functional as F
    from types import SimpleNamespace

    heads, dim = shape.text_heads, shape.text_hidden // shape.text_heads
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(shape.image_tokens + 32, shape.image_tokens + 513, (8,), generator=generator).tolist()
    total, longest = sum(lengths), max(lengths)
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(1, heads, total, dim, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, total, heads, dim, device=device, dtype=torch.bfloat16)
    module = SimpleNamespace(is_causal=True, training=True)
    packed = lambda: varlen_attention.varlen_attention_forward(module, q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu, max_length_q=longest)[0]  # noqa: E731
    out = packed()
    grads = torch.autograd.grad(out, (q, k, v), grad)
    errors = []
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        pieces = [t[:, :, start:end].detach().requires_grad_() for t in (q, k, v)]
        reference = F.scaled_dot_product_attention(*pieces, is_causal=True).transpose(1, 2)
        reference_grads = torch.autograd.grad(reference, pieces, grad[:, start:end])
        errors.append(float((out[:, start:end] - reference).abs().max()))
        errors.extend(float((g[:, :, start:end] - r).abs().max()) for g, r in zip(grads, reference_grads))
    padded = [torch.randn(8, heads, longest, dim, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    padded_grad = torch.randn(8, heads, longest, dim, device=device, dtype=torch.bfloat16)
    segment = torch.repeat_interleave(torch.arange(8, device=device), torch.tensor(lengths, device=device))
    block_mask = (segment[:, None] == segment[None, :]).tril()[None, None]
    packed_ms = time_ms(lambda: torch.autograd.grad(packed(), (q, k, v), grad))
    padded_ms = time_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(*padded, is_causal=True), padded, padded_grad))
    masked_ms = time_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=block_mask), (q, k, v), grad.transpose(1, 2)))
    return (f"varlen attention, 8 samples of {min(lengths)}-{longest} tokens, {heads} heads x {dim}: max abs diff to per-sample SDPA "
            f"{max(errors):.1e} (fwd + grads); fwd+bwd {packed_ms:.3f} ms vs padded-batch SDPA {padded_ms:.3f} ms "
            f"vs block-masked SDPA {masked_ms:.3f} ms")


def time_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def profile_step(step: Callable, batch: dict, device: torch.device, path: Path) -> None:
    """One step under the profiler; the kernels that took the most GPU time, to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        step(batch)
        synchronize(device)
        wall = time.perf_counter() - started
    averages = prof.key_averages()
    kernel_s = sum(event.self_device_time_total for event in averages if event.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"one step: {wall:.3f} s wall under the profiler, {kernel_s:.3f} s of device kernels\n"
        + averages.table(sort_by=sort_by, row_limit=60, max_name_column_width=90)
        + "\nby CPU time spent in the op itself:\n"
        + averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90)
    )


def build_training(variant: Variant, shape: Shape, device: torch.device, lr: float, lora_seed: int):
    """The model with LoRA and every lever of `variant` applied, its optimizer, and a step function."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = build_model(shape, device, text_attention=varlen_attention.NAME if variant.padding_free else "sdpa")
    if variant.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llava

        apply_liger_kernel_to_llava(model=model)
    if variant.quant == "nf4":
        quantize_to_nf4(model, skip_modules=("lm_head",), only_under=None if variant.quantize_vision else "language_model")
    if variant.checkpointing == "kbit":
        model = prepare_model_for_kbit_training(model)
    elif variant.quant == "nf4":
        model = prepare_qlora(
            model, gradient_checkpointing=variant.checkpointing == "nonreentrant", checkpoint_every=variant.checkpoint_every,
            dtype=getattr(torch, variant.qlora_dtype),
        )
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if variant.checkpointing == "nonreentrant":
            enable_checkpointing(model, every=variant.checkpoint_every)
    model.config.use_cache = False
    leaves = ["q_proj", "v_proj"] if variant.targets == "qv" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(lora_seed)
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0,
        target_modules=rf".*language_model.*\.({'|'.join(leaves)})",
        use_dora=variant.use_dora, use_rslora=variant.use_rslora,
    )
    model = get_peft_model(model, lora)
    if variant.bf16_lora_inputs:
        keep_lora_inputs_bf16(model)
    if variant.fp8:
        convert_lora_base_to_fp8(model, backward=variant.fp8_backward, forward=variant.fp8_forward,
                                 only=("gate_proj", "up_proj", "down_proj") if variant.fp8_mlp_only else None)
    if variant.fused_lora:
        fuse_lora_linears(model, share_inputs=variant.share_inputs, low_rank_kernel=variant.low_rank_kernel)
    if variant.compile:
        compile_decoder_layers(model, mode=variant.compile_mode, vision=variant.compile_vision)
    if variant.vision_graphs and device.type == "cuda":
        graph_frozen_vision_towers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=variant.fused_adamw and device.type == "cuda")
    model.train()

    def loss_of(batch):
        if variant.answer_loss:
            return answer_loss(model, batch)
        return model(**batch).loss

    def step(batch) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, optimizer, step


def build_model(shape: Shape, device: torch.device, text_attention: str = "sdpa"):
    """LLaVA-1.5 from its config: random bf16 weights made on `device`, the same for every seed-0 call."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    varlen_attention.register()

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
            num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
            image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=768,
        ),
        text_config=LlamaConfig(
            hidden_size=shape.text_hidden, intermediate_size=shape.text_intermediate,
            num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads, num_key_value_heads=shape.text_heads,
            vocab_size=shape.vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5,
            pad_token_id=pad_token(shape), bos_token_id=1, eos_token_id=2,
        ),
        image_token_index=image_token(shape),
        image_seq_length=shape.image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=pad_token(shape),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation={"text_config": text_attention, "vision_config": "sdpa"}
        )
    return model.to(device)


def image_token(shape: Shape) -> int:
    return IMAGE_TOKEN_ID if shape.vocab_size > IMAGE_TOKEN_ID else shape.vocab_size - 2


def pad_token(shape: Shape) -> int:
    return PAD_TOKEN_ID if shape.vocab_size > PAD_TOKEN_ID else shape.vocab_size - 1


def make_batches(shape: Shape, batch: int, device: torch.device, count: int, seed: int, padding_free: bool = False) -> list[dict]:
    """`count` VQA-shaped batches: <s>, the image tokens, a prompt, and an answer that alone is labelled.

    Right-padded to the batch's longest sample (the stock collation), or packed into one row with
    `padding_free`; the same seed gives the same samples either way.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        if shape.text_tokens_min is None:
            lengths = [shape.text_tokens] * batch
        else:
            lengths = torch.randint(shape.text_tokens_min, shape.text_tokens + 1, (batch,), generator=generator).tolist()
        samples = []
        for length in lengths:
            text = torch.randint(3, min(shape.vocab_size, IMAGE_TOKEN_ID) - 2, (length - 1,), generator=generator)
            ids = torch.cat([torch.ones(1, dtype=torch.long), torch.full((shape.image_tokens,), image_token(shape)), text])
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[-shape.answer_tokens :] = ids[-shape.answer_tokens :]
            samples.append((ids, labels))
        pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, generator=generator).to(device, torch.bfloat16)
        if padding_free:
            packed = pack_sequences([ids.tolist() for ids, _ in samples], [labels.tolist() for _, labels in samples], pad_token(shape))
            batches.append({**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in packed.items()}, "pixel_values": pixels})
            continue
        longest = max(len(ids) for ids, _ in samples)
        input_ids = torch.full((batch, longest), pad_token(shape), dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        for row, (ids, sample_labels) in enumerate(samples):
            input_ids[row, : len(ids)], labels[row, : len(ids)], attention_mask[row, : len(ids)] = ids, sample_labels, 1
        batches.append({"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "pixel_values": pixels, "labels": labels.to(device)})
    return batches


def real_tokens(batch: dict, shape: Shape) -> int:
    """The batch's tokens that are not padding (padding is the only place the pad token appears)."""
    return int((batch["input_ids"] != pad_token(shape)).sum())


def loss_curves(shape: Shape, device: torch.device, args) -> dict:
    """Each reference:candidate pair of `--loss-pairs` trained on identical batches from identical weights.

    The noise reference is each reference again with another LoRA init seed: a candidate whose
    distance from its reference is below that is within the run-to-run noise of the recipe itself.
    """
    batch = max(1, args.loss_batch // 4) if args.tiny else args.loss_batch
    pairs = [pair.split(":") for pair in args.loss_pairs.split(",") if pair.strip()]
    runs = []
    for reference, candidate in pairs:
        for run in [(reference, 0), (candidate, 0), (reference, 1)]:
            if run not in runs:
                runs.append(run)
    curves: dict[str, list[float] | str] = {}
    for name, seed in runs:
        model = optimizer = step = None
        try:
            batches = make_batches(shape, batch, device, count=args.loss_batches, seed=2, padding_free=VARIANTS[name].padding_free)
            model, optimizer, step = build_training(VARIANTS[name], shape, device, args.loss_lr, lora_seed=seed)
            curves[f"{name}@{seed}"] = [float(step(batches[i % len(batches)])) for i in range(args.loss_steps)]
        except Exception as error:
            curves[f"{name}@{seed}"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        finally:
            del model, optimizer, step
            free_memory(device)
    return {"pairs": pairs, "curves": curves}


def format_curves(result: dict) -> str:
    curves = result["curves"]
    lines = []
    for reference, candidate in result["pairs"]:
        ref, cand, noise = curves.get(f"{reference}@0"), curves.get(f"{candidate}@0"), curves.get(f"{reference}@1")
        if not all(isinstance(c, list) for c in (ref, cand, noise)):
            lines.append(f"loss {candidate} vs {reference}: failed: {[c for c in (ref, cand, noise) if not isinstance(c, list)]}")
            continue
        diff = max(abs(a - b) for a, b in zip(cand, ref))
        seed_noise = max(abs(a - b) for a, b in zip(noise, ref))
        lines.append(
            f"loss {candidate} vs {reference} ({len(ref)} steps): {reference} {ref[0]:.4f} -> {ref[-1]:.4f}, "
            f"{candidate} {cand[0]:.4f} -> {cand[-1]:.4f}; max |diff| {diff:.4f} ({diff / ref[0]:.2%} of the first loss); "
            f"{reference} with another LoRA seed: max |diff| {seed_noise:.4f}"
        )
    return "\n".join(lines)


def format_table(rows: list[dict], shape: Shape) -> str:
    stock = next((r for r in rows if r["name"] == "stock" and "error" not in r), None)
    header = (f"| variant | batch | tokens/s | x stock | step s | x stock | peak GiB (alloc) | x stock | peak GiB (reserved) | padding "
              f"| TFLOP/s (4PN) | of {MATMUL_CEILING_TFLOPS:.0f} |")
    text = f"{shape.text_tokens_min}-{shape.text_tokens}" if shape.text_tokens_min else f"{shape.text_tokens}"
    lines = [f"{shape.image_tokens} image + {text} text tokens a sample, {shape.answer_tokens} labelled; tokens/s counts real tokens", header, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['description']} | {r['batch']} | failed: {r['error']} |" + " |" * 9)
            continue
        ratio = (lambda key: f"{r[key] / stock[key]:.2f}") if stock else (lambda key: "-")
        lines.append(
            f"| {r['description']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {ratio('tokens_per_s')} | {r['step_s']:.3f} | {ratio('step_s')} "
            f"| {r['peak_gib']:.1f} | {ratio('peak_gib')} | {r['reserved_gib']:.1f} | {r['padded_share']:.0%} | {r['tflops']:.0f} | {r['tflops'] / MATMUL_CEILING_TFLOPS:.0%} |"
        )
    return "\n".join(lines)


def count_base_params(model) -> int:
    """Parameters of the base model (LoRA excluded), 4-bit weights counted at their logical size."""
    total = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else param.numel()
    from vlmtune.speed.fp8_linear import Float8FrozenLinear

    # FP8 layers hold their weight in buffers (one or two copies): count each layer once
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Float8FrozenLinear))
    return total


def environment(device: torch.device) -> str:
    import peft
    import transformers

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    allocator = f"; PYTORCH_CUDA_ALLOC_CONF={os.environ['PYTORCH_CUDA_ALLOC_CONF']}" if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") else ""
    return f"device {gpu}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}{allocator}"


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # setup (bf16 weights before quantization) must not count as reserved
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_gib": math.nan, "reserved_gib": math.nan}
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    from vlmtune.speed import fp8_linear

    fp8_linear.use_triton_quantize = True


if __name__ == "__main__":
    main()
