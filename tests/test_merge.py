"""The shard-by-shard merge on the tiny LLaVA: keys renamed by transformers 5, DoRA, rsLoRA, modules_to_save."""

import json

import datasets
import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import png_bytes
from vlmtune.config import MergeConfig, TinyModelConfig
from vlmtune.merge import checkpoint_key, merge_adapter, merge_dtype
from vlmtune.families import lora_target_regex
from vlmtune.models import BaseModelRef, build_tiny_vlm
from vlmtune.tokenization import dataset_from_rows, encode_batch


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny base saved as a user would, a dataset with a test split, and a factory for trained-looking adapters."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("merge")
    model, processor = build_tiny_vlm(TinyModelConfig(text_layers=1, vision_layers=1))
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    images = [png_bytes((64, 64), color=color) for color in colors]
    questions = ["What color is the shape?", "Is there a circle?", "What shape is it?"]
    encoded = encode_batch(processor, questions, ["red", "no", "circle"], images)
    rows = [
        {"sample_id": str(i), "drop": "d", "split": "test", "image_sha256": str(i), "image": {"bytes": images[i], "path": None},
         "question": questions[i], "answer": a, "answer_type": "other", "question_type": "what", **encoded[i]}
        for i, a in enumerate(["red", "no", "circle"])
    ]
    test = dataset_from_rows(rows)
    datasets.DatasetDict({"train": test, "test": test}).save_to_disk(str(root / "dataset"))

    def make_adapter(name, **lora_options):
        from transformers import AutoModelForImageTextToText

        base = AutoModelForImageTextToText.from_pretrained(root / "base")
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_regex(base), **lora_options))
        torch.manual_seed(1)
        for parameter_name, parameter in peft_model.named_parameters():
            if "lora_B" in parameter_name or "modules_to_save" in parameter_name:
                parameter.data.normal_(0, 0.05)  # as if trained: B starts at zero
        peft_model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        return root / name

    return root, make_adapter


@pytest.mark.parametrize("options", [{}, {"use_dora": True, "use_rslora": True, "modules_to_save": ["multi_modal_projector"]}])
def test_merged_model_loads_alone_and_matches_base_plus_adapter(tiny_checkpoint, options, tmp_path):
    root, make_adapter = tiny_checkpoint
    adapter_dir = make_adapter(f"adapter-{len(options)}", **options)
    base = BaseModelRef("vlmtune/tiny-easyvqa", weights_dir=str(root / "base"))
    evaluation = {"accuracy": 0.9, "ci95": [0.85, 0.95], "n": 3, "baselines": {"blind": 0.5}}
    summary = merge_adapter(base, adapter_dir, root / "dataset", tmp_path, MergeConfig(n_check_samples=3, max_shard_size_mb=1), evaluation, ["d"])

    assert summary["n_check_samples"] == 3 and summary["answers_identical"] and summary["within_tolerance"]
    assert summary["max_logit_diff"] < 1e-3 and summary["dtype"] == "float32"
    assert summary["merged_weights"] == 7 and summary["replaced_weights"] == (4 if options else 0)  # 7 linear layers in one Llama block
    assert len(summary["weight_files"]) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob(".shard-*"))
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "generation_config.json", "processor_config.json", "README.md"} <= names
    assert "chat_template.jinja" in names or "chat_template" in (tmp_path / "processor_config.json").read_text()
    front_matter = yaml.safe_load((tmp_path / "README.md").read_text().split("---")[1])
    assert front_matter["base_model"] == "vlmtune/tiny-easyvqa" and front_matter["license"] == "apache-2.0"
    assert front_matter["datasets"] == ["d"] and front_matter["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.9


def test_output_shards_stay_under_the_shard_size(tiny_checkpoint, tmp_path):
    root, make_adapter = tiny_checkpoint
    adapter_dir = make_adapter("adapter-shards")
    from vlmtune.merge import merge_checkpoint

    written = merge_checkpoint(root / "base", adapter_dir, tmp_path, torch.float32, max_shard_size_mb=1)
    with safe_open(str(root / "base" / "model.safetensors"), "pt") as handle:
        largest = max(handle.get_tensor(key).nbytes for key in handle.keys())
    # A shard closes before the tensor that would overflow it; only a single tensor larger than the limit exceeds it.
    assert all((tmp_path / name).stat().st_size <= max(2**20, largest) + 2**16 for name in written["weight_files"])


def test_qlora_adapters_merge_in_bf16_and_lora_in_training_precision(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    (tmp_path / "train_config.json").write_text(json.dumps({"method": "lora"}))
    assert merge_dtype(tmp_path, tmp_path / "base", MergeConfig()) == torch.float32
    (tmp_path / "train_config.json").write_text(json.dumps({"method": "lora", "quantization": "4bit"}))
    assert merge_dtype(tmp_path, tmp_path / "base", MergeConfig()) == torch.bfloat16
    assert merge_dtype(tmp_path, tmp_path / "base", MergeConfig(dtype="float16")) == torch.float16


def test_checkpoint_keys_follow_the_names_in_the_file_and_refuse_to_guess():
    keys = [
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "multi_modal_projector.linear_1.weight",
    ]
    assert checkpoint_key("model.language_model.layers.0.self_attn.q_proj.weight", keys) == keys[0]
    assert checkpoint_key("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", keys) == keys[1]
    assert checkpoint_key("model.multi_modal_projector.linear_1.weight", keys) == keys[2]
    with pytest.raises(KeyError):
        checkpoint_key("model.language_model.layers.0.mlp.up_proj.weight", keys)
    with pytest.raises(KeyError, match="several"):
        checkpoint_key("x.self_attn.q_proj.weight", ["a.self_attn.q_proj.weight", "b.self_attn.q_proj.weight"])
