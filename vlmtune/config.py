"""Typed configuration of every stage, and the two run profiles.

Each stage takes one frozen dataclass. The resolved config is hashed into the stage's fingerprint
and saved beside its artifact, so every artifact can be rebuilt from its own folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

Profile = Literal["smoke", "demo", "gpu"]
PROFILES: tuple[Profile, ...] = ("smoke", "demo", "gpu")
TINY_MODEL_ID = "vlmtune/tiny-easyvqa"  # built from a config and pretrained by the pipeline; never downloaded


@dataclass(frozen=True)
class CleanConfig:
    min_image_side: int = 8
    max_image_pixels: int = 89_478_485  # Pillow's own decompression-bomb limit
    # Fractions for records that arrive without a split; hashed on the image so an image keeps one split.
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # Text longer than this cannot fit any token budget we use (TokenizeConfig.max_length, at a few
    # characters a token); the exact budget is enforced after the processor, in tokenized_dataset.
    max_text_chars: int = 2_000
    near_duplicate_distance: int = 4  # phash bits of 64; re-encoded or resized copies stay within ~4
    near_duplicate_color_tolerance: int = 24  # of 255, per cell of an 8x8 thumbnail (phash is colour-blind)
    num_proc: int = min(2, os.cpu_count() or 1)  # processes decoding images (datasets.map)


@dataclass(frozen=True)
class TokenizeConfig:
    max_length: int = 256  # tokens after the processor has expanded the image placeholders
    num_proc: int = 1


@dataclass(frozen=True)
class TinyModelConfig:
    """The offline default: a LLaVA-architecture VLM small enough to pretrain on a CPU in minutes.

    It is pretrained in full on generated shape scenes (vlmtune.shapes), never on easy-VQA itself.
    """

    image_size: int = 64  # easy-VQA images are 64x64
    patch_size: int = 8  # 64 image tokens per image
    # "conv": 3x3 stride-2 convolutions make the patch tokens (vlmtune.conv_stem_vision); "patch": CLIP's linear patch embedding
    vision_stem: Literal["conv", "patch"] = "conv"
    stem_channels: int = 64
    vision_hidden: int = 128
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4
    pretrain_steps: int = 600
    pretrain_batch_size: int = 64
    pretrain_learning_rate: float = 1e-3  # 3e-3 left the conv stem unable to learn shapes (H100, 2026-11-25: 40 % vs 99 % at 2,500 steps)
    seed: int = 0


Method = Literal["lora", "qlora", "full"]
METHODS: tuple[Method, ...] = ("lora", "qlora", "full")


@dataclass(frozen=True)
class TrainConfig:
    # lora: bf16 base (fp32 on CPU) + LoRA; qlora: 4-bit NF4 base + LoRA (CUDA only); full: every weight, fp32 master copy.
    method: Method = "lora"
    # qlora: the weights left unquantized (norms, embeddings, lm_head, vision tower). fp32 as the stock recipe
    # (prepare_model_for_kbit_training) casts them, whose loss curve ours then follows; bf16 saves memory but moved it.
    qlora_dtype: Literal["float32", "bfloat16"] = "float32"
    # "previous": a retraining continues from the current adapter (warm start); "fresh": starts from the base.
    init_from: Literal["fresh", "previous"] = "fresh"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0  # no dropout lets the fused LoRA path run; easy to raise for small data
    use_dora: bool = False  # weight-decomposed LoRA (DoRA): magnitude and direction trained apart
    use_rslora: bool = False  # scale by alpha / sqrt(rank) instead of alpha / rank, so high ranks still learn
    # None: every linear layer of the language model (attention and MLP), per architecture (vlmtune.families).
    # Otherwise PEFT's `target_modules`: a regex matched against full module names, or a list of name suffixes.
    target_modules: str | tuple[str, ...] | None = None
    lora_on_vision: bool = False  # also LoRA the vision tower's linear layers; it stays frozen otherwise
    train_projector: bool = False  # train the vision-language projector in full beside the LoRA layers
    # Recompute activations in backward (non-reentrant): the difference between batch 16 fitting or not on one GPU.
    gradient_checkpointing: bool = True
    # Speed levers (benchmarks/NOTES.md): each keeps the stock loss curve except FP8, which is off by default.
    answer_only_loss: bool = True  # lm_head and cross-entropy on answer positions only, not every prompt token
    fused_lora: bool = True  # LoRA's up-projection added in the base matmul's epilogue (layers without dropout/DoRA)
    fuse_shared_inputs: bool = True  # with fused_lora: q/k/v and gate/up, which read one input, as one fused call each
    bf16_lora_inputs: bool = True  # skip PEFT's fp32 round trip of LoRA inputs under bf16 autocast (GPU)
    # Frozen base linears in FP8 (compute capability >= 8.9). "backward": only the backward's grad-input
    # matmuls, the forward (and the loss) stays bf16; "all" / "mlp": both directions, which learns slower.
    fp8_base: Literal["off", "backward", "all", "mlp"] = "off"
    compile: bool = False  # torch.compile each decoder layer: the largest single gain on GPU, 12-25 s warm-up
    # The frozen vision tower replayed from one CUDA graph per batch shape (GPU; with `compile` its layers
    # are compiled too): 2-3 % of a 7B LLaVA step. For fixed-resolution towers (LLaVA, Idefics3, SmolVLM,
    # PaliGemma); a tower with LoRA (lora_on_vision) runs as before.
    vision_cuda_graphs: bool = False
    # A batch's samples packed into one row without padding, attention kept within each sample
    # (vlmtune.packing): pays on variable-length data. LLaVA / Idefics3 / SmolVLM-style families only.
    padding_free: bool = False
    learning_rate: float = 4e-3  # LoRA's; the tiny default (H100, 2026-11-25, single runs): 99.8 % at 4e-3 against 98.9 % at 2e-3
    max_steps: int = 200
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    eval_steps: int = 50  # also the checkpoint interval
    max_eval_samples: int = 512  # validation loss on a fixed subset keeps evaluation cheap
    early_stopping_patience: int = 3
    max_train_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r} (choose one of {', '.join(map(repr, METHODS))})")
        if self.qlora_dtype not in ("float32", "bfloat16"):
            problems.append(f"qlora_dtype={self.qlora_dtype!r} (choose 'float32' or 'bfloat16')")
        if self.fp8_base not in ("off", "backward", "all", "mlp"):
            problems.append(f"fp8_base={self.fp8_base!r} (choose 'off', 'backward', 'all' or 'mlp')")
        if self.fp8_base != "off" and self.use_dora:
            problems.append("fp8_base with use_dora (DoRA needs the dense base weight)")
        if self.init_from not in ("fresh", "previous"):
            problems.append(f"init_from={self.init_from!r} (choose 'fresh' or 'previous')")
        for name in ("lora_rank", "max_steps", "batch_size", "gradient_accumulation_steps", "eval_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate={self.learning_rate} (must be in (0, 1))")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout={self.lora_dropout} (must be in [0, 1))")
        if self.method == "full":
            adapter_only = [name for name in ("use_dora", "use_rslora", "lora_on_vision") if getattr(self, name)]
            if self.target_modules is not None:
                adapter_only.append("target_modules")
            if adapter_only:
                problems.append(f"{', '.join(adapter_only)} set with method='full' (they configure LoRA adapters)")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))  # lists from Dagster / JSON config
        if self.target_modules is not None and not self.target_modules:
            problems.append("target_modules is empty (None picks every linear layer of the language model)")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 128
    max_new_tokens: int = 16
    max_samples: int | None = None  # None: the whole test split
    bootstrap_resamples: int = 1000  # for the 95 % interval on every headline accuracy
    n_worst: int = 20  # worst-answered examples shown with their images in the report
    max_worst_candidates: int = 512  # wrong answers whose reference-answer loss is computed to rank them
    seed: int = 0  # test subset, image-shuffle pairing and bootstrap
    # Promotion gate (the blocking `ready_to_ship` check): an adapter is merged only if it beats the
    # blind baseline, loses at most this much accuracy against the previous version, and stops by itself.
    max_regression: float = 0.01
    max_unfinished_rate: float = 0.05  # share of answers that ran into max_new_tokens (LLaMA-Factory #7943)
    # "interval": beat blind and stay within max_regression of the previous adapter with the paired 95 %
    # interval on the difference (same questions), not the point estimates; "point": the point estimates,
    # for the smoke profile, whose 200 questions cannot separate its adapter from the question prior.
    gate: Literal["interval", "point"] = "interval"


@dataclass(frozen=True)
class MergeConfig:
    n_check_samples: int = 8
    # "auto": the precision the adapter was trained against (fp32 master weights for LoRA; bf16 for
    # QLoRA, whose 4-bit base is never merged into).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_logit_diff: float | None = None  # None: the tolerance for the merge dtype (merge.LOGIT_TOLERANCE)
    max_shard_size_mb: int = 2048  # output shard size; the merge holds at most one shard in memory


@dataclass(frozen=True)
class DemoDataConfig:
    max_finetune_samples: int | None = None
    max_test_samples: int | None = None


@dataclass(frozen=True)
class PipelineConfig:
    clean: CleanConfig = field(default_factory=CleanConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    tiny_model: TinyModelConfig = field(default_factory=TinyModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)


def profile_config(profile: Profile, seed: int = 0) -> PipelineConfig:
    """`demo`: the full easy-VQA run sized for 2 CPU cores (under 10 minutes); `gpu`: the same run trained
    longer on one GPU; `smoke`: a small fast subset for tests. `seed` seeds pretraining and training."""
    config = _profile_defaults(profile)
    if seed:
        config = dataclasses.replace(
            config, tiny_model=dataclasses.replace(config.tiny_model, seed=seed), train=dataclasses.replace(config.train, seed=seed)
        )
    return config


def _profile_defaults(profile: Profile) -> PipelineConfig:
    # The tiny default's activations are small: recomputing them would only cost CPU time.
    if profile == "demo":
        return PipelineConfig(train=TrainConfig(max_steps=300, gradient_checkpointing=False))
    if profile == "gpu":
        # The tiny default trained longer on one GPU, with a third language-model layer. Both stages
        # learn by breaking through a plateau at a step that varies from seed to seed and from run to
        # run (GPU kernels are not deterministic), on the yes/no questions most. A third layer and
        # 5,000 pretraining steps are what got every seed through (benchmarks/TINY_DEFAULT.md).
        return PipelineConfig(
            tiny_model=TinyModelConfig(pretrain_steps=5_000, pretrain_batch_size=128, text_layers=3),
            train=TrainConfig(max_steps=4_000, batch_size=64, eval_steps=100, early_stopping_patience=15, gradient_checkpointing=False),
            eval=EvalConfig(batch_size=512),
        )
    if profile == "smoke":
        return PipelineConfig(
            tiny_model=TinyModelConfig(pretrain_steps=200, pretrain_batch_size=32),
            train=TrainConfig(max_steps=200, batch_size=16, eval_steps=50, max_eval_samples=64, gradient_checkpointing=False),
            # 200 test questions: one answer is 0.5 %, so the regression gate allows for that noise
            eval=EvalConfig(max_samples=200, batch_size=100, max_regression=0.05, gate="point"),
            demo_data=DemoDataConfig(max_finetune_samples=600, max_test_samples=300),
        )
    raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")


def with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Replace the fields given (None means keep), refusing names the config does not have."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{type(config).__name__} has no field(s) {unknown}; fields are {sorted(names)}")
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
