"""One chat template and one pixel budget per base model, checked wherever a processor is used.

Training, evaluation and the merged model must format prompts and resize images exactly as the
tokenized dataset did; a silent difference (a re-saved processor with another template, a changed
`max_pixels`) degrades a model without any error (LLaMA-Factory #5489, Qwen3-VL #2024). The
fingerprint is taken from what the processor does, not from its files, so a re-save is no change.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Keys of an image processor's config that do not change its output.
_IRRELEVANT = {"processor_class", "image_processor_type", "_processor_class"}


def processor_pins(processor) -> dict[str, str]:
    """Hashes of the chat template, the image preprocessing (pixel budget included) and the tokenizer."""
    image_config = {key: value for key, value in processor.image_processor.to_dict().items() if key not in _IRRELEVANT}
    tokenizer = processor.tokenizer
    vocabulary = sorted(tokenizer.get_vocab().items())
    return {
        "chat_template_sha256": _sha(getattr(processor, "chat_template", None) or ""),
        "image_processor_sha256": _sha(json.dumps(image_config, sort_keys=True, default=str)),
        "tokenizer_sha256": _sha(json.dumps([vocabulary, tokenizer.all_special_tokens], default=str)),
    }


def check_pins(processor, expected: dict[str, str], where: str) -> None:
    """Raise if `processor` formats or resizes differently from what the dataset was tokenized with."""
    actual = processor_pins(processor)
    differing = sorted(key for key in expected if actual.get(key) != expected[key])
    if differing:
        raise PinMismatch(f"{where}: the processor differs from the one the dataset was tokenized with ({', '.join(differing)})")


class PinMismatch(RuntimeError):
    pass


def _sha(text: Any) -> str:
    return hashlib.sha256(str(text).encode()).hexdigest()
