"""Stage 6: fold the adapter into the base weights, shard by shard, and prove the merged model answers the same.

The base checkpoint is streamed one tensor at a time from its safetensors shards; each LoRA delta
(B @ A · scaling, DoRA's magnitude rescaling where used) is added to its weight in float32 and the
result cast to the merge dtype, and output shards are written as they fill. Peak memory is one
output shard plus the adapter, whatever the model's size.

The merge dtype is the precision the adapter was trained against: float32 master weights for LoRA,
bf16 / fp16 for QLoRA. A QLoRA adapter is merged into the original (unquantized) checkpoint read
from disk, never into 4-bit weights: rounding the merged weights to 4 bits again silently loses
what the adapter learned.

The merged folder holds safetensors shards (never pickle), `config.json`, the generation config,
the processor with its chat template and a model card, so `AutoModelForImageTextToText.from_pretrained(path)`
loads it with no project code. It is reloaded from disk that way and compared with base + adapter.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmtune.config import MergeConfig, as_dict
from vlmtune.evaluate import load_adapted_model
from vlmtune.generate import greedy_answers, teacher_forced_logits
from vlmtune.model_card import write_model_card
from vlmtune.models import BaseModelRef, load_model, load_processor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest |logit| difference accepted between merged and base + adapter: float rounding of the merged weights.
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}
INDEX_FILE = "model.safetensors.index.json"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")


def merge_adapter(
    base: BaseModelRef,
    adapter_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    config: MergeConfig,
    evaluation: dict[str, Any] | None = None,
    drops: list[str] | None = None,
) -> dict[str, Any]:
    """Write the merged model into `out_dir` and compare it, reloaded from disk, with base + adapter."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base_dir = base_checkpoint_dir(base)
    dtype = merge_dtype(adapter_dir, base_dir, config)
    # A `method="full"` run saved a whole model: it is re-sharded and checked like a merge, with no delta to add.
    is_adapter = (adapter_dir / "adapter_config.json").is_file()
    source_dir = base_dir if is_adapter else adapter_dir
    written = merge_checkpoint(source_dir, adapter_dir if is_adapter else None, out_dir, dtype, config.max_shard_size_mb)
    processor = load_processor(adapter_dir)
    _write_configs(source_dir, out_dir, dtype, processor, base.trust_remote_code)
    processor.save_pretrained(str(out_dir))
    (out_dir / "merge_config.json").write_text(json.dumps(as_dict(config) | {"resolved_dtype": str(dtype).removeprefix("torch.")}, indent=2))
    write_model_card(out_dir, base, base_dir, adapter_dir, evaluation or {}, drops or [], str(dtype).removeprefix("torch."))

    splits = datasets.load_from_disk(str(dataset_dir))
    check_rows = splits["test"].select(range(min(config.n_check_samples, splits["test"].num_rows)))
    equivalence = check_equivalence(base, adapter_dir, out_dir, processor, check_rows, dtype)
    tolerance = config.max_logit_diff if config.max_logit_diff is not None else LOGIT_TOLERANCE[dtype]
    return {
        **equivalence,
        "dtype": str(dtype).removeprefix("torch."),
        "tolerance": tolerance,
        "within_tolerance": equivalence["max_logit_diff"] <= tolerance,
        **written,
    }


def merge_dtype(adapter_dir: Path, base_dir: Path, config: MergeConfig) -> torch.dtype:
    """The configured dtype, or for "auto" the precision of training: fp32 for LoRA, bf16 / fp16 for QLoRA."""
    if config.dtype != "auto":
        return DTYPES[config.dtype]
    if not _was_quantized(adapter_dir):
        return torch.float32  # train.py keeps fp32 master weights; bf16 is only the autocast compute dtype
    base_config = json.loads((base_dir / "config.json").read_text())
    stored = base_config.get("dtype") or base_config.get("torch_dtype") or (base_config.get("text_config") or {}).get("dtype")
    return torch.float16 if stored == "float16" else torch.bfloat16


def merge_checkpoint(base_dir: Path, adapter_dir: Path | None, out_dir: Path, dtype: torch.dtype, max_shard_size_mb: int) -> dict[str, Any]:
    """Stream the base checkpoint into `out_dir` in `dtype`, adding the adapter's deltas; return what was written."""
    shards = checkpoint_shards(base_dir)
    keys = [key for shard in shards for key in _keys(shard)]
    plan = merge_plan(adapter_dir, keys) if adapter_dir else MergePlan({}, {})
    max_bytes = max_shard_size_mb * 2**20
    buffer: dict[str, torch.Tensor] = {}
    written: list[list[str]] = []
    buffered_bytes, merged_keys = 0, 0
    for key, tensor in _stream(shards):
        if key in plan.lora:
            tensor, merged_keys = apply_lora(tensor, plan.lora[key]), merged_keys + 1
        elif key in plan.replaced:
            tensor = plan.replaced[key]
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if buffer and buffered_bytes + tensor.nbytes > max_bytes:
            written.append(_flush(buffer, out_dir, len(written)))
            buffer, buffered_bytes = {}, 0
        buffer[key] = tensor.contiguous()
        buffered_bytes += tensor.nbytes
    if buffer:
        written.append(_flush(buffer, out_dir, len(written)))
    files = _name_shards(out_dir, written)
    return {
        "merged_weights": merged_keys,
        "replaced_weights": len(plan.replaced),
        "weight_files": files,
        "size_bytes": sum((out_dir / name).stat().st_size for name in files),
    }


@dataclass(frozen=True)
class MergePlan:
    """What happens to base checkpoint keys: a LoRA delta is added, or the tensor replaced (PEFT `modules_to_save`)."""

    lora: dict[str, dict[str, Any]]
    replaced: dict[str, torch.Tensor]


def merge_plan(adapter_dir: Path, checkpoint_keys: list[str]) -> MergePlan:
    """Match each adapted module to the checkpoint key of its weight, with the module's scaling."""
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise NotImplementedError(f"only LoRA adapters can be merged, not {adapter_config['peft_type']}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        name = key.removeprefix(_PEFT_PREFIX)
        if match := _LORA_KEY.match(name):
            modules.setdefault(match["module"], {})[match["part"]] = tensor
        elif "lora_" in name or "trainable_tokens" in name:
            raise NotImplementedError(f"adapter weight {key!r} (LoRA on embeddings or convolutions, trainable tokens) cannot be merged here")
        else:
            replaced[checkpoint_key(name, checkpoint_keys)] = tensor
    lora: dict[str, dict[str, Any]] = {}
    for module, parts in modules.items():
        rank = _pattern_value(adapter_config.get("rank_pattern") or {}, module, adapter_config.get("r", parts["lora_A.weight"].shape[0]))
        alpha = _pattern_value(adapter_config.get("alpha_pattern") or {}, module, adapter_config.get("lora_alpha", rank))
        scaling = alpha / rank**0.5 if adapter_config.get("use_rslora") else alpha / rank
        lora[checkpoint_key(f"{module}.weight", checkpoint_keys)] = {
            "scaling": scaling, "fan_in_fan_out": bool(adapter_config.get("fan_in_fan_out")), **parts
        }
        if "lora_B.bias" in parts:  # PEFT's lora_bias: the base bias moves by B's bias, scaled
            lora[checkpoint_key(f"{module}.bias", checkpoint_keys)] = {"bias_delta": parts["lora_B.bias"].float() * scaling}
    return MergePlan(lora, replaced)


def apply_lora(weight: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """W + B @ A · scaling in float32 (PEFT's Linear merge), DoRA's magnitude rescaling where the adapter has one."""
    if "bias_delta" in entry:
        return weight.float() + entry["bias_delta"]
    delta = (entry["lora_B.weight"].float() @ entry["lora_A.weight"].float()) * entry["scaling"]
    if entry["fan_in_fan_out"]:
        delta = delta.T
    merged = weight.float() + delta
    if "lora_magnitude_vector" in entry:
        # DoRA: each output row is rescaled to its learned magnitude (PEFT's DoraLinearLayer.get_weight_norm).
        oriented = merged.T if entry["fan_in_fan_out"] else merged
        factor = entry["lora_magnitude_vector"].float() / torch.linalg.norm(oriented, dim=1)
        merged = (oriented * factor.view(-1, 1)).T if entry["fan_in_fan_out"] else oriented * factor.view(-1, 1)
    return merged


def checkpoint_key(param_name: str, checkpoint_keys: list[str]) -> str:
    """The key under which the checkpoint stores a model parameter.

    Module names and saved keys can differ (transformers 5 loads LLaVA's `language_model.model.layers.0...`
    as `model.language_model.layers.0...`), so the key is found among the names the safetensors files
    actually hold: the longest common dotted suffix, then the most shared prefix components. An
    ambiguous or missing match is an error, never a guess.
    """
    if param_name in checkpoint_keys:
        return param_name
    parts = param_name.split(".")

    def score(key: str) -> tuple[int, int]:
        other = key.split(".")
        suffix = 0
        while suffix < min(len(parts), len(other)) and parts[-1 - suffix] == other[-1 - suffix]:
            suffix += 1
        prefix, other_prefix = set(parts[: len(parts) - suffix]), set(other[: len(other) - suffix])
        return suffix, len(prefix & other_prefix) - len(prefix ^ other_prefix)

    scored = sorted(((score(key), key) for key in checkpoint_keys), reverse=True)
    if not scored or scored[0][0][0] < 2:
        raise KeyError(f"no checkpoint key for parameter {param_name!r}")
    if len(scored) > 1 and scored[1][0] == scored[0][0]:
        raise KeyError(f"parameter {param_name!r} matches several checkpoint keys: {scored[0][1]!r}, {scored[1][1]!r}")
    return scored[0][1]


@torch.inference_mode()
def check_equivalence(base: BaseModelRef, adapter_dir: Path, merged_dir: Path, processor, rows: datasets.Dataset, dtype: torch.dtype) -> dict[str, Any]:
    """Merged (loaded as a user would) against base + adapter, both in `dtype`: logits on real tokens, greedy answers."""
    if len(rows) == 0:
        return {"n_check_samples": 0, "max_logit_diff": 0.0, "mean_logit_diff": 0.0, "answers_identical": True, "answers_agreeing": 0}
    adapted = load_adapted_model(base, adapter_dir, dtype=dtype)
    reference_logits, labels = teacher_forced_logits(adapted, processor, rows)
    reference_answers, _ = greedy_answers(adapted, processor, rows, batch_size=len(rows), max_new_tokens=16)
    del adapted
    merged = load_standalone(merged_dir, dtype, base.trust_remote_code)
    merged_logits, _ = teacher_forced_logits(merged, processor, rows)
    merged_answers, _ = greedy_answers(merged, processor, rows, batch_size=len(rows), max_new_tokens=16)
    real_tokens = _real_tokens(rows, labels.shape)
    difference = (reference_logits - merged_logits).abs()[real_tokens]
    return {
        "n_check_samples": len(rows),
        "max_logit_diff": float(difference.max()),
        "mean_logit_diff": float(difference.mean()),
        "answers_identical": reference_answers == merged_answers,
        "answers_agreeing": sum(a == b for a, b in zip(reference_answers, merged_answers)),
    }


def load_standalone(path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load exactly as a user would: transformers only, nothing fetched, no project code.

    A remote-code model (CogVLM) loads as a user of this transformers must load it: with its own
    code, patched by vlmtune.cogvlm_compat (`vlmtune.models.load_model`).
    """
    from transformers import AutoModelForImageTextToText

    if trust_remote_code:
        model = load_model(BaseModelRef(str(path), trust_remote_code=True, weights_dir=str(path)), dtype)
        return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def base_checkpoint_dir(base: BaseModelRef) -> Path:
    """The local folder of the base checkpoint: the built weights, a local path, or the hub snapshot."""
    for candidate in (base.weights_dir, base.model_id):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base.model_id, revision=base.revision, allow_patterns=["*.json", "*.safetensors", "*.jinja", "README.md"]))


def checkpoint_shards(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has no safetensors checkpoint; the merge reads safetensors only")
    return [single]


def _keys(shard: Path) -> list[str]:
    with safe_open(str(shard), framework="pt") as handle:
        return list(handle.keys())


def _stream(shards: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor at a time, shard after shard: never more than one base tensor in memory."""
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


def _flush(buffer: dict[str, torch.Tensor], out_dir: Path, number: int) -> list[str]:
    save_file(buffer, str(out_dir / f".shard-{number:05d}.safetensors"), metadata={"format": "pt"})
    return list(buffer)


def _name_shards(out_dir: Path, shard_keys: list[list[str]]) -> list[str]:
    """Rename the written shards as transformers names them, with an index when there is more than one."""
    if len(shard_keys) == 1:
        (out_dir / ".shard-00000.safetensors").rename(out_dir / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shard_keys):05d}.safetensors" for i in range(len(shard_keys))]
    weight_map = {}
    for number, (name, keys) in enumerate(zip(names, shard_keys)):
        (out_dir / f".shard-{number:05d}.safetensors").rename(out_dir / name)
        weight_map |= dict.fromkeys(keys, name)
    total = sum((out_dir / name).stat().st_size for name in names)
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def _write_configs(source_dir: Path, out_dir: Path, dtype: torch.dtype, processor, trust_remote_code: bool = False) -> None:
    """config.json with the merged dtype, and the base's generation config (or one made from the model config).

    A remote-code model's Python files (CogVLM's) are copied too: its merged folder loads from them.
    """
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(source_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    config.dtype = dtype
    config.save_pretrained(str(out_dir))
    if trust_remote_code:
        for code in source_dir.glob("*.py"):
            shutil.copy(code, out_dir / code.name)
    if (source_dir / "generation_config.json").is_file():
        shutil.copy(source_dir / "generation_config.json", out_dir / "generation_config.json")
        return
    generation = GenerationConfig.from_model_config(config)
    tokenizer = processor.tokenizer
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.save_pretrained(str(out_dir))


def _was_quantized(adapter_dir: Path) -> bool:
    """Whether training ran against a 4- or 8-bit base (QLoRA), from the training config saved beside the adapter."""
    path = adapter_dir / "train_config.json"
    train = json.loads(path.read_text()) if path.is_file() else {}
    return bool(
        train.get("load_in_4bit") or train.get("load_in_8bit") or train.get("method") == "qlora"
        or str(train.get("quantization") or "none").lower() not in ("none", "", "false")
    )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern matching the module name's end."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _real_tokens(rows: datasets.Dataset, shape: torch.Size) -> torch.Tensor:
    """Positions holding a token of the row (the collator right-pads), where logits are compared."""
    lengths = torch.tensor([len(ids) for ids in rows["input_ids"]])
    return torch.arange(shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
