"""The merged model's card: `README.md` with the Hub's YAML front matter, then what a user needs to know.

The front matter names the base model, the data drops, the metrics from the evaluation report,
the LoRA configuration and the license, which is the base model's own (a merged model is a
derivative of its weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vlmtune.models import BaseModelRef, is_tiny_default

PROJECT_LICENSE = "apache-2.0"  # the tiny default is built from a config by this project, under its license
_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "modules_to_save")


def write_model_card(
    out_dir: Path, base: BaseModelRef, base_dir: Path, adapter_dir: Path, evaluation: dict[str, Any], drops: list[str], dtype: str
) -> None:
    adapter_config = _read_json(Path(adapter_dir) / "adapter_config.json")
    train_config = _read_json(Path(adapter_dir) / "train_config.json")
    lora = {key: adapter_config[key] for key in _LORA_FIELDS if key in adapter_config}
    front_matter = {
        "base_model": base.model_id,
        "base_model_relation": "merge" if adapter_config else "finetune",
        "license": base_license(base, base_dir),
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "datasets": drops,
        "tags": ["vlmtune", "lora" if adapter_config else "full-fine-tuning", "merged"],
    }
    if evaluation:
        front_matter["model-index"] = [{
            "name": f"{base.model_id.rsplit('/', 1)[-1]}-vlmtune-merged",
            "results": [{
                "task": {"type": "visual-question-answering", "name": "Visual question answering"},
                "dataset": {"name": ", ".join(drops) or "test split", "type": "vlmtune-drops", "split": "test"},
                "metrics": [
                    {"type": "accuracy", "name": "accuracy", "value": round(evaluation["accuracy"], 4)},
                    *({"type": "accuracy", "name": f"baseline: {name}", "value": round(value, 4)}
                      for name, value in evaluation.get("baselines", {}).items()),
                ],
            }],
        }]
    lines = [
        "---",
        yaml.safe_dump(front_matter, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {base.model_id}, fine-tuned and merged",
        "",
        f"`{base.model_id}` (revision `{base.revision}`) with a {'LoRA adapter merged into its weights' if adapter_config else 'full fine-tune'}, "
        f"trained by vlmtune on the drops {', '.join(f'`{d}`' for d in drops) or '(unknown)'}. "
        f"Weights are safetensors in {dtype}; the processor, chat template and generation config are included.",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        *(["import vlmtune.conv_stem_vision  # registers the tiny default's vision tower (model_type vlmtune_conv_stem_vit)"]
          if is_tiny_default(base.model_id) else []),
        "",
        'model = AutoModelForImageTextToText.from_pretrained("path/to/this/folder")',
        'processor = AutoProcessor.from_pretrained("path/to/this/folder")',
        "```",
    ]
    if evaluation:
        low, high = evaluation.get("ci95", [float("nan")] * 2)
        lines += ["", "## Evaluation (test split)", ""]
        if "adapter_version" in evaluation:
            lines += [f"Of adapter version `{evaluation['adapter_version']}`, the one merged here "
                      f"(evaluation report `{evaluation['report_version']}`, passed by the `ready_to_ship` gate).", ""]
        lines += ["| model | accuracy |", "|---|---|",
                  f"| this model | {evaluation['accuracy']:.1%} (95 % CI {low:.1%} – {high:.1%}, n = {evaluation['n']}) |"]
        lines += [f"| baseline: {name} | {value:.1%} |" for name, value in evaluation.get("baselines", {}).items()]
    if lora:
        lines += ["", "## LoRA configuration", "", "```json", json.dumps(lora, indent=2), "```"]
    if train_config:
        lines += ["", "## Training configuration", "", "```json", json.dumps(train_config, indent=2), "```"]
    (Path(out_dir) / "README.md").write_text("\n".join(lines) + "\n")


def base_license(base: BaseModelRef, base_dir: Path) -> str:
    """The license in the base model's own card, or this project's for the tiny default it builds."""
    card = Path(base_dir) / "README.md"
    if card.is_file():
        text = card.read_text()
        if text.startswith("---"):
            front = yaml.safe_load(text.split("---", 2)[1]) or {}
            if front.get("license"):
                return str(front["license"])
    if is_tiny_default(base.model_id):
        return PROJECT_LICENSE
    return "other"  # the base states none we can read: the user must check it before publishing


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
