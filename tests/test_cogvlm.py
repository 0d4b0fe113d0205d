"""CogVLM / CogAgent through the pipeline's own code paths, offline, on tests/fixtures/tiny_cogvlm.

The fixture is a remote-code model written from scratch with their public interface, including the
transformers-4.35 generation API that transformers 5 broke (see its modeling file); THUDM's code
itself is not here. Each variant is built once: random weights from the fixture's config, a small
VQA dataset whose answer is the image's colour, and an adapter trained by `train_adapter`.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from torch import nn

from conftest import png_bytes
from tests_support import assert_4bit_skips_exactly
from vlmtune import cogvlm_compat, families
from vlmtune.config import MergeConfig, TrainConfig
from vlmtune.evaluate import load_adapted_model
from vlmtune.generate import greedy_answers
from vlmtune.merge import merge_adapter
from vlmtune.methods import load_for_training
from vlmtune.models import BaseModelRef, load_model, load_processor
from vlmtune.tokenization import IGNORE_INDEX, dataset_from_rows, encode_batch
from vlmtune.train import train_adapter

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_cogvlm"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
EXPERTS = (
    "self_attn.language_expert_query_key_value", "self_attn.language_expert_dense",
    "self_attn.vision_expert_query_key_value", "self_attn.vision_expert_dense",
    *(f"mlp.{expert}.{projection}" for expert in ("language_mlp", "vision_mlp") for projection in ("gate_proj", "up_proj", "down_proj")),
)
CROSS_ATTENTION = ("cross_attn.query", "cross_attn.key_value", "cross_attn.dense")
# the last layer's vision expert after attention writes only to image positions, which no loss reads: not wrapped
LAST_LAYER_UNREACHED = ("self_attn.vision_expert_dense", *(f"mlp.vision_mlp.{projection}" for projection in ("gate_proj", "up_proj", "down_proj")))
TRAINING = TrainConfig(max_steps=60, batch_size=4, eval_steps=30, learning_rate=1e-2, warmup_ratio=0.0)  # checkpointing on, as by default


def build_base(root: Path, variant: str) -> Path:
    """The fixture copied to `root/variant` (CogAgent's layout for "cogagent"), with seeded random weights saved beside it."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    folder = root / f"tiny_{variant}"  # transformers caches remote code by folder name: one per variant
    shutil.copytree(FIXTURE, folder)
    if variant == "cogagent":
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = ["CogAgentForCausalLM"]
        config["auto_map"]["AutoModelForCausalLM"] = "modeling_tiny_cog.CogAgentForCausalLM"
        config["cross_image_size"] = 56
        (folder / "config.json").write_text(json.dumps(config))
    cogvlm_compat.install_xformers_fallback()  # the fixture's vision code imports xformers
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    # the class itself, not AutoModelForCausalLM.from_config: that one registers the class without the
    # GenerationMixin that from_pretrained adds to remote code, and later loads in this process would get it
    model_class = get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], folder)
    model_class(config).save_pretrained(folder)
    return folder


def colour_rows(processor, n: int, split: str) -> list[dict]:
    names = list(COLORS)
    answers = [names[index % len(names)] for index in range(n)]
    images = [png_bytes((32, 32), color=COLORS[answer]) for answer in answers]
    encoded = encode_batch(processor, ["What color is it?"] * n, answers, images)
    return [
        {"sample_id": f"{split}:{index}", "drop": "colours", "split": split, "image_sha256": f"{split}{index}",
         "image": {"bytes": image, "path": None}, "question": "What color is it?", "answer": answer,
         "answer_type": "other", "question_type": "what color", **example}
        for index, (answer, image, example) in enumerate(zip(answers, images, encoded))
    ]


def base_and_data(root: Path, variant: str) -> BaseModelRef:
    """The variant's base under `root`, with its processor and colour dataset saved beside it."""
    folder = build_base(root, variant)
    processor = load_processor(folder)
    processor.save_pretrained(root / "processor")
    splits = {split: dataset_from_rows(colour_rows(processor, n, split)) for split, n in (("train", 16), ("validation", 4), ("test", 4))}
    datasets.DatasetDict(splits).save_to_disk(str(root / "dataset"))
    return BaseModelRef(str(folder), revision="local", trust_remote_code=True)


@pytest.fixture(scope="module", params=["cogvlm", "cogagent"])
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base = base_and_data(root, request.param)
    logs = []
    summary = train_adapter(base, root / "processor", root / "dataset", root / "adapter", TRAINING, root / "checkpoints", log=logs.append)
    return request.param, root, base, summary, logs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA (and bitsandbytes)")
@pytest.mark.parametrize("variant", ["cogvlm", "cogagent"])
def test_qlora_trains_them_with_their_vision_towers_kept_out_of_4bit(tmp_path, variant):
    pytest.importorskip("bitsandbytes")
    base = base_and_data(tmp_path, variant)
    config = dataclasses.replace(TRAINING, method="qlora")
    model = load_for_training(base, config)
    quantized = {name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"}
    assert quantized and not any({"vision", "cross_vision", "lm_head"} & set(name.split(".")) for name in quantized), sorted(quantized)
    del model
    summary = train_adapter(base, tmp_path / "processor", tmp_path / "dataset", tmp_path / "adapter", config, tmp_path / "checkpoints")
    assert summary["steps"] == config.max_steps
    assert summary["train_loss_last"] < 0.5 * summary["train_loss_first"], summary


def test_without_the_opt_in_it_is_refused(tmp_path):
    folder = build_base(tmp_path, "cogvlm")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_model(BaseModelRef(str(folder)))


def test_family_is_told_by_class_names_as_their_configs_have_no_model_type(trained):
    variant, _, base, _, _ = trained
    model = load_model(base)
    assert getattr(model.config, "model_type", "") == ""
    assert families.family_for(model).name == variant
    assert families.family_for(json.loads((Path(base.model_id) / "config.json").read_text())).name == variant


def test_qlora_keeps_their_vision_towers_out_of_4bit(trained):
    from vlmtune import methods

    variant, _, base, _, _ = trained
    family = methods.base_family(base)  # what load_base_for quantizes by, read from config.json alone
    assert family.name == variant
    skipped = families.quantization_skip_modules(family)
    assert {"vision", "lm_head"} <= set(skipped) and ("cross_vision" in skipped) == (variant == "cogagent")
    assert_4bit_skips_exactly(load_model(base), skipped, kept_out=("vision", "cross_vision", "lm_head"))


def test_loading_patches_their_generation_for_this_transformers(trained):
    _, _, base, _, _ = trained
    model = load_model(base)
    generation_shims = [
        cogvlm_compat.EXTRACT_PAST, cogvlm_compat.UPDATE_MODEL_KWARGS, cogvlm_compat.TOKEN_TYPE_POSITIONS, cogvlm_compat.EMPTY_CACHE_AS_NONE,
    ]
    assert model.vlmtune_shims[0] == cogvlm_compat.XFORMERS_FALLBACK and model.vlmtune_shims[-5:-1] == generation_shims
    assert model.vlmtune_shims[-1] == cogvlm_compat.IMAGES_IN_MODEL_DTYPE
    assert hasattr(model, "generate")  # transformers 5.24 leaves it out on a second load of the class (GENERATION_MIXIN)
    assert cogvlm_compat.patch_generation(model) == generation_shims  # idempotent


def test_an_empty_cache_object_reaches_their_code_as_none(trained):
    """transformers 5.17's generate hands the prompt step an empty DynamicCache as `past_key_values`."""
    from transformers import DynamicCache

    _, _, base, _, _ = trained
    model = load_model(base)
    ids = torch.tensor([[1, 5, 6]])
    inputs = model.prepare_inputs_for_generation(ids, token_type_ids=torch.zeros_like(ids), past_key_values=DynamicCache())
    assert inputs["past_key_values"] is None and inputs["input_ids"].shape == (1, 3)  # the whole prompt, not its last token
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(TypeError, match="tuples"):
        model.prepare_inputs_for_generation(ids, token_type_ids=torch.zeros_like(ids), past_key_values=filled)


def test_float32_images_reach_a_bf16_model_in_its_dtype(trained):
    """As a collator makes them, with no autocast to cast them (generation); found on an H200, where it failed."""
    variant, root, base, _, _ = trained
    from vlmtune.collate import TrainingCollator

    processor = load_processor(root / "processor")
    rows = datasets.load_from_disk(str(root / "dataset"))["train"].select(range(2))
    batch = TrainingCollator(processor)([rows[0], rows[1]])
    assert batch["images"][0][0].dtype == torch.float32
    model = load_model(base, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits.float()).all()
    assert cogvlm_compat.cast_images_for_vision_towers(model, families.family_for(model).vision_modules) == []  # hooked once


def test_the_xformers_stand_in_matches_attention_computed_by_hand():
    query, key, value = (torch.randn(2, 5, 3, 4) for _ in range(3))  # xformers' (batch, length, heads, head_dim)
    weights = torch.softmax(torch.einsum("blhd,bmhd->bhlm", query, key) / 2.0, dim=-1)
    expected = torch.einsum("bhlm,bmhd->blhd", weights, value)
    assert torch.allclose(cogvlm_compat.memory_efficient_attention(query, key, value), expected, atol=1e-5)


def test_lora_wraps_exactly_the_experts_and_cogagents_cross_attention(trained):
    variant, _, base, _, _ = trained
    model = load_for_training(base, TrainConfig(train_projector=True))
    wrapped = {name.removeprefix("base_model.model.") for name, module in model.named_modules() if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)}
    leaves = EXPERTS + (CROSS_ATTENTION if variant == "cogagent" else ())
    expected = {f"model.layers.{layer}.{leaf}" for layer in range(2) for leaf in leaves if not (layer == 1 and leaf in LAST_LAYER_UNREACHED)}
    assert wrapped == expected  # never a vision tower or lm_head
    trained_in_full = {name for name, parameter in model.named_parameters() if parameter.requires_grad and "lora_" not in name}
    assert trained_in_full and all(".vision.linear_proj.modules_to_save." in name for name in trained_in_full)


def test_inputs_follow_their_layout(trained):
    variant, root, _, _, _ = trained
    from vlmtune.collate import TrainingCollator, generation_batch

    processor = load_processor(root / "processor")
    rows = datasets.load_from_disk(str(root / "dataset"))["train"].select(range(2))
    batch = TrainingCollator(processor)([rows[0], rows[1]])
    n_vision = processor.vision_token_count
    assert batch["token_type_ids"][0].tolist() == [0] + [1] * n_vision + [0] * (batch["input_ids"].shape[1] - 1 - n_vision)
    assert tokenizer_text(processor, batch["labels"][0]) == rows[0]["answer"] + "</s>"
    assert len(batch["images"]) == 2 and batch["images"][0][0].shape == (3, 28, 28)
    assert ("cross_images" in batch) == (variant == "cogagent")
    prompts = generation_batch(processor, [rows[0], rows[1]])
    assert prompts["token_type_ids"][0, -rows[0]["prompt_length"] :].tolist()[: n_vision + 1] == [0] + [1] * n_vision


def tokenizer_text(processor, labels: torch.Tensor) -> str:
    return processor.tokenizer.decode([token for token in labels.tolist() if token != IGNORE_INDEX])


def test_training_runs_without_checkpointing_says_so_and_lowers_the_loss(trained):
    _, root, _, summary, logs = trained
    assert any("gradient checkpointing off" in line for line in logs)
    assert summary["gradient_checkpointing"] is False
    assert json.loads((root / "adapter" / "train_config.json").read_text())["gradient_checkpointing"] is False
    assert summary["steps"] == TRAINING.max_steps
    assert summary["train_loss_last"] < 0.5 * summary["train_loss_first"], summary


def test_greedy_generation_answers_with_the_trained_colours(trained):
    _, root, base, _, _ = trained
    processor = load_processor(root / "adapter")
    test = datasets.load_from_disk(str(root / "dataset"))["test"]
    answers, hit_limit = greedy_answers(load_adapted_model(base, root / "adapter"), processor, test, batch_size=4, max_new_tokens=8)
    assert all(isinstance(answer, str) for answer in answers) and len(answers) == test.num_rows
    assert sum(answer == reference for answer, reference in zip(answers, test["answer"])) >= 3, answers
    assert not any(hit_limit)


def test_merged_model_reloads_and_matches_base_plus_adapter(trained):
    variant, root, base, _, _ = trained
    merged = root / f"merged_{variant}"  # one name per variant: transformers caches remote code by folder name
    merged.mkdir()
    report = merge_adapter(base, root / "adapter", root / "dataset", merged, MergeConfig(n_check_samples=4))
    assert report["within_tolerance"] and report["answers_identical"], report
    assert report["merged_weights"] == 2 * len(EXPERTS + (CROSS_ATTENTION if variant == "cogagent" else ())) - len(LAST_LAYER_UNREACHED)
    assert {"modeling_tiny_cog.py", "visual_tiny_cog.py", "model.safetensors"} <= {path.name for path in merged.iterdir()}
    assert type(load_model(BaseModelRef(str(merged), trust_remote_code=True, weights_dir=str(merged)))).__name__ == f"{'CogAgent' if variant == 'cogagent' else 'CogVLM'}ForCausalLM"
    assert type(load_processor(merged)).__name__ == type(load_processor(root / "processor")).__name__


def test_cached_generation_matches_full_forward_passes(trained):
    """The shims must not only let generate() run: its positions and cache must give the logits of a plain forward."""
    from vlmtune.collate import generation_batch
    from vlmtune.generate import _on

    _, root, base, _, _ = trained
    processor = load_processor(root / "adapter")
    model = load_adapted_model(base, root / "adapter")
    rows = list(datasets.load_from_disk(str(root / "dataset"))["test"].select(range(2)))
    rows[1] = {**rows[1], "input_ids": rows[1]["input_ids"][1:], "prompt_length": rows[1]["prompt_length"] - 1}  # ragged: left padding
    rows[1]["input_ids"] = [processor.tokenizer.bos_token_id] + rows[1]["input_ids"]  # keeps BOS first, one prompt token shorter
    device = next(model.parameters()).device
    inputs = {key: _on(device, value) for key, value in generation_batch(processor, rows).items()}  # as greedy_answers moves them
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        sequences, token_types, mask = inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"]
        for step, logits in enumerate(generated.logits):
            expected = model(input_ids=sequences, token_type_ids=token_types, attention_mask=mask, **{k: v for k, v in inputs.items() if "images" in k}).logits[:, -1]
            assert torch.allclose(logits, expected, atol=1e-4), f"step {step}: {(logits - expected).abs().max()}"
            next_token = generated.sequences[:, sequences.shape[1] : sequences.shape[1] + 1]
            sequences, token_types, mask = torch.cat([sequences, next_token], 1), torch.cat([token_types, torch.zeros_like(next_token)], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
