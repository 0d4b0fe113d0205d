"""CogVLM's / CogAgent's Hub code, made to run on the transformers installed here.

Their remote code was written for transformers 4.35 (the model cards pin 4.35.0) and still uses the
generation API of that time: tuple key/value caches, an `_update_model_kwargs_for_generation`
override that calls `GenerationMixin._extract_past_from_model_output(standardize_cache_format=...)`,
and a `prepare_inputs_for_generation` that builds CogVLM's own position ids from `token_type_ids`.
Forward, backward and LoRA training run unchanged on transformers 4.41 to 5.24; `generate()` does
not from 4.42 on (THUDM/CogVLM #517). `patch_generation` gives their class back what it expects,
and only what the installed transformers has taken away. Their vision towers call xformers, which
has no CPU kernel and may not be installed: `install_xformers_fallback` stands in for it with torch's
scaled-dot-product attention.

Nothing here edits their files: the patches are attributes set on the loaded model's class.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

XFORMERS_FALLBACK = "xformers_sdpa_fallback"
EXTRACT_PAST = "extract_past_from_model_output"
UPDATE_MODEL_KWARGS = "update_model_kwargs_for_generation"
TOKEN_TYPE_POSITIONS = "token_type_position_ids"
GENERATION_MIXIN = "generation_mixin"
EMPTY_CACHE_AS_NONE = "empty_cache_object_as_none"
IMAGES_IN_MODEL_DTYPE = "images_in_vision_tower_dtype"
_APPLIED = "_vlmtune_generation_shims"


def install_xformers_fallback() -> bool:
    """Make `import xformers.ops` work where xformers is not installed; True when the stand-in is in place.

    Their vision code imports xformers at module level, and transformers refuses to load a remote
    module whose imports are missing, so the stand-in must be registered before the model is loaded.
    It is a module of this package's own (`memory_efficient_attention` only), never a real xformers.
    """
    installed = sys.modules.get("xformers")
    if installed is not None:
        return getattr(installed, "__vlmtune_fallback__", False)
    if importlib.util.find_spec("xformers") is not None:
        return False
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package = types.ModuleType("xformers")
    package.__path__ = []  # a package, so `import xformers.ops` resolves through sys.modules
    package.ops = ops
    package.__vlmtune_fallback__ = True
    sys.modules["xformers"], sys.modules["xformers.ops"] = package, ops
    return True


def memory_efficient_attention(query, key, value, attn_bias=None, p: float = 0.0, scale: float | None = None, op=None):
    """`xformers.ops.memory_efficient_attention` on (batch, length, heads, head_dim) tensors, through torch SDPA.

    Only what their vision towers pass: no bias, or a tensor bias; xformers' block-diagonal masks are refused.
    """
    if attn_bias is not None and not isinstance(attn_bias, torch.Tensor):
        raise NotImplementedError(f"the xformers stand-in takes no {type(attn_bias).__name__}; install xformers")
    output = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_bias, dropout_p=p, scale=scale
    )
    return output.transpose(1, 2)


def patch_generation(model: nn.Module) -> list[str]:
    """Patch the class of a loaded CogVLM / CogAgent so its `generate()` runs here; returns the shims applied.

    Idempotent: a class is patched once, and the names recorded on it are returned again.
    """
    from transformers.generation.utils import GenerationMixin

    mixin = []
    if not isinstance(model, GenerationMixin):
        # Their classes do not inherit GenerationMixin; transformers adds it to remote code it loads, but
        # (5.24) only on the first load of a class in a process: the second comes back without `generate`.
        from transformers import GenerationConfig

        model.__class__ = _with_generation_mixin(type(model))
        if getattr(model, "generation_config", None) is None:
            model.generation_config = GenerationConfig.from_model_config(model.config)
        mixin = [GENERATION_MIXIN]
    cls = type(model)
    if _APPLIED in cls.__dict__:
        return mixin + list(cls.__dict__[_APPLIED])
    applied = []
    if _lacks_extract_past(cls):
        cls._extract_past_from_model_output = _extract_past_from_model_output
        applied.append(EXTRACT_PAST)
    # From 4.42 generate calls the update with its own arguments (`num_new_tokens`), and transformers 5
    # leaves an all-ones attention mask in the kwargs as None.
    if not _takes_standardize_cache_format(GenerationMixin._update_model_kwargs_for_generation):
        applied += _wrap(cls, "_update_model_kwargs_for_generation", _with_their_update_arguments, UPDATE_MODEL_KWARGS)
    if hasattr(GenerationMixin, "_prepare_position_ids_for_generation"):
        applied += _wrap(cls, "prepare_inputs_for_generation", _with_token_type_positions, TOKEN_TYPE_POSITIONS)
    # Where generate makes a Cache object up front (transformers 5), 5.17 hands it to the model as
    # `past_key_values` at the prompt step, where their code wants None and builds its tuples; 5.24 passes
    # it as `cache`, which their code never reads. Harmless where no Cache arrives.
    if hasattr(GenerationMixin, "_prepare_cache_for_generation"):
        applied += _wrap(cls, "prepare_inputs_for_generation", _with_empty_cache_as_none, EMPTY_CACHE_AS_NONE)
    setattr(cls, _APPLIED, tuple(applied))
    return mixin + applied


def cast_images_for_vision_towers(model: nn.Module, vision_modules: tuple[str, ...]) -> list[str]:
    """Images reach each vision tower in its weights' dtype; returns the shim's name once a tower is hooked.

    Their vision towers take images in whatever dtype they come (their README casts them to bf16 by
    hand), so float32 pixels from a collator fail against a bf16 model as soon as no autocast runs:
    generation, and training where the Trainer leaves a bf16 model un-autocast.
    """
    hooked = False
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in vision_modules and not getattr(module, "_vlmtune_casts_images", False):
            module.register_forward_pre_hook(_cast_floating_inputs)
            module._vlmtune_casts_images = hooked = True
    return [IMAGES_IN_MODEL_DTYPE] if hooked else []


def _cast_floating_inputs(module: nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters()).dtype
    return tuple(arg.to(dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg for arg in args)


@functools.cache
def _with_generation_mixin(cls: type) -> type:
    from transformers.generation.utils import GenerationMixin

    return type(cls.__name__, (cls, GenerationMixin), {"__module__": cls.__module__})


def _wrap(cls: type, name: str, make_wrapper, shim: str) -> list[str]:
    """Wrap the class's own override of a GenerationMixin method, once (a subclass inherits the wrapper)."""
    from transformers.generation.utils import GenerationMixin

    method = getattr(cls, name)
    if method is getattr(GenerationMixin, name):
        return []
    done = getattr(method, "__vlmtune_shims__", ())
    if shim not in done:
        wrapper = make_wrapper(method)
        wrapper.__vlmtune_shims__ = (*done, shim)
        setattr(cls, name, wrapper)
    return [shim]


def _lacks_extract_past(cls: type) -> bool:
    """transformers 4.42 dropped the `standardize_cache_format` argument their override passes, and a later
    release the method itself (THUDM/CogVLM #517)."""
    method = getattr(cls, "_extract_past_from_model_output", None)
    return method is None or not _takes_standardize_cache_format(method)


def _extract_past_from_model_output(self, outputs, standardize_cache_format: bool = False):
    # Their cache is a tuple per layer, returned as is: there is no other format to standardize to.
    return getattr(outputs, "past_key_values", None)


def _takes_standardize_cache_format(method) -> bool:
    return "standardize_cache_format" in inspect.signature(method).parameters


def _with_their_update_arguments(update):
    """Their update with the arguments it was written for. It concatenates a ones column to
    `model_kwargs["attention_mask"]` whenever the key is there, and transformers 5 leaves the key there
    as None when no prompt of the batch is padded."""

    @functools.wraps(update)
    def wrapper(self, outputs, model_kwargs, is_encoder_decoder=False, standardize_cache_format=False, **ignored):
        if "attention_mask" in model_kwargs and model_kwargs["attention_mask"] is None:
            del model_kwargs["attention_mask"]
        return update(self, outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, standardize_cache_format=standardize_cache_format)

    return wrapper


def _with_empty_cache_as_none(prepare):
    """Their `prepare_inputs_for_generation` given None for an empty transformers Cache: their code tells
    the prompt step by `past_key_values is None` and indexes a cache as tuples after it."""
    from transformers.cache_utils import Cache

    @functools.wraps(prepare)
    def wrapper(self, *args, **kwargs):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, Cache):
            if cache.get_seq_length() > 0:
                raise TypeError(f"{type(self).__name__}'s remote code keeps its cache as tuples; it cannot continue a {type(cache).__name__}")
            kwargs["past_key_values"] = None
        return prepare(self, *args, **kwargs)

    return wrapper


def _with_token_type_positions(prepare):
    """transformers 5's `generate` puts `position_ids` made from the attention mask into the model kwargs,
    and their `prepare_inputs_for_generation` uses any it is given, never extending them; CogVLM's
    positions advance only at an image's boundaries (`build_position_ids` from `token_type_ids`), so
    theirs must be built, as transformers 4.35 left them to."""

    @functools.wraps(prepare)
    def wrapper(self, *args, **kwargs):
        kwargs.pop("position_ids", None)
        return prepare(self, *args, **kwargs)

    return wrapper
