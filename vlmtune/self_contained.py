"""Can the merged folder be used with transformers alone? What a user loading it would hit first.

A merged model that lost its processor, chat template or generation config still loads its weights
and then answers wrongly or never stops (NeMo Automodel #3256, unsloth #4671).
"""

from __future__ import annotations

from pathlib import Path

from vlmtune import cogvlm
from vlmtune.pinning import PinMismatch, check_pins


def self_contained_problems(merged_dir: Path, expected_pins: dict[str, str]) -> list[str]:
    """Everything missing for a `from_pretrained(path, local_files_only=True)` user; empty when complete."""
    from transformers import AutoProcessor

    merged_dir = Path(merged_dir)
    problems = []
    if pickles := sorted(p.name for p in merged_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")):
        problems.append(f"pickle files {pickles}")
    if not any(merged_dir.glob("*.safetensors")):
        problems.append("no safetensors weights")
    if not (merged_dir / "generation_config.json").is_file():
        problems.append("no generation_config.json: generation would not know when to stop")
    try:
        # CogVLM / CogAgent have no processor class: their tokenizer and config.json's image sizes, as vlmtune.cogvlm reads them
        processor = cogvlm.load_processor(merged_dir) or AutoProcessor.from_pretrained(str(merged_dir), local_files_only=True)
    except Exception as error:  # whatever transformers raises for a missing or broken processor
        return [*problems, f"the processor does not load: {type(error).__name__}: {str(error)[:200]}"]
    try:
        check_pins(processor, expected_pins, "merged model")
    except PinMismatch as mismatch:
        problems.append(str(mismatch))
    return problems
