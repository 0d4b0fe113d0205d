"""The speed levers compute what the stock path computes (on CPU, with the tiny LLaVA)."""

import copy
import importlib.util
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vlmtune.config import TinyModelConfig
from vlmtune.families import lora_target_regex
from vlmtune.models import build_tiny_vlm
from vlmtune.speed.answer_loss import answer_loss
from vlmtune.speed.checkpointing import enable_checkpointing
from vlmtune.speed.fp8_linear import Float8FrozenLinear, convert_lora_base_to_fp8
from vlmtune.speed.fused_lora import fuse_lora_linears
from vlmtune.speed.qlora import bitsandbytes_available, prepare_qlora, quantize_to_nf4


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.detach().double() - reference.detach().double()).norm() / reference.detach().double().norm())


@pytest.fixture(scope="module")
def tiny_vlm():
    model, processor = build_tiny_vlm(TinyModelConfig())
    return model, processor


def vqa_batch(model, processor, batch_size=3, text_tokens=12, answer_tokens=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    image_tokens = config.image_seq_length
    text = torch.randint(10, 200, (batch_size, text_tokens), generator=generator)
    input_ids = torch.cat([torch.full((batch_size, image_tokens), config.image_token_index), text], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer_tokens:] = input_ids[:, -answer_tokens:]
    labels[0, -1] = -100  # rows may have answers of different lengths
    size = config.vision_config.image_size
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "labels": labels,
    }


def test_answer_loss_equals_the_models_own_loss(tiny_vlm):
    model, processor = tiny_vlm
    batch = vqa_batch(model, processor)
    expected = model(**batch).loss
    assert torch.allclose(answer_loss(model, batch), expected, rtol=1e-5)
    assert torch.allclose(answer_loss(model, batch, chunk_tokens=2), expected, rtol=1e-5)  # chunked + recomputed


def test_answer_loss_gradients_match(tiny_vlm):
    model, processor = tiny_vlm
    model = copy.deepcopy(model)
    batch = vqa_batch(model, processor, seed=1)
    model(**batch).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    answer_loss(model, batch, chunk_tokens=3).backward()
    for name, param in model.named_parameters():
        if name in expected and expected[name].norm() > 1e-6:  # key biases' true gradient is 0 (softmax shift)
            assert relative_error(param.grad, expected[name]) < 1e-4, name


def test_frozen_vision_tower_is_wrapped_for_cuda_graphs(tiny_vlm):
    from vlmtune.speed.vision_graphs import FrozenForwardGraphs, _checkpointing_off, graph_frozen_vision_towers

    model, processor = tiny_vlm
    model = copy.deepcopy(model)
    batch = vqa_batch(model, processor, seed=3)
    expected = model(**batch).loss
    model.requires_grad_(False)
    assert graph_frozen_vision_towers(model) == 1
    assert isinstance(model.model.vision_tower.forward, FrozenForwardGraphs)
    assert graph_frozen_vision_towers(model) == 0  # once
    assert torch.equal(model(**batch).loss, expected)  # off CUDA the tower runs eagerly, unchanged
    checkpointed = copy.deepcopy(tiny_vlm[0])
    checkpointed.gradient_checkpointing_enable()
    flags = lambda: [m.gradient_checkpointing for m in checkpointed.model.vision_tower.modules() if hasattr(m, "gradient_checkpointing")]  # noqa: E731
    assert flags() and all(flags())
    with _checkpointing_off(checkpointed.model.vision_tower):  # what a capture runs under
        assert not any(flags())
    assert all(flags())
    trainable = copy.deepcopy(model)
    trainable.model.vision_tower = copy.deepcopy(tiny_vlm[0].model.vision_tower)  # LoRA-on-vision case: weights train
    assert graph_frozen_vision_towers(trainable) == 0


def test_vision_cuda_graphs_is_a_train_config_switch(tiny_vlm, monkeypatch):
    from vlmtune.config import TrainConfig
    from vlmtune.speed import compile as regional_compile
    from vlmtune.speed.levers import apply_speed_levers
    from vlmtune.speed.vision_graphs import FrozenForwardGraphs

    compiled = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the switch acts on GPU only; nothing here runs on one
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(regional_compile, "compile_decoder_layers", lambda model, vision=False: compiled.append(vision) or 0)
    model = peft_lora(copy.deepcopy(tiny_vlm[0]))
    applied = apply_speed_levers(model, TrainConfig(vision_cuda_graphs=True, compile=True))
    assert applied["vision_towers_graphed"] == 1 and compiled == [True]  # its layers compiled too
    assert isinstance(model.get_base_model().model.vision_tower.forward, FrozenForwardGraphs)
    plain = peft_lora(copy.deepcopy(tiny_vlm[0]))
    assert "vision_towers_graphed" not in apply_speed_levers(plain, TrainConfig(compile=True)) and compiled == [True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_vision_tower_replayed_from_a_cuda_graph_equals_eager(tiny_vlm):
    from vlmtune.speed.vision_graphs import graph_frozen_vision_towers

    model = copy.deepcopy(tiny_vlm[0]).cuda().requires_grad_(False)
    tower = model.model.vision_tower
    size = model.config.vision_config.image_size
    images = [torch.randn(2, 3, size, size, device="cuda") for _ in range(3)]
    expected = [tower(image, output_hidden_states=True) for image in images]
    graph_frozen_vision_towers(model)
    first = tower(images[0], output_hidden_states=True)
    replayed = [tower(image, output_hidden_states=True) for image in images]  # the first captured, the others replayed
    assert len(tower.forward.captured) == 1
    for got, want in zip(replayed, expected):
        assert torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-5)
        assert torch.allclose(got.hidden_states[-2], want.hidden_states[-2], atol=1e-5)
    assert torch.allclose(first.last_hidden_state, expected[0].last_hidden_state, atol=1e-5)  # a kept output is not overwritten
    tower(images[0][:1], output_hidden_states=True)  # another batch size: a graph of its own
    assert len(tower.forward.captured) == 2


def peft_lora(model, **kwargs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_regex(model), **kwargs))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give it values so every gradient path is exercised
            nn.init.normal_(param, std=0.05)
    return model


def test_fused_lora_matches_peft(tiny_vlm):
    model, processor = tiny_vlm
    stock = peft_lora(copy.deepcopy(model).to(torch.bfloat16))
    fused = copy.deepcopy(stock)
    assert fuse_lora_linears(fused) == sum(1 for name, _ in stock.named_modules() if name.endswith("lora_A"))
    batch = vqa_batch(model, processor, seed=2)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    for m in (stock, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**batch).loss
        loss.backward()
    grads = {name: p.grad for name, p in stock.named_parameters() if p.requires_grad}
    assert grads
    for name, param in fused.named_parameters():
        if param.requires_grad:
            assert relative_error(param.grad, grads[name]) < 2e-2, name  # bf16 rounding order differs


def test_fused_lora_leaves_dropout_layers_to_peft(tiny_vlm):
    model, _ = tiny_vlm
    assert fuse_lora_linears(peft_lora(model, lora_dropout=0.1)) == 0


def test_projections_sharing_an_input_run_as_one_group(tiny_vlm, tmp_path):
    from safetensors.torch import load_file

    model, processor = tiny_vlm
    stock = peft_lora(copy.deepcopy(model).to(torch.bfloat16))
    separate, grouped = copy.deepcopy(stock), copy.deepcopy(stock)
    fuse_lora_linears(separate, share_inputs=False)
    fuse_lora_linears(grouped)
    sizes = sorted(len(group.layers) for group in {id(m.lora_group): m.lora_group for m in grouped.modules() if hasattr(m, "lora_group")}.values())
    layers = model.config.text_config.num_hidden_layers
    assert sizes == [1] * (2 * layers) + [2] * layers + [3] * layers  # o, down alone; gate/up; q/k/v
    base_size = lambda m: sum(p.numel() for name, p in m.named_parameters() if "lora_" not in name)  # noqa: E731
    assert base_size(grouped) == base_size(stock)  # the concatenated weights replace the members', no copy kept
    batch = vqa_batch(model, processor, seed=3)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    grads = {}
    for name, m in (("stock", stock), ("separate", separate), ("grouped", grouped)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(**batch).loss.backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    for name in grads["stock"]:
        assert relative_error(grads["grouped"][name], grads["separate"][name]) < 1e-2, name
        assert relative_error(grads["grouped"][name], grads["stock"][name]) < 3e-2, name  # bf16 rounding order, as the separate path
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), grouped.disable_adapter(), stock.disable_adapter():
        assert torch.allclose(grouped(**batch).logits.float(), stock(**batch).logits.float(), atol=1e-2)  # the base alone, through the shared weights
    for name, m in (("stock", stock), ("grouped", grouped)):
        m.save_pretrained(str(tmp_path / name))
    saved = {name: load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("stock", "grouped")}
    assert saved["grouped"].keys() == saved["stock"].keys()  # the adapter saves as PEFT's, nothing of the shared base
    assert all(torch.equal(saved["grouped"][key], saved["stock"][key]) for key in saved["stock"])


class ThreeProjections(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 64, bias=False), nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def test_grouped_fp8_grad_input_scales_each_member_on_its_own():
    """k's gradient is 1e-5 of q's and v's but reaches the input through a weight 1e5 larger: one FP8 scale
    per token across q/k/v would round it to nothing; a scale per member keeps it to e4m3's few percent."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    module = ThreeProjections().to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        module.k_proj.weight.mul_(1e5)
    module = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]), module)
    convert_lora_base_to_fp8(module, forward="bf16")
    fuse_lora_linears(module)
    assert len(module.q_proj.lora_group.layers) == 3
    x = torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)
    upstream = [torch.randn(40, 64), torch.randn(40, 32) * 1e-5, torch.randn(40, 32)]
    outputs = module(x)
    (grad_x,) = torch.autograd.grad(outputs, x, [g.to(torch.bfloat16) for g in upstream])
    weights = [module.q_proj.base_layer, module.k_proj.base_layer, module.v_proj.base_layer]
    dense = [w.shared.weight_bf16[w.start : w.stop].double() for w in weights]
    reference = sum(g.to(torch.bfloat16).double() @ w for g, w in zip(upstream, dense))
    k_share = (upstream[1].double() @ dense[1]).norm() / reference.norm()
    assert k_share > 0.3  # k's path carries a real part of the input gradient
    assert relative_error(grad_x, reference) < 0.08


def test_fp8_linear_quantizes_and_passes_gradient_to_the_input_only():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).requires_grad_(False)
    fp8 = Float8FrozenLinear.from_linear(linear)
    x = torch.randn(5, 7, 64, requires_grad=True)
    out = fp8(x)
    reference = linear(x.detach())
    error = relative_error(out.float(), reference)
    assert 1e-3 < error < 6e-2  # e4m3: quantization error is real but bounded
    out.float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert relative_error(x.grad, linear.weight.sum(0).expand_as(x)) < 6e-2
    assert not any(p.requires_grad for p in fp8.parameters())


def test_fp8_on_the_backward_only_leaves_the_forward_exact():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).requires_grad_(False)
    x = torch.randn(5, 7, 64, requires_grad=True)
    reference = linear(x.detach().to(torch.bfloat16).float())
    fp8 = Float8FrozenLinear.from_linear(linear, forward="bf16")
    out = fp8(x)
    assert fp8.weight_fp8 is None and fp8.weight_t_fp8 is not None  # the forward never sees an FP8 weight
    assert relative_error(out.float(), reference) < 1e-2  # bf16 rounding only
    out.float().sum().backward()
    error = relative_error(x.grad, linear.weight.sum(0).expand_as(x))
    assert 1e-3 < error < 6e-2  # the grad-input did go through e4m3
    with pytest.raises(ValueError, match="neither direction"):
        convert_lora_base_to_fp8(nn.Sequential(), forward="bf16", backward="bf16")


def test_convert_lora_base_to_fp8_can_be_limited_to_the_mlp(tiny_vlm):
    model, _ = tiny_vlm
    lora = peft_lora(model)
    converted = convert_lora_base_to_fp8(lora, only=("gate_proj", "up_proj", "down_proj"))
    layers = model.config.text_config.num_hidden_layers
    assert converted == 3 * layers
    assert sum(isinstance(m, Float8FrozenLinear) for m in lora.modules()) == 3 * layers


def test_enable_checkpointing_every_second_layer(tiny_vlm):
    model, _ = tiny_vlm
    model = copy.deepcopy(model)
    decoder_layers = model.config.text_config.num_hidden_layers
    assert enable_checkpointing(model, every=2) == (decoder_layers + 1) // 2


@pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_casts_the_non_quantized_weights(tiny_vlm, dtype):
    import bitsandbytes as bnb

    model, _ = tiny_vlm
    model = copy.deepcopy(model).to(torch.bfloat16)
    count = quantize_to_nf4(model, only_under="language_model")
    assert count == sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) > 0
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    prepare_qlora(model, dtype=dtype)  # fp32 (the default) as PEFT's prepare_model_for_kbit_training leaves them
    dense = [p for p in model.parameters() if p.__class__.__name__ != "Params4bit"]
    assert dense and all(p.dtype == dtype and not p.requires_grad for p in dense)
    assert all(p.dtype == torch.uint8 for p in model.parameters() if p.__class__.__name__ == "Params4bit")


def nf4_lora(model, checkpointing: bool):
    """The tiny VLM with its language model in NF4 (stock QLoRA numerics: fp32 non-quantized weights) and LoRA on it."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    quantize_to_nf4(model, only_under="language_model")
    prepare_qlora(model, gradient_checkpointing=checkpointing)
    return peft_lora(model)


@pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes not installed")
def test_nf4_dequantization_is_bitsandbytes_own(tiny_vlm):
    """Eager it calls bitsandbytes' kernels; traced (the form Inductor fuses) it must give the same values bit for bit."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from vlmtune.speed.nf4 import _dequantize, dequantize_nf4, nf4_weight

    torch.manual_seed(0)
    linear = bnb.nn.Linear4bit(128, 200, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    # 400 blocks of 64 values: not a whole number of 256-scale blocks, so the last nested block is partial.
    # Rows hold whole 64-blocks, as in every real model: on rows of 96 values bitsandbytes 0.50.2's CPU
    # kernel returned 4x its own quantization error, where this function stays at it.
    linear.weight = bnb.nn.Params4bit((torch.randn(200, 128) * 0.02).to(torch.bfloat16), requires_grad=False, compress_statistics=True, quant_type="nf4").to("cpu")
    weight = nf4_weight(linear)
    reference = F.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
    assert torch.equal(dequantize_nf4(weight), reference)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)  # the traced branch, run eagerly
        assert torch.equal(_dequantize(weight.layout, *weight[:6]), reference)


@pytest.mark.skipif(not bitsandbytes_available(), reason="bitsandbytes not installed")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_lora_over_nf4_bases_matches_peft(tiny_vlm, checkpointing):
    model, processor = tiny_vlm
    stock = nf4_lora(model, checkpointing)
    fused = copy.deepcopy(stock)
    assert fuse_lora_linears(fused) == sum(1 for name, _ in stock.named_modules() if name.endswith("lora_A"))
    groups = {id(m.lora_group): m.lora_group for m in fused.modules() if hasattr(m, "lora_group")}.values()
    layers = model.config.text_config.num_hidden_layers
    assert all(group.nf4 for group in groups) and sorted(len(g.layers) for g in groups) == [1] * (2 * layers) + [2] * layers + [3] * layers
    batch = vqa_batch(model, processor, seed=4)
    output_dtypes = {}
    for name, m in (("stock", stock), ("fused", fused)):
        m.train()
        projection = next(module for module_name, module in m.named_modules() if module_name.endswith("language_model.layers.0.self_attn.q_proj"))
        hook = projection.register_forward_hook(lambda module, args, out, name=name: output_dtypes.update({name: (args[0].dtype, out.dtype)}))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(**batch).loss.backward()  # with checkpointing, the backward recomputes through the fused functions
        hook.remove()
    # fp32 norms (the stock recipe's) feed fp32 inputs, and bitsandbytes + PEFT return fp32: so must the fused path
    assert output_dtypes["fused"] == output_dtypes["stock"] == (torch.float32, torch.float32)
    grads = {name: p.grad for name, p in stock.named_parameters() if p.requires_grad}
    assert grads
    for name, param in fused.named_parameters():
        if param.requires_grad:
            assert relative_error(param.grad, grads[name]) < 3e-2, name  # bf16 rounding order differs
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), fused.disable_adapter(), stock.disable_adapter():
        assert torch.allclose(fused(**batch).logits.float(), stock(**batch).logits.float(), atol=1e-2)  # the members' own NF4 bases


def test_compile_can_take_the_vision_tower_too(tiny_vlm):
    from vlmtune.speed.compile import compile_decoder_layers

    model, _ = tiny_vlm
    text_layers, vision_layers = model.config.text_config.num_hidden_layers, model.config.vision_config.num_hidden_layers
    assert compile_decoder_layers(copy.deepcopy(model)) == text_layers
    assert compile_decoder_layers(copy.deepcopy(model), vision=True) == text_layers + vision_layers


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_low_rank_add_kernel_in_the_triton_interpreter():
    """The Triton kernel's indexing and masking (strided c, transposed b, ranks below tl.dot's 16, partial tiles),
    run by Triton's CPU interpreter in a fresh process (it must be switched on before Triton compiles anything)."""
    code = """
import torch
from vlmtune.speed import low_rank_add
kernel = low_rank_add._build_kernel(interpret=True)
torch.manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.float16):
    for rows, cols, rank in [(70, 200, 16), (33, 96, 48), (5, 40, 8)]:
        c = torch.randn(rows, cols + 30, dtype=dtype)[:, 10 : 10 + cols]
        h = torch.randn(rows, rank, dtype=dtype)
        for b in (torch.randn(cols, rank, dtype=dtype), torch.randn(rank, cols, dtype=dtype).t()):
            for out_dtype in (None, torch.float32):  # fp32 out of 16-bit inputs: QLoRA's fp32 residual stream
                out = low_rank_add._launch(lambda k: k, c, h, b, 0.7, kernel=kernel, out_dtype=out_dtype)
                reference = c.double() + 0.7 * h.double() @ b.double().t()
                assert out.shape == (rows, cols) and out.is_contiguous() and out.dtype == (out_dtype or dtype)
                tolerance = 1e-6 if out.dtype == torch.float32 else 1e-3
                worst = max(worst, float((out.double() - reference).norm() / reference.norm()) / tolerance)
print(worst)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1.0  # fp32 out within 1e-6, fp16 out within 1e-3 of float64


def test_low_rank_add_is_addmm_on_cpu():
    from vlmtune.speed.low_rank_add import add_low_rank

    c, h, b = torch.randn(9, 30)[:, 5:25], torch.randn(9, 4), torch.randn(20, 4)
    assert torch.allclose(add_low_rank(c, h, b, 0.5), torch.addmm(c, h, b.t(), alpha=0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the fused LoRA path calls it: autocast must not pick the dtype
        assert add_low_rank(c, h, b, 0.5).dtype == torch.float32
        assert add_low_rank(c.bfloat16(), h.bfloat16(), b.bfloat16(), 0.5, torch.float32).dtype == torch.float32


@pytest.mark.slow
def test_benchmark_runs_tiny_on_cpu(tmp_path, monkeypatch, capsys):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
    argv = [str(script), "--tiny", "--variants", "stock,ours_bf16,lever_fp8", "--steps", "1", "--warmup", "0",
            "--loss-steps", "2", "--loss-pairs", "stock:ours_bf16", "--json", str(tmp_path / "out.json")]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "| stock LoRA all-linear" in printed and "failed" not in printed
    assert (tmp_path / "out.json").is_file()
