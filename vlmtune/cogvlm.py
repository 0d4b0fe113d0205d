"""CogVLM / CogAgent inputs, as their remote code's `build_conversation_input_ids` builds them.

These models have no processor: the prompt is `<bos>`, one placeholder (the pad token) per vision
token, then the text; `token_type_ids` route each position to the language (0) or vision (1)
expert. Images are passed separately as `images` (and, for CogAgent, a high-resolution copy as
`cross_images` for its cross-attention), each a list of one normalised tensor per sample. The VQA
template is "Question: {q} Short answer:" (CogAgent prefixes "<EOI>"); the answer ends with EOS.
`CogVLMProcessor` (and `CogAgentProcessor`) stand in for the processor these models do not have:
the tokenizer, the image sizes from the model's config, and the two things the pipeline's generic
stages ask of a processor here (`encode`, `token_type_ids`); it saves and reloads with the tokenizer.
The models themselves run through their remote code, patched by `vlmtune.cogvlm_compat`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmtune.tokenization import IGNORE_INDEX

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vqa_prompt(question: str, cogagent: bool = False) -> str:
    return f"{'<EOI>' if cogagent else ''}Question: {question} Short answer:"


def encode_example(tokenizer, question: str, answer: str, *, image_size: int, patch_size: int, cogagent: bool = False) -> dict[str, Any]:
    """input_ids / token_type_ids / labels for one sample; labels keep only the answer and its EOS."""
    vision_tokens = (image_size // patch_size) ** 2 + 2  # the patch grid plus begin- and end-of-image
    prompt_ids = tokenizer.encode(vqa_prompt(question, cogagent), add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt = [tokenizer.bos_token_id] + [tokenizer.pad_token_id] * vision_tokens + prompt_ids
    token_types = [LANGUAGE_TOKEN_TYPE] + [VISION_TOKEN_TYPE] * vision_tokens + [LANGUAGE_TOKEN_TYPE] * (len(prompt_ids) + len(answer_ids))
    return {
        "input_ids": prompt + answer_ids,
        "token_type_ids": token_types,
        "labels": [IGNORE_INDEX] * len(prompt) + answer_ids,
        "prompt_length": len(prompt),
    }


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Bicubic resize to size x size and CLIP normalisation, as CogVLM's torchvision transform does."""
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(size, size, 3)
    pixels = pixels.permute(2, 0, 1).float() / 255.0
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


PROCESSOR_FILE = "cogvlm_processor.json"


def load_processor(path: str | Path, revision: str | None = None):
    """The processor saved in `path`, or one built for the CogVLM / CogAgent model there; None for any other model."""
    from transformers import AutoTokenizer, PretrainedConfig

    from vlmtune import families

    saved = Path(path) / PROCESSOR_FILE
    if saved.is_file():
        settings = json.loads(saved.read_text())
        processor_class = PROCESSOR_CLASSES[settings.pop("processor_class")]
        return processor_class(AutoTokenizer.from_pretrained(str(path), trust_remote_code=False), **settings)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        return None  # a processor folder of another family
    config, _ = PretrainedConfig.get_config_dict(str(path), revision=revision)  # read, their code not run
    family = families.family_for(config)
    if family.prompt_style != "cogvlm_vqa":
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=False)  # a tokenizer of its own (Vicuna's)
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"{path} has no tokenizer: THUDM's CogVLM repositories ship none (theirs is Vicuna's, lmsys/vicuna-7b-v1.5). "
            "Copy its tokenizer files into the model folder and pass the folder."
        ) from error
    vision = config["vision_config"]
    cross_image_size = config.get("cross_image_size") if family.name == "cogagent" else None
    processor_class = CogAgentProcessor if family.name == "cogagent" else CogVLMProcessor
    return processor_class(tokenizer, image_size=vision["image_size"], patch_size=vision["patch_size"], cross_image_size=cross_image_size)


@dataclass(frozen=True)
class CogVLMImageProcessor:
    """Their torchvision transform as an image processor: `images` (and CogAgent's `cross_images`), one-tensor lists per sample."""

    image_size: int
    cross_image_size: int | None = None

    def __call__(self, images: list[list[Image.Image]], return_tensors: str = "pt") -> dict[str, list[list[torch.Tensor]]]:
        inputs = {"images": [[image_tensor(image, self.image_size) for image in sample] for sample in images]}
        if self.cross_image_size is not None:
            inputs["cross_images"] = [[image_tensor(image, self.cross_image_size) for image in sample] for sample in images]
        return inputs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CogVLMProcessor:
    """What the pipeline asks of a processor, for CogVLM: its tokenizer, image processor and prompt layout."""

    chat_template = None  # the VQA template is fixed (`vqa_prompt`)

    def __init__(self, tokenizer, *, image_size: int, patch_size: int, cross_image_size: int | None = None):
        self.tokenizer = tokenizer
        self.image_size, self.patch_size, self.cross_image_size = image_size, patch_size, cross_image_size
        self.image_processor = CogVLMImageProcessor(image_size, cross_image_size)

    @property
    def vision_token_count(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 2

    def encode(self, question: str, answer: str) -> dict[str, Any]:
        return encode_example(
            self.tokenizer, question, answer, image_size=self.image_size, patch_size=self.patch_size,
            cogagent=self.cross_image_size is not None,
        )

    def token_type_ids(self, input_ids: torch.Tensor, prompt_lengths: list[int], left_padded: bool) -> torch.Tensor:
        """Vision (1) on each row's image placeholders, right after its BOS; language (0) everywhere else, padding included."""
        token_type_ids = torch.full_like(input_ids, LANGUAGE_TOKEN_TYPE)
        for row, prompt_length in enumerate(prompt_lengths):
            start = (input_ids.shape[1] - prompt_length if left_padded else 0) + 1
            token_type_ids[row, start : start + self.vision_token_count] = VISION_TOKEN_TYPE
        return token_type_ids

    def save_pretrained(self, folder: str | Path) -> None:
        self.tokenizer.save_pretrained(str(folder))
        settings = {"processor_class": type(self).__name__, "image_size": self.image_size, "patch_size": self.patch_size, "cross_image_size": self.cross_image_size}
        (Path(folder) / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2))


class CogAgentProcessor(CogVLMProcessor):
    """CogAgent's: the same, with the high-resolution `cross_images` and the `<EOI>` prompt prefix (`families` tells them apart by class)."""


PROCESSOR_CLASSES = {cls.__name__: cls for cls in (CogVLMProcessor, CogAgentProcessor)}
