import json

import torch
from safetensors.torch import load_file, save_file

from vlmtune.adapter_checks import adapter_report
from vlmtune.config import TinyModelConfig, TrainConfig
from vlmtune.models import build_tiny_vlm
from vlmtune.methods import apply_lora


def saved_adapter(tmp_path, train=True):
    model, _ = build_tiny_vlm(TinyModelConfig())
    model = apply_lora(model, TrainConfig())
    if train:  # stand-in for an optimizer step: every B moves off zero
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.add_(0.01)
    model.save_pretrained(str(tmp_path))
    return tmp_path


def test_a_trained_adapter_passes_and_counts_its_modules(tmp_path):
    report = adapter_report(saved_adapter(tmp_path))
    assert report["untrained_modules"] == [] and report["unmatched_target_patterns"] == []
    assert report["per_component"] == {"language_model": 14}  # 2 layers x 7 linear layers, vision tower untouched


def test_an_untrained_layer_is_named(tmp_path):
    path = saved_adapter(tmp_path)
    weights = load_file(str(path / "adapter_model.safetensors"))
    victim = sorted(key for key in weights if "lora_B" in key)[0]
    weights[victim] = torch.zeros_like(weights[victim])
    save_file(weights, str(path / "adapter_model.safetensors"))
    assert adapter_report(path)["untrained_modules"] == [victim.split(".lora_B.")[0]]


def test_a_target_pattern_that_matched_nothing_is_named(tmp_path):
    path = saved_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "query_key_value"]  # the second exists only in CogVLM
    (path / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_report(path)["unmatched_target_patterns"] == ["query_key_value"]


def test_a_warm_start_loads_every_saved_tensor_or_fails(tmp_path):
    import pytest

    from vlmtune.train import load_warm_start

    path = saved_adapter(tmp_path)
    model, _ = build_tiny_vlm(TinyModelConfig())
    warm = load_warm_start(model, path)
    assert any(p.requires_grad for n, p in warm.named_parameters() if "lora_" in n), "a warm start keeps training"

    weights = load_file(str(path / "adapter_model.safetensors"))
    key = sorted(weights)[0]
    weights[key.replace("layers.0.", "layers.7.")] = weights.pop(key)  # a layer this model does not have
    save_file(weights, str(path / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="did not load"):
        load_warm_start(build_tiny_vlm(TinyModelConfig())[0], path)
