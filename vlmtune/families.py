"""Per-architecture knowledge: where each VLM family keeps its language model, vision tower and
projector, which layers LoRA wraps by default, and how its answers end.

The default LoRA target is found structurally: every `nn.Linear` under the language model that
`get_decoder()` returns (attention and MLP), so `lm_head`, the embeddings and the vision tower are
never wrapped unless asked. The family table only names what structure cannot tell: the vision
tower and projector (frozen / trained in full), the prompt style, and the module names of the
remote-code families (CogVLM, CogAgent), whose decoder layers hold a language and a vision expert
side by side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

PromptStyle = Literal["chat_template", "prefix_suffix", "cogvlm_vqa"]

# CogVLM / CogAgent ship their modeling code on the Hub, written against transformers 4.35 (their model
# cards pin torch 2.1.0 + transformers 4.35.0). From 4.42 their generation breaks (THUDM/CogVLM #517);
# vlmtune.cogvlm_compat patches it. Their code has been run up to 5.24 (README, "CogVLM / CogAgent"):
# a later transformers is refused until it has been run too.
COGVLM_TRANSFORMERS = ">=4.35,<5.25"
# The last layer's vision expert after attention (dense, MLP) writes only to image positions, which no
# loss reads: LoRA there never trains (and `lora_really_trained` refuses it), so it is left out.
_COGVLM_EXPERTS = (
    r"model\.layers\.\d+\.(self_attn\.(language_expert_(query_key_value|dense)|vision_expert_query_key_value)|mlp\.language_mlp\.(gate|up|down)_proj)"
    r"|model\.layers\.(?!{last_layer}\.)\d+\.(self_attn\.vision_expert_dense|mlp\.vision_mlp\.(gate|up|down)_proj)"
)
_COGAGENT_CROSS_ATTENTION = r"model\.layers\.\d+\.cross_attn\.(query|key_value|dense)"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    processor_classes: tuple[str, ...] = ()
    vision_modules: tuple[str, ...] = ()  # frozen; LoRA only with `lora_on_vision`
    projector_modules: tuple[str, ...] = ()  # vision -> language mapping, trained in full with `train_projector`
    prompt_style: PromptStyle = "chat_template"
    lora_targets: str | None = None  # explicit regex where get_decoder() is unavailable (remote code)
    remote_code: bool = False
    class_prefix: str | None = None  # remote code: the configs have no model_type, their class names tell


FAMILIES: tuple[Family, ...] = (
    Family("llava", ("llava",), ("LlavaProcessor",), ("vision_tower",), ("multi_modal_projector",)),
    Family("llava_next", ("llava_next",), ("LlavaNextProcessor",), ("vision_tower",), ("multi_modal_projector",)),
    Family("llava_onevision", ("llava_onevision",), ("LlavaOnevisionProcessor",), ("vision_tower",), ("multi_modal_projector",)),
    Family("idefics3", ("idefics3",), ("Idefics3Processor",), ("vision_model",), ("connector",)),
    Family("smolvlm", ("smolvlm",), ("SmolVLMProcessor",), ("vision_model",), ("connector",)),
    # Qwen's and GLM's projectors live inside the vision module, so they are named by path.
    Family("qwen2_vl", ("qwen2_vl",), ("Qwen2VLProcessor",), ("visual",), ("visual.merger",)),
    Family("qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLProcessor",), ("visual",), ("visual.merger",)),
    # PaliGemma has no chat template: a task prefix ("answer en ...") and the answer as the suffix,
    # with bidirectional attention over the prefix (token_type_ids 0) and causal over the suffix (1).
    Family("paligemma", ("paligemma",), ("PaliGemmaProcessor",), ("vision_tower",), ("multi_modal_projector",), prompt_style="prefix_suffix"),
    Family("glm4v", ("glm4v",), ("Glm4vProcessor",), ("visual",), ("visual.merger", "visual.downsample")),
    Family(
        "cogvlm", ("cogvlm",), ("CogVLMProcessor",), vision_modules=("vision",), projector_modules=("vision.linear_proj",),
        prompt_style="cogvlm_vqa", lora_targets=_COGVLM_EXPERTS, remote_code=True, class_prefix="CogVLM",
    ),
    Family(
        "cogagent", ("cogagent",), ("CogAgentProcessor",), vision_modules=("vision", "cross_vision"), projector_modules=("vision.linear_proj",),
        prompt_style="cogvlm_vqa", lora_targets=f"{_COGVLM_EXPERTS}|{_COGAGENT_CROSS_ATTENTION}", remote_code=True, class_prefix="CogAgent",
    ),
)
GENERIC = Family("generic", ())  # any other VLM: structure alone


def family_for(model_or_config: Any) -> Family:
    """The family of a model, its config or its config.json as a dict: by `model_type`, else (remote code,
    whose configs have none) by the class names in `architectures` / `auto_map`; otherwise the structural defaults."""
    config = getattr(model_or_config, "config", model_or_config)
    field = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    family = family_by_model_type(field("model_type") or "")
    if family is not GENERIC:
        return family
    class_names = [type(model_or_config).__name__, type(config).__name__, *(field("architectures") or [])]
    class_names += [reference.rsplit(".", 1)[-1] for reference in (field("auto_map") or {}).values() if isinstance(reference, str)]
    return next((f for f in FAMILIES if f.class_prefix and any(name.startswith(f.class_prefix) for name in class_names)), GENERIC)


def family_by_model_type(model_type: str) -> Family:
    return next((family for family in FAMILIES if model_type in family.model_types), GENERIC)


def family_of_processor(processor) -> Family:
    name = type(processor).__name__
    return next((family for family in FAMILIES if name in family.processor_classes), GENERIC)


def check_remote_code_support(family: Family, trust_remote_code: bool) -> None:
    """Refuse a remote-code family without the opt-in, or under a transformers its code has not been run on."""
    if not family.remote_code:
        return
    if not trust_remote_code:
        raise ValueError(f"{family.name} runs only through its own Hub code: set trust_remote_code=True to opt in")
    import transformers
    from packaging.specifiers import SpecifierSet

    if transformers.__version__ not in SpecifierSet(COGVLM_TRANSFORMERS):
        raise RuntimeError(
            f"{family.name}'s remote code has been run with transformers{COGVLM_TRANSFORMERS} (its model card pins 4.35.0, "
            f"vlmtune.cogvlm_compat patches its generation from 4.42); this environment has {transformers.__version__}. "
            "Install a transformers in that range (`pip install 'transformers==5.24.0'`); see README, 'CogVLM / CogAgent'."
        )


# --- where things are ---------------------------------------------------------------------------


def language_model_prefix(model: nn.Module) -> str:
    """The dotted name of the language-model submodule, found structurally (works across VLM families)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None:
        for name, module in model.named_modules():
            if module is decoder:
                return name
    raise ValueError(f"cannot find the language model inside {type(model).__name__}")


def lora_target_regex(model: nn.Module, include_vision: bool = False) -> str:
    """A PEFT `target_modules` regex: every linear layer of the language model (never lm_head or embeddings).

    With `include_vision` the vision tower's linear layers join (its projector excluded: that one is
    trained in full or not at all).
    """
    family = family_for(model)
    if family.lora_targets:
        language = family.lora_targets.replace("{last_layer}", str(_last_decoder_layer(model)))
    else:
        language = _linear_layers_under(model, language_model_prefix(model))
    if not include_vision:
        return language
    projectors = {name for name, _ in model.named_modules() if _matches_any(name, family.projector_modules)}
    vision = [
        _linear_layers_under(model, name, exclude=projectors)
        for name in vision_module_names(model)
    ]
    return "|".join([f"(?:{language})", *(f"(?:{regex})" for regex in vision if regex)])


def _last_decoder_layer(model: nn.Module) -> int:
    return max((int(found.group(1)) for name, _ in model.named_modules() if (found := re.fullmatch(r"model\.layers\.(\d+)", name))), default=-1)


def _linear_layers_under(model: nn.Module, prefix: str, exclude: set[str] = frozenset()) -> str:
    leaf_names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and name.startswith(prefix + ".")
            and not any(name == skip or name.startswith(skip + ".") for skip in exclude)
        }
    )
    if not leaf_names:
        if exclude:
            return ""
        raise ValueError(f"no linear layers under {prefix!r}")
    projector_guard = "".join(f"(?!{re.escape(skip[len(prefix) + 1:])}\\.)" for skip in sorted(exclude) if skip.startswith(prefix + "."))
    return rf"{re.escape(prefix)}\.{projector_guard}.*\.({'|'.join(map(re.escape, leaf_names))})"


def vision_module_names(model: nn.Module) -> list[str]:
    """Full dotted names of the vision tower(s) present in `model`."""
    return [name for name, _ in model.named_modules() if _matches_any(name, family_for(model).vision_modules)]


def projector_module_names(model: nn.Module) -> list[str]:
    """The projector's names as PEFT's `modules_to_save` wants them (suffixes of the full names)."""
    family = family_for(model)
    names = [key for key in family.projector_modules if any(_matches_any(name, (key,)) for name, _ in model.named_modules())]
    if names or family is not GENERIC:
        return names
    return sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.rsplit(".", 1)[-1].endswith("projector")})


def quantization_skip_modules(family: Family) -> list[str]:
    """Modules kept out of 4-bit: the vision tower (its features feed every answer), the projector
    (trained in full when asked, which a 4-bit weight cannot be) and lm_head.

    Each name comes twice, as transformers has matched `llm_int8_skip_modules` three ways: 4.x skips
    a module whose full name contains the key followed by a dot; 5.x before 5.24 (5.17 here) one whose
    full name matches the key as a regex from its start, with no boundary after it; 5.24 the same with
    a boundary, or a name that ends with the key. The towers sit under `model.` (`model.vision...`),
    which a bare key misses from 5.0 on, and `.*\\.vision` would also reach CogVLM's language-layer
    experts (`mlp.vision_mlp`) without a boundary: the bare key serves 4.x, and a regex that
    carries its own boundary serves 5.x.
    """
    keys = [*family.vision_modules, *family.projector_modules, "lm_head"]
    return [*keys, *(rf"(?:.*\.)?{re.escape(key)}(?=\.|$)" for key in keys)]


def _matches_any(name: str, keys: tuple[str, ...]) -> bool:
    return any(name == key or name.endswith("." + key) for key in keys)


# --- how answers end -----------------------------------------------------------------------------

_ANSWER_SLOT = "ANSWER_SLOT_5f3c"


@dataclass(frozen=True)
class AnswerFormat:
    prefix: str  # text the template puts between the assistant cue and the answer (" " for LLaVA-1.5, Idefics3)
    end_token: str  # the one token that ends a trained answer


def answer_format(processor) -> AnswerFormat:
    """Where the answer sits in the family's own chat template, and the token that closes the turn.

    Rendered, not tabulated: the template's assistant turn is compared with its generation cue, so the
    end token is whatever the template writes after an answer when that is a special token (Qwen2-VL's
    `<|im_end|>`, Idefics3's `<end_of_utterance>`), and the tokenizer's EOS otherwise (LLaVA-1.5, GLM-4V,
    PaliGemma, which write nothing or plain text there).
    """
    tokenizer = processor.tokenizer
    fallback = AnswerFormat("", tokenizer.eos_token)
    if not getattr(processor, "chat_template", None) or family_of_processor(processor).prompt_style != "chat_template":
        return fallback
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}
    try:
        cue = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    except Exception:
        return fallback
    # Templates differ on whether an assistant turn's content is a list of parts or a string; one that
    # prints a list literally is recognised by the part's own keys showing up around the answer.
    for content in ([{"type": "text", "text": _ANSWER_SLOT}], _ANSWER_SLOT):
        try:
            full = processor.apply_chat_template([user, {"role": "assistant", "content": content}], tokenize=False)
        except Exception:
            continue
        if not full.startswith(cue) or _ANSWER_SLOT not in full[len(cue):]:
            continue
        prefix, after = full[len(cue):].split(_ANSWER_SLOT, 1)
        if "'text'" in prefix or '"text"' in prefix:
            continue
        return AnswerFormat(prefix, _leading_special_token(tokenizer, after) or tokenizer.eos_token)
    return fallback


def _leading_special_token(tokenizer, text: str) -> str | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids and ids[0] in set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {})):
        return tokenizer.convert_ids_to_tokens(ids[0])
    return None
