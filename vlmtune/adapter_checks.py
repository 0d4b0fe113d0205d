"""Did LoRA really train? Read back from the saved adapter, not from the training process's word.

A LoRA layer starts with B = 0, so an adapter whose B matrices are still zero changed nothing; and a
target pattern that matched no module trains nothing without an error (unsloth #5039, PEFT #2615).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from safetensors import safe_open

COMPONENTS = (("vision", ("vision_tower", "vision_model", "visual")), ("projector", ("projector", "connector", "merger")))


def adapter_report(adapter_dir: Path) -> dict[str, Any]:
    """Adapted modules per component, LoRA layers still at their initial value, and patterns that matched nothing."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    untrained, modules = [], set()
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as weights:
        for key in weights.keys():
            if ".lora_B." in key:
                module = key.split(".lora_B.")[0]
                modules.add(module)
                if not weights.get_tensor(key).abs().sum().item() > 0:
                    untrained.append(module)
    return {
        "n_lora_modules": len(modules),
        "per_component": dict(sorted(Counter(component_of(module) for module in modules).items())),
        "untrained_modules": sorted(untrained),
        "unmatched_target_patterns": _unmatched(config.get("target_modules"), modules),
    }


def component_of(module_name: str) -> str:
    for component, markers in COMPONENTS:
        if any(marker in module_name for marker in markers):
            return component
    return "language_model"


def _unmatched(targets, modules: set[str]) -> list[str]:
    if not targets:
        return []
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, _peft_name(m)) for m in modules) else [targets]
    return [target for target in targets if not any(_peft_name(m) == target or _peft_name(m).endswith("." + target) for m in modules)]


def _peft_name(saved_key: str) -> str:
    """Saved keys are `base_model.model.<module path>`; PEFT matched targets against the module path."""
    return saved_key.removeprefix("base_model.model.")
