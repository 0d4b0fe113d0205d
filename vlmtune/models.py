"""Base models: the tiny offline default built from a config, and any Hugging Face VLM by id or path.

The tiny default is a real LLaVA (`LlavaForConditionalGeneration`: CLIP vision tower behind a
convolutional stem (vlmtune.conv_stem_vision), projector, Llama language model) with a byte-level tokenizer, so everything downstream of it (processor,
chat template, PEFT, `AutoModelForImageTextToText.from_pretrained`) is the same code a real
model goes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmtune import families
from vlmtune.config import TINY_MODEL_ID, TinyModelConfig
from vlmtune.conv_stem_vision import ConvStemVisionConfig  # registers the tiny default's vision tower with the Auto classes

IMAGE_TOKEN = "<image>"
# The tiny model's conversation format, kept short because every byte is a token.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>{{ '\\n' }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class BaseModelRef:
    """Where the base weights come from: a hub id or local path with its revision, or a built folder."""

    model_id: str
    revision: str | None = None
    trust_remote_code: bool = False
    weights_dir: str | None = None  # set when the pipeline built the weights itself (the tiny default)

    @property
    def load_path(self) -> str:
        return self.weights_dir or self.model_id

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "weights_dir": self.weights_dir,
        }


def is_tiny_default(model_id: str) -> bool:
    return model_id == TINY_MODEL_ID


def load_model(ref: BaseModelRef, dtype: torch.dtype = torch.float32, quantization_config=None) -> nn.Module:
    """The base model; remote-code families (CogVLM, CogAgent) only when `ref.trust_remote_code` is set, and
    patched for the installed transformers (`vlmtune.cogvlm_compat`; the shims applied are in `model.vlmtune_shims`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    revision = None if ref.weights_dir else ref.revision
    # config.json is read before any of its code runs, so a remote-code family is refused with our reason, not transformers'
    family = base_family(ref)
    families.check_remote_code_support(family, ref.trust_remote_code)
    shims = []
    if family.remote_code:
        from vlmtune import cogvlm_compat

        shims += [cogvlm_compat.XFORMERS_FALLBACK] if cogvlm_compat.install_xformers_fallback() else []
    config = AutoConfig.from_pretrained(ref.load_path, revision=revision, trust_remote_code=ref.trust_remote_code)
    # CogVLM's remote code registers itself only as a causal LM (its `auto_map` has no image-text-to-text entry).
    auto_map = getattr(config, "auto_map", None) or {}
    auto_class = AutoModelForCausalLM if "AutoModelForCausalLM" in auto_map and "AutoModelForImageTextToText" not in auto_map else AutoModelForImageTextToText
    model = auto_class.from_pretrained(
        ref.load_path,
        revision=revision,
        trust_remote_code=ref.trust_remote_code,
        dtype=dtype,
        quantization_config=quantization_config,
    )
    if family.remote_code:
        model.vlmtune_shims = shims + cogvlm_compat.patch_generation(model) + cogvlm_compat.cast_images_for_vision_towers(model, family.vision_modules)
    return model


def base_family(ref: BaseModelRef) -> families.Family:
    """The family from config.json alone, none of its code run: remote-code configs (CogVLM) have no model_type, their class names tell."""
    from transformers import PretrainedConfig

    revision = None if ref.weights_dir else ref.revision
    return families.family_for(PretrainedConfig.get_config_dict(ref.load_path, revision=revision)[0])


def load_processor(path: str | Path, *, revision: str | None = None, trust_remote_code: bool = False):
    """The model's processor; for CogVLM / CogAgent, which have none, vlmtune.cogvlm's stand-in."""
    from transformers import AutoProcessor

    from vlmtune import cogvlm

    cogvlm_processor = cogvlm.load_processor(path, revision=revision)
    if cogvlm_processor is not None:
        return cogvlm_processor
    return AutoProcessor.from_pretrained(str(path), revision=revision, trust_remote_code=trust_remote_code)


def build_tiny_vlm(config: TinyModelConfig):
    """A randomly initialised tiny LLaVA and its processor, from config alone (nothing downloaded)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if config.vision_stem not in ("conv", "patch"):
        raise ValueError(f"vision_stem={config.vision_stem!r}: choose 'conv' (convolutional stem) or 'patch' (CLIP's patch embedding)")
    processor = build_tiny_processor(config)
    tokenizer = processor.tokenizer
    vision = dict(
        hidden_size=config.vision_hidden,
        intermediate_size=4 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    model_config = LlavaConfig(
        vision_config=ConvStemVisionConfig(stem_channels=config.stem_channels, **vision) if config.vision_stem == "conv" else CLIPVisionConfig(**vision),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=4 * config.text_hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.heads,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(config.image_size // config.patch_size) ** 2,
        vision_feature_layer=-1,  # with two vision layers the last one is the useful one
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(model_config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor


def build_tiny_processor(config: TinyModelConfig):
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = byte_level_tokenizer(
        ["<pad>", "<s>", "</s>", IMAGE_TOKEN], pad="<pad>", bos="<s>", eos="</s>", image_token=IMAGE_TOKEN
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped again by the "default" strategy
        chat_template=TINY_CHAT_TEMPLATE,
    )


def byte_level_tokenizer(specials: list[str], *, pad: str | None, bos: str | None, eos: str, **named_tokens: str):
    """A fast tokenizer with no learned merges: each UTF-8 byte is one token, `specials` come first.

    Any text is representable and nothing needs downloading; `named_tokens` (image_token=...) become
    tokenizer attributes the way a hub processor's `extra_special_tokens` do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        extra_special_tokens=named_tokens,
        model_max_length=512,  # only a warning threshold; the tokenize stage enforces its own budget
    )


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
