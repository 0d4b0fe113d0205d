"""Stage 4: LoRA / QLoRA (or full) fine-tuning with the Hugging Face `Trainer`.

`train_adapter` is the entry point: it loads the base model as the method wants it (vlmtune.methods),
wraps every linear layer of its language model with LoRA (the vision tower stays frozen, the
projector optionally trains in full), and fits it with validation loss, early stopping and checkpoints. Checkpoints live outside the
published folder, so a killed run resumes from its last one. `fit` is shared with the tiny base
model's pretraining.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from vlmtune.collate import TrainingCollator
from vlmtune.config import TrainConfig, as_dict
from vlmtune.methods import checkpointing_the_model_supports, load_base_for, load_for_training
from vlmtune.models import BaseModelRef, load_processor, parameter_counts
from vlmtune.packing import check_packable
from vlmtune.provenance import provenance
from vlmtune.speed.answer_loss import answer_loss
from vlmtune.speed.levers import apply_speed_levers
from vlmtune.speed.varlen_attention import packed_attention
from vlmtune.tracking import TENSORBOARD_DIR, ManifestToTrackers, report_to

Log = Callable[[str], None]


def train_adapter(
    base: BaseModelRef,
    processor_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    config: TrainConfig,
    checkpoint_dir: Path,
    log: Log = print,
    warm_start_dir: Path | None = None,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train on `dataset_dir` (a saved DatasetDict) and save the adapter (or full model) with its processor.

    `warm_start_dir` continues from an earlier adapter (new data, new run); resuming a killed run
    is separate and automatic, from the newest checkpoint in `checkpoint_dir`.
    """
    processor = load_processor(processor_dir)
    splits = datasets.load_from_disk(str(dataset_dir))
    if warm_start_dir is not None and config.method != "full":
        model = load_warm_start(load_base_for(base, config), warm_start_dir)
        log(f"warm start from the adapter in {warm_start_dir}")
    else:
        model = load_for_training(base, config)
    config = checkpointing_the_model_supports(model, config, log)
    levers = apply_speed_levers(model, config)
    run_manifest = {**(manifest or {}), "config": as_dict(config), "base_model": base.to_dict(), **provenance()}
    summary = {**fit(model, processor, splits["train"], splits["validation"], config, checkpoint_dir, log, run_manifest), "speed_levers": levers, "gradient_checkpointing": config.gradient_checkpointing}
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    (Path(out_dir) / "train_config.json").write_text(json.dumps(as_dict(config), indent=2))
    (Path(out_dir) / "log_history.json").write_text(json.dumps(summary.pop("log_history")))
    return {**summary, "base_model": base.to_dict(), "drops": sorted(set(splits["train"]["drop"]))}


def load_warm_start(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Load a trainable adapter and verify every saved tensor landed in the model (none silently dropped)."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    saved = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    missing = sorted(set(saved) - set(loaded))
    differing = sorted(key for key in set(saved) & set(loaded) if not torch.equal(saved[key], loaded[key].cpu().to(saved[key].dtype)))
    if missing or differing:
        raise RuntimeError(f"warm start from {adapter_dir} did not load {len(missing) + len(differing)} tensors: {(missing + differing)[:5]}")
    return model


def fit(
    model: nn.Module,
    processor,
    train_set: datasets.Dataset,
    eval_set: datasets.Dataset,
    config: TrainConfig,
    checkpoint_dir: Path,
    log: Log = print,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the Trainer; resume from the newest checkpoint in `checkpoint_dir` if a previous run was killed.

    Metrics and `manifest` go to TensorBoard under `checkpoint_dir/runs` (and MLflow when asked for).
    """
    if len(train_set) == 0:
        raise ValueError("the training split is empty: no drop contributed train samples")
    if config.padding_free:
        check_packable(model)
    if config.max_train_samples is not None and isinstance(train_set, datasets.Dataset):
        train_set = train_set.shuffle(seed=config.seed).select(range(min(config.max_train_samples, train_set.num_rows)))
    eval_set = eval_set.shuffle(seed=config.seed).select(range(min(config.max_eval_samples, eval_set.num_rows)))
    has_eval = eval_set.num_rows > 0
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.eval_steps,
        save_total_limit=2,
        # Reloading a full-model checkpoint in-process misses keys under transformers 5's renamed
        # LLaVA layout, leaving the last weights in place silently; only adapters reload reliably.
        load_best_model_at_end=has_eval and config.method != "full",
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=max(1, min(10, config.eval_steps)),
        report_to=report_to(),  # TensorBoard writes under checkpoint_dir/runs/
        remove_unused_columns=False,  # the collator needs the image and prompt columns
        bf16=use_bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        # Reentrant checkpointing drops the graph to frozen inputs and costs more memory with LoRA.
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not torch.cuda.is_available(),
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=True,
        # Images are decoded and processed in the collator: on a GPU that is the bottleneck of a small
        # model unless it runs beside the training loop. On a CPU the cores are busy training.
        dataloader_num_workers=min(4, os.cpu_count() or 1) if torch.cuda.is_available() else 0,
    )
    callbacks = [ProgressLog(log, config.max_steps), ManifestToTrackers(manifest or {"config": as_dict(config)}, Path(checkpoint_dir) / TENSORBOARD_DIR / "manifest")]
    if args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = (AnswerLossTrainer if config.answer_only_loss and config.method != "full" else Trainer)(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set if has_eval else None,
        data_collator=TrainingCollator(processor, padding_free=config.padding_free),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLog reports instead, to the caller's log
    last_checkpoint = last_complete_checkpoint(Path(checkpoint_dir))
    resumed_from = int(last_checkpoint.rsplit("-", 1)[-1]) if last_checkpoint else 0
    if last_checkpoint:
        log(f"resuming from {last_checkpoint} (step {resumed_from})")
    started = time.time()
    with packed_attention(model) if config.padding_free else nullcontext():
        result = trainer.train(resume_from_checkpoint=last_checkpoint)
    seconds = time.time() - started
    trainable, total = parameter_counts(model)
    history = trainer.state.log_history
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    train_losses = [entry["loss"] for entry in history if "loss" in entry]
    return {
        "method": config.method,
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "train_samples": len(train_set),
        "validation_samples": eval_set.num_rows,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "train_loss_mean": result.training_loss,
        "best_eval_loss": min(eval_losses) if eval_losses else None,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(trainer.state.global_step * config.batch_size * config.gradient_accumulation_steps / max(seconds, 1e-9), 2),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "world_size": args.world_size,  # processes that trained together (accelerate launch / torchrun)
        "bf16": use_bf16,
        "log_history": history,
    }


def last_complete_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing; partial ones from a killed run are removed.

    The Trainer writes `trainer_state.json` last and not atomically, so a folder without it was cut off.
    """
    if not checkpoint_dir.is_dir():
        return None
    folders = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for folder in folders:
        if (folder / "trainer_state.json").is_file():
            return str(folder)
        shutil.rmtree(folder, ignore_errors=True)
    return None


class AnswerLossTrainer(Trainer):
    """The Trainer with the training loss computed on answer positions only (vlmtune.speed.answer_loss):
    the same value as the model's own loss without full-vocabulary logits for every prompt token."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Evaluation wants the outputs; and under DDP the forward must go through the wrapper, whose
        # hooks synchronise gradients, so both take the model's own loss.
        if return_outputs or isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return answer_loss(model, inputs)


class ProgressLog(TrainerCallback):
    """Streams step, loss, throughput and ETA to a log function (the Dagster log, or stdout)."""

    def __init__(self, log: Log, max_steps: int):
        self.log, self.max_steps, self.started = log, max_steps, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.start_step = time.time(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        done = state.global_step - self.start_step
        elapsed = time.time() - self.started
        rate = done / elapsed if elapsed > 0 and done > 0 else math.nan
        eta = (self.max_steps - state.global_step) / rate if rate == rate and rate > 0 else math.nan
        shown = {key: round(value, 4) for key, value in logs.items() if isinstance(value, float) and ("loss" in key or key == "learning_rate")}
        self.log(f"step {state.global_step}/{self.max_steps} {shown} {rate:.2f} steps/s, ETA {eta:.0f}s")
