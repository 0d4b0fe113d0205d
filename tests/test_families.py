"""Every supported VLM family, built tiny from its config class (nothing downloaded), through the real
tokenization, collator, LoRA and Trainer code; plus the remote-code families' module names and inputs."""

import importlib.util
import math

import datasets
import pytest
import torch
from PIL import Image
from torch import nn

from tests_support import assert_4bit_skips_exactly
from tiny_families import FAMILIES, HIDDEN
from vlmtune import cogvlm, families
from vlmtune.collate import TrainingCollator
from vlmtune.config import TinyModelConfig, TrainConfig
from vlmtune.methods import apply_lora, qlora_quantization_config
from vlmtune.models import build_tiny_vlm, byte_level_tokenizer, parameter_counts
from vlmtune.tokenization import IGNORE_INDEX, dataset_from_rows, encode_batch
from vlmtune.train import fit

QUESTIONS = ["what color is the shape?", "is there a circle?", "what shape is it?", "is it blue?"]
ANSWERS = ["red", "yes", "triangle", "no"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    spec = FAMILIES[request.param]
    torch.manual_seed(0)
    model, processor = spec.build()
    images = [Image.new("RGB", spec.image_size, (60 * i, 200 - 40 * i, 30)) for i in range(len(QUESTIONS))]
    return spec, model, processor, images


def test_labels_are_exactly_the_answer_and_the_families_end_of_turn_token(family):
    spec, _, processor, images = family
    tokenizer = processor.tokenizer
    examples = encode_batch(processor, QUESTIONS, ANSWERS, images)
    end_id = tokenizer.convert_tokens_to_ids(spec.end_token)
    for example, answer in zip(examples, ANSWERS):
        n_prompt = example["prompt_length"]
        labels = example["labels"]
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert IGNORE_INDEX not in labels[n_prompt:]
        assert labels[n_prompt:] == example["input_ids"][n_prompt:]
        assert labels[-1] == end_id and labels[n_prompt:].count(end_id) == 1
        # The template's own space before the answer (LLaVA-1.5, Idefics3) is part of the answer tokens.
        assert tokenizer.decode(labels[n_prompt:-1]).strip() == answer
        image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        assert image_token_id in example["input_ids"][:n_prompt]


def test_lora_wraps_the_language_models_linear_layers_only_and_training_moves_them(family, tmp_path):
    spec, model, processor, images = family
    prefix = families.language_model_prefix(model)
    language_linear = {name for name, module in model.named_modules() if name.startswith(prefix + ".") and isinstance(module, nn.Linear)}
    model = apply_lora(model, TrainConfig(lora_rank=4, lora_alpha=8))
    wrapped = _wrapped(model)
    base = model.get_base_model()
    assert language_linear and wrapped == language_linear
    vision = families.vision_module_names(base)
    assert vision, f"{spec.name}: no vision tower found"
    assert not any(name.startswith(tuple(v + "." for v in vision)) for name in wrapped)
    assert not any("lm_head" in name or "embed" in name for name in wrapped)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    dataset = _dataset(processor, images)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}
    config = TrainConfig(lora_rank=4, lora_alpha=8, max_steps=3, batch_size=2, eval_steps=3, max_eval_samples=2, learning_rate=1e-2, warmup_ratio=0)
    summary = fit(model, processor, dataset, dataset, config, tmp_path / "checkpoints", log=lambda _: None)
    assert summary["steps"] == 3
    assert math.isfinite(summary["train_loss_last"]) and math.isfinite(summary["best_eval_loss"])
    assert base.is_gradient_checkpointing  # on by default, through the Trainer
    changed = [name for name, parameter in model.named_parameters() if name in before and not torch.equal(parameter, before[name])]
    assert any("lora_B" in name for name in changed)


def test_the_collator_passes_what_each_family_needs(family):
    spec, _, processor, images = family
    rows = [{**example, "image": image} for example, image in zip(encode_batch(processor, QUESTIONS[:2], ANSWERS[:2], images[:2]), images[:2])]
    batch = TrainingCollator(processor)(rows)
    expected = {
        "llava_next": {"image_sizes"}, "llava_onevision": {"image_sizes"}, "idefics3": {"pixel_attention_mask"}, "smolvlm": {"pixel_attention_mask"},
        "qwen2_vl": {"image_grid_thw", "mm_token_type_ids"}, "qwen2_5_vl": {"image_grid_thw", "mm_token_type_ids"},
        "glm4v": {"image_grid_thw", "mm_token_type_ids"}, "paligemma": {"token_type_ids"},
    }.get(spec.name, set())
    assert expected <= set(batch)
    if spec.name == "paligemma":
        n_prompt = rows[0]["prompt_length"]
        assert batch["token_type_ids"][0, :n_prompt].eq(0).all() and batch["token_type_ids"][0, n_prompt:].eq(1).all()


def test_mm_token_type_ids_are_asked_for_through_either_transformers_api():
    from vlmtune.collate import _wants_mm_token_type_ids

    def processor(**attributes):
        return type("Processor", (), attributes)()

    def kwargs(text_defaults):
        return type("ProcessorKwargs", (), {"_defaults": {"text_kwargs": text_defaults}})

    assert _wants_mm_token_type_ids(processor(return_mm_token_type_ids=True))  # transformers 5.24
    assert _wants_mm_token_type_ids(processor(valid_processor_kwargs=kwargs({"return_mm_token_type_ids": True})))  # 5.17
    assert not _wants_mm_token_type_ids(processor(valid_processor_kwargs=kwargs({"padding": False})))
    assert not _wants_mm_token_type_ids(processor())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_default_lora_trains_under_one_percent_of_the_real_size_model(name):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(FAMILIES[name].real_size())
        model = apply_lora(model, TrainConfig(gradient_checkpointing=False))
    trainable, total = parameter_counts(model)
    print(f"{name}: {trainable / 1e6:.1f}M of {total / 1e9:.2f}B trainable = {100 * trainable / total:.3f}%")
    assert total > 1e9 and trainable / total < 0.01


def test_lora_on_vision_and_train_projector_are_opt_in():
    model, _ = FAMILIES["qwen2_vl"].build()
    model = apply_lora(model, TrainConfig(lora_on_vision=True, train_projector=True, gradient_checkpointing=False))
    wrapped = _wrapped(model)
    assert any(".visual.blocks." in name for name in wrapped)
    assert not any(".visual.merger." in name for name in wrapped)  # the projector trains in full instead
    merger = [name for name, parameter in model.named_parameters() if ".visual.merger." in name and parameter.requires_grad]
    assert merger and all("modules_to_save" in name for name in merger)


def test_dora_and_rslora_are_configured_from_train_config():
    model, _ = FAMILIES["llava"].build()
    model = apply_lora(model, TrainConfig(lora_rank=4, lora_alpha=8, use_dora=True, use_rslora=True, gradient_checkpointing=False))
    layer = next(module for module in model.modules() if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector)
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))


def test_gradient_checkpointing_cuts_the_activations_kept_for_backward():
    def saved_bytes(checkpointing: bool) -> int:
        torch.manual_seed(0)
        model, processor = FAMILIES["llava"].build()
        model.config.text_config.num_hidden_layers = 1
        model = apply_lora(model, TrainConfig(gradient_checkpointing=checkpointing))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        images = [Image.new("RGB", (32, 32), (i * 50, 0, 0)) for i in range(4)]
        batch = TrainingCollator(processor)([{**e, "image": i} for e, i in zip(encode_batch(processor, QUESTIONS, ANSWERS, images), images)])
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**batch).loss
        loss.backward()
        return total

    assert saved_bytes(True) < 0.6 * saved_bytes(False)


def test_qlora_is_nf4_double_quantized_bf16_compute_and_keeps_vision_and_projector_out(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = qlora_quantization_config(families.family_by_model_type("qwen2_vl"))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert {"visual", "visual.merger", "lm_head"} <= set(config.llm_int8_skip_modules)


def test_4bit_skip_modules_keep_the_vision_tower_projector_and_lm_head_out(family):
    spec, model, _, _ = family
    kind = families.family_for(model)
    assert_4bit_skips_exactly(model, families.quantization_skip_modules(kind), (*kind.vision_modules, *kind.projector_modules, "lm_head"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_refuses_to_run_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        qlora_quantization_config(families.family_by_model_type("llava"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlora_base_keeps_its_unquantized_weights_in_the_configured_dtype(monkeypatch, dtype):
    """As the stock recipe (prepare_model_for_kbit_training) leaves them: fp32 by default, so the residual stream is fp32."""
    from vlmtune import methods
    from vlmtune.speed.qlora import quantize_to_nf4

    def load_quantized(ref, dtype, quantization_config=None):  # from_pretrained's result, built on CPU
        model, _ = build_tiny_vlm(TinyModelConfig())
        model = model.to(dtype)
        quantize_to_nf4(model, only_under="language_model")
        return model

    monkeypatch.setattr(methods, "load_model", load_quantized)
    monkeypatch.setattr(methods, "qlora_quantization_config", lambda family: None)  # it refuses to run without CUDA
    monkeypatch.setattr(methods, "base_family", lambda base: families.family_by_model_type("llava"))
    model = methods.load_base_for(None, TrainConfig(method="qlora", qlora_dtype=dtype))
    dense = [p for p in model.parameters() if p.__class__.__name__ != "Params4bit"]
    assert dense and {p.dtype for p in dense} == {getattr(torch, dtype)}
    assert any(p.__class__.__name__ == "Params4bit" for p in model.parameters())


def test_train_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as error:
        TrainConfig(method="prefix", lora_rank=0, lora_dropout=1.5, qlora_dtype="int8")
    assert "method='prefix'" in str(error.value) and "lora_rank=0" in str(error.value) and "lora_dropout=1.5" in str(error.value)
    assert "qlora_dtype='int8'" in str(error.value)
    with pytest.raises(ValueError, match="use_dora.*method='full'"):
        TrainConfig(method="full", use_dora=True)
    assert TrainConfig(target_modules=["q_proj", "v_proj"]).target_modules == ("q_proj", "v_proj")


# --- CogVLM / CogAgent: their remote code cannot run here (transformers 5), so names and inputs only ---


class _CogAgentStandIn(nn.Module):
    """The module names of CogAgent's remote code (`modeling_cogagent.py`), two layers, nothing else."""

    def __init__(self, model_type="cogagent", hidden=8):
        super().__init__()
        self.config = type("Config", (), {"model_type": model_type})()
        linear = lambda: nn.Linear(hidden, hidden, bias=False)  # noqa: E731
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(16, hidden)
        self.model.layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for name in ("vision_expert_query_key_value", "vision_expert_dense", "language_expert_query_key_value", "language_expert_dense"):
                setattr(layer.self_attn, name, linear())
            layer.mlp = nn.Module()
            for expert in ("language_mlp", "vision_mlp"):
                mlp = nn.Module()
                mlp.gate_proj, mlp.up_proj, mlp.down_proj = linear(), linear(), linear()
                setattr(layer.mlp, expert, mlp)
            if model_type == "cogagent":
                layer.cross_attn = nn.Module()
                layer.cross_attn.query, layer.cross_attn.key_value, layer.cross_attn.dense = linear(), linear(), linear()
            self.model.layers.append(layer)
        for tower in ("vision", "cross_vision") if model_type == "cogagent" else ("vision",):
            vision = nn.Module()
            vision.transformer = nn.Module()
            vision.transformer.attention = nn.Module()
            vision.transformer.attention.query_key_value, vision.transformer.attention.dense = linear(), linear()
            setattr(self.model, tower, vision)
        self.model.vision.linear_proj = nn.Module()
        self.model.vision.linear_proj.linear_proj, self.model.vision.linear_proj.dense_h_to_4h = linear(), linear()
        self.lm_head = linear()

    def forward(self, x):
        return x


@pytest.mark.parametrize("model_type", ["cogvlm", "cogagent"])
def test_cogvlm_lora_targets_both_experts_and_cogagents_cross_attention(model_type):
    model = apply_lora(_CogAgentStandIn(model_type), TrainConfig(train_projector=True, gradient_checkpointing=False))
    wrapped = _wrapped(model)
    expected = {
        f"model.layers.{i}.{leaf}"
        for i in range(2)
        for leaf in (
            "self_attn.vision_expert_query_key_value", "self_attn.vision_expert_dense",
            "self_attn.language_expert_query_key_value", "self_attn.language_expert_dense",
            *(f"mlp.{expert}.{proj}" for expert in ("language_mlp", "vision_mlp") for proj in ("gate_proj", "up_proj", "down_proj")),
            *(("cross_attn.query", "cross_attn.key_value", "cross_attn.dense") if model_type == "cogagent" else ()),
        )
        # the last layer's vision expert after attention writes only to image positions, which no loss reads
        if not (i == 1 and leaf in ("self_attn.vision_expert_dense", "mlp.vision_mlp.gate_proj", "mlp.vision_mlp.up_proj", "mlp.vision_mlp.down_proj"))
    }
    assert wrapped == expected  # never the EVA vision towers' query_key_value / dense, nor lm_head
    projector = [name for name, parameter in model.named_parameters() if "linear_proj" in name and parameter.requires_grad]
    assert projector and all("modules_to_save" in name for name in projector)


def test_cogvlm_needs_the_opt_in_and_a_transformers_its_code_has_run_on(monkeypatch):
    import transformers

    cogvlm_family, cogagent_family = families.family_by_model_type("cogvlm"), families.family_by_model_type("cogagent")
    with pytest.raises(ValueError, match="trust_remote_code"):
        families.check_remote_code_support(cogvlm_family, trust_remote_code=False)
    families.check_remote_code_support(cogagent_family, trust_remote_code=True)  # this environment's transformers
    for outside in ("4.34.1", "5.25.0"):
        monkeypatch.setattr(transformers, "__version__", outside)
        with pytest.raises(RuntimeError, match=r"transformers>=4.35,<5.25"):
            families.check_remote_code_support(cogagent_family, trust_remote_code=True)
    families.check_remote_code_support(families.family_by_model_type("qwen2_vl"), trust_remote_code=False)  # native families need neither


def test_remote_code_families_are_told_by_class_names():
    assert families.family_for({"architectures": ["CogAgentForCausalLM"]}).name == "cogagent"
    assert families.family_for({"auto_map": {"AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"}}).name == "cogvlm"
    assert families.family_for({"model_type": "llava", "architectures": ["CogVLMForCausalLM"]}).name == "llava"  # model_type first
    assert families.family_for({"architectures": ["SomethingElse"]}) is families.GENERIC


@pytest.mark.parametrize("is_cogagent", [False, True])
def test_cogvlm_inputs_follow_its_remote_codes_layout(is_cogagent):
    tokenizer = byte_level_tokenizer(["<unk>", "<s>", "</s>", "<EOI>"], pad="<unk>", bos="<s>", eos="</s>")
    example = cogvlm.encode_example(tokenizer, "what color?", "red", image_size=28, patch_size=14, cogagent=is_cogagent)
    vision_tokens = (28 // 14) ** 2 + 2
    n_prompt = example["prompt_length"]
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["input_ids"][1 : 1 + vision_tokens] == [tokenizer.pad_token_id] * vision_tokens
    assert example["token_type_ids"] == [0] + [1] * vision_tokens + [0] * (len(example["input_ids"]) - 1 - vision_tokens)
    prompt_text = tokenizer.decode(example["input_ids"][1 + vision_tokens : n_prompt])
    assert prompt_text == ("<EOI>" if is_cogagent else "") + "Question: what color? Short answer:"
    assert tokenizer.decode(example["labels"][n_prompt:]) == "red</s>" and set(example["labels"][:n_prompt]) == {IGNORE_INDEX}
    processor = (cogvlm.CogAgentProcessor if is_cogagent else cogvlm.CogVLMProcessor)(
        tokenizer, image_size=28, patch_size=14, cross_image_size=56 if is_cogagent else None
    )
    rows = [{**example, "image": Image.new("RGB", (40, 30), (255, 0, 0))}, {**example, "input_ids": example["input_ids"][:-1], "labels": example["labels"][:-1], "image": Image.new("RGB", (30, 30))}]
    batch = TrainingCollator(processor)(rows)  # the pipeline's collator, through the processor stand-in
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["labels"].shape
    assert batch["token_type_ids"][0].tolist() == example["token_type_ids"]
    assert batch["attention_mask"][1, -1] == 0 and batch["labels"][1, -1] == IGNORE_INDEX
    assert len(batch["images"]) == 2 and batch["images"][0][0].shape == (3, 28, 28)
    assert batch["images"][0][0][0].mean() > 1.5  # red channel, CLIP-normalised
    assert ("cross_images" in batch) == is_cogagent
    if is_cogagent:
        assert batch["cross_images"][0][0].shape == (3, 56, 56)


def _wrapped(model) -> set[str]:
    """Names (in the base model) of the modules PEFT put a LoRA adapter on."""
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules() if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)}


def _dataset(processor, images) -> datasets.Dataset:
    import io

    rows = []
    for index, (example, image, question, answer) in enumerate(zip(encode_batch(processor, QUESTIONS, ANSWERS, images), images, QUESTIONS, ANSWERS)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append({
            "sample_id": f"t:{index}", "drop": "t", "split": "train", "image_sha256": str(index), "image": {"bytes": buffer.getvalue(), "path": None},
            "question": question, "answer": answer, "answer_type": "", "question_type": "", **example,
        })
    return dataset_from_rows(rows)
