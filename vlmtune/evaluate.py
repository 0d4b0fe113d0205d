"""Stage 5: answer the test split with the adapted model and measure it against everything it must beat.

On the same test rows it scores, beside the fine-tuned adapter: the majority answer, a blind
(question-only) prior, the base model before fine-tuning, the previous adapter version, the
adapter with every question paired with another sample's image (its drop is the proof that the
model reads the image) and, when one was trained, full fine-tuning with the same data, steps and
seed. Writes `report.json`, `report.md`, `plots.png`, `worst/*.png` thumbnails and
`predictions.parquet` into the output folder.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch

from vlmtune.config import EvalConfig, as_dict
from vlmtune.generate import answer_losses, greedy_answers
from vlmtune.metrics import (
    blind_baseline,
    bootstrap_ci,
    breakdown,
    confusion_tables,
    majority_baseline,
    mean,
    score_predictions,
)
from vlmtune.models import BaseModelRef, load_model, load_processor
from vlmtune.report import render_markdown, render_plots
from vlmtune.train import Log

PLOTS_FILE = "plots.png"
WORST_DIR = "worst"


@dataclass(frozen=True)
class ComparedModel:
    """A model the report scores on the same rows: its label, and the folder of its adapter or weights."""

    name: str
    weights_dir: Path | None  # None: the base model itself


def evaluate_adapter(
    base: BaseModelRef,
    adapter_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    config: EvalConfig,
    log: Log = print,
    previous_adapter_dir: Path | None = None,
    previous_adapter_note: str = "no earlier adapter version",
    full_finetune_dir: Path | None = None,
) -> dict[str, Any]:
    """Score the adapter in `adapter_dir` and its baselines on the test split; write the report files."""
    out_dir = Path(out_dir)
    splits = datasets.load_from_disk(str(dataset_dir))
    test = sample_rows(splits["test"], config.max_samples, config.seed)
    if test.num_rows == 0:
        raise ValueError("the test split is empty: add a drop with split=test records")
    references = reference_answers(test)
    processor = load_processor(adapter_dir)

    model = load_adapted_model(base, adapter_dir)
    log(f"generating answers for {test.num_rows} test questions")
    started = time.time()
    predictions, hit_limit = greedy_answers(model, processor, test, config.batch_size, config.max_new_tokens)
    seconds = time.time() - started
    scores = score_predictions(predictions, references)
    log("image-shuffle ablation: every question asked about another sample's image")
    shuffled_scores = score_predictions(_answers(model, processor, with_shuffled_images(test, config.seed), config), references)
    worst = worst_examples(model, processor, test, predictions, scores, config)
    del model

    model_scores = {"image_shuffle": shuffled_scores}
    compared = [ComparedModel("base_model", None)]
    compared += [ComparedModel("previous_adapter", Path(previous_adapter_dir))] if previous_adapter_dir else []
    compared += [ComparedModel("full_finetune", Path(full_finetune_dir))] if full_finetune_dir else []
    for other in compared:
        log(f"scoring {other.name} on the same {test.num_rows} questions")
        other_model = load_model(base, torch.float32) if other.weights_dir is None else load_adapted_model(base, other.weights_dir)
        model_scores[other.name] = score_predictions(_answers(_on_device(other_model), processor, test, config), references)
        del other_model

    train_questions, train_answers = splits["train"]["question"], splits["train"]["answer"]
    text_predictions = {
        "majority": majority_baseline(train_answers, test.num_rows),
        "blind": blind_baseline(train_questions, train_answers, test["question"]),
    }
    baseline_scores = {name: score_predictions(values, references) for name, values in text_predictions.items()}
    baseline_scores |= dict(sorted(model_scores.items(), key=lambda item: _BASELINE_ORDER.index(item[0])))

    baselines = {name: _scored_against(values, scores, test["answer_type"], config) for name, values in baseline_scores.items()}
    report = {
        "accuracy": mean(scores),
        "ci95": list(bootstrap_ci(scores, 0.95, config.bootstrap_resamples, config.seed)),
        "n": len(scores),
        "metric": metric_name(references),
        "per_answer_type": breakdown(scores, test["answer_type"]),
        "per_question_type": breakdown(scores, test["question_type"]),
        "baselines": baselines,
        "image_shuffle_drop": mean(scores) - mean(shuffled_scores),
        "image_shuffle_drop_ci95": baselines["image_shuffle"]["difference_ci95"],
        "previous_adapter": {"dir": str(previous_adapter_dir), "note": previous_adapter_note} if previous_adapter_dir else {"absent": previous_adapter_note},
        "lora_to_full_ratio": mean(scores) / mean(model_scores["full_finetune"]) if full_finetune_dir else None,
        "confusion": confusion_tables(predictions, test["answer"], test["answer_type"]),
        "worst_examples": worst,
        "questions_per_second": test.num_rows / max(seconds, 1e-9),
        "hit_max_new_tokens_rate": mean([float(flag) for flag in hit_limit]),
        "config": as_dict(config),
        "adapter_dir": str(adapter_dir),
        "full_finetune_dir": str(full_finetune_dir) if full_finetune_dir else None,
        "full_finetune_config": json.loads((Path(full_finetune_dir) / "train_config.json").read_text()) if full_finetune_dir else None,
    }
    pd.DataFrame(
        {"sample_id": test["sample_id"], "question": test["question"], "answer": test["answer"], "prediction": predictions,
         "score": scores, "answer_type": test["answer_type"], "hit_max_new_tokens": hit_limit}
    ).to_parquet(out_dir / "predictions.parquet")
    _save_thumbnails(test, worst, out_dir / WORST_DIR)
    render_plots(report, _training_history(adapter_dir), out_dir / PLOTS_FILE)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report, plot_name=PLOTS_FILE, thumbnails_dir=WORST_DIR))
    return report_summary(report)


_BASELINE_ORDER = ["base_model", "image_shuffle", "previous_adapter", "full_finetune"]


def _scored_against(values: list[float], scores: list[float], answer_types: list[str], config: EvalConfig) -> dict[str, Any]:
    """A baseline's accuracy and interval, and the paired interval on the fine-tuned model's lead over it."""
    differences = [score - value for score, value in zip(scores, values)]  # same questions resampled for both
    return {
        "accuracy": mean(values),
        "ci95": list(bootstrap_ci(values, 0.95, config.bootstrap_resamples, config.seed)),
        "difference_ci95": list(bootstrap_ci(differences, 0.95, config.bootstrap_resamples, config.seed)),
        "per_answer_type": breakdown(values, answer_types),
    }


def report_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: what the asset's metadata, the checks and the CLI read."""
    keys = ("accuracy", "ci95", "n", "image_shuffle_drop", "image_shuffle_drop_ci95", "lora_to_full_ratio", "questions_per_second", "hit_max_new_tokens_rate")
    return {key: report[key] for key in keys} | {
        "baselines": {name: value["accuracy"] for name, value in report["baselines"].items()},
        # paired 95 % interval on (this adapter - baseline) over the same questions: what the gate judges by
        "lead_ci95": {name: value["difference_ci95"] for name, value in report["baselines"].items()},
        "per_answer_type": {name: value["accuracy"] for name, value in report["per_answer_type"].items()},
        "previous_adapter": report["previous_adapter"],
    }


def reference_answers(rows: datasets.Dataset) -> list[list[str]]:
    """The human answers of each row: the `answers` list where the data has one, else the single `answer`."""
    if "answers" in rows.column_names:
        return [list(answers) if answers else [answer] for answers, answer in zip(rows["answers"], rows["answer"])]
    return [[answer] for answer in rows["answer"]]


def metric_name(references: Sequence[Sequence[str]]) -> str:
    if any(len(answers) > 1 for answers in references):
        return "VQA accuracy (min(matches/3, 1) over leave-one-out subsets; exact match where one answer), official normalisation"
    return "exact match after the official VQA answer normalisation"


def pick_previous_adapter(history: Sequence[tuple[str, str]], current_fingerprint: str, base_fingerprint: str) -> tuple[str | None, str]:
    """The adapter version shipped before the current one, and why there is none when there is none.

    `history` holds the (fingerprint, path) pairs of the shipped (merged) adapters, newest first, so
    an adapter the gate refused is never the yardstick. The previous version is the newest with
    another fingerprint; it is compared only if its folder still exists and it was trained on the same base.
    """
    for fingerprint, path in history:
        if fingerprint == current_fingerprint:
            continue
        manifest = Path(path) / "manifest.json"
        if not manifest.is_file():
            return None, f"previous version {fingerprint} is no longer on disk"
        if json.loads(manifest.read_text()).get("base_model") != base_fingerprint:
            return None, f"previous version {fingerprint} was trained on another base model"
        return path, f"previous version {fingerprint}"
    return None, "first adapter version: none shipped before it"


_SAME_TRAINING = ("max_steps", "batch_size", "gradient_accumulation_steps", "seed", "max_train_samples")


def full_reference_matches(full_manifest: dict[str, Any], adapter_manifest: dict[str, Any]) -> bool:
    """Whether a full fine-tune had the adapter's base, data, steps, batch and seed, so the two compare fairly."""
    same_inputs = all(full_manifest.get(key) == adapter_manifest.get(key) for key in ("base_model", "tokenized_dataset"))
    full_config, adapter_config = full_manifest.get("config", {}), adapter_manifest.get("config", {})
    return same_inputs and full_config.get("method") == "full" and all(full_config.get(k) == adapter_config.get(k) for k in _SAME_TRAINING)


def with_shuffled_images(rows: datasets.Dataset, seed: int) -> datasets.Dataset:
    """The same questions, each paired with the image of another sample (never its own image)."""
    donors = shuffled_image_donors(rows["image_sha256"], seed)
    images = rows.select_columns(["image"]).cast_column("image", datasets.Image(decode=False)).select(donors)
    return datasets.concatenate_datasets([rows.remove_columns("image"), images.cast_column("image", datasets.Image())], axis=1)


def shuffled_image_donors(image_ids: Sequence[str], seed: int) -> list[int]:
    """For each row, the row whose image it borrows: a random cycle, repaired where it would give back the same image."""
    n = len(image_ids)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    donors = [0] * n
    for position, row in enumerate(order):
        donors[row] = order[(position + 1) % n]
    for row in range(n):  # rows sharing an image (several questions per image) may still meet their own
        if image_ids[donors[row]] == image_ids[row]:
            for other in range(n):
                if image_ids[donors[other]] != image_ids[row] and image_ids[donors[row]] != image_ids[other]:
                    donors[row], donors[other] = donors[other], donors[row]
                    break
    return donors


def worst_examples(model, processor, rows: datasets.Dataset, predictions: list[str], scores: list[float], config: EvalConfig) -> list[dict[str, Any]]:
    """The `n_worst` lowest-scored answers, the most confidently wrong first (highest loss on the reference answer)."""
    wrong = [index for index, score in enumerate(scores) if score < 1.0]
    if not wrong or config.n_worst == 0:
        return []
    wrong = sorted(wrong, key=lambda index: scores[index])[: config.max_worst_candidates]
    losses = answer_losses(model, processor, rows.select(wrong), config.batch_size)
    ranked = sorted(zip(wrong, losses), key=lambda pair: (scores[pair[0]], -pair[1]))[: config.n_worst]
    return [
        {"row": index, "sample_id": rows[index]["sample_id"], "question": rows[index]["question"], "answer": rows[index]["answer"],
         "prediction": predictions[index], "score": scores[index], "answer_loss": loss, "thumbnail": f"{WORST_DIR}/{rank:02d}.png"}
        for rank, (index, loss) in enumerate(ranked)
    ]


def load_adapted_model(base: BaseModelRef, adapter_dir: Path, dtype: torch.dtype = torch.float32):
    """Base + adapter (or a fully fine-tuned model saved in `adapter_dir`), in eval mode."""
    if (Path(adapter_dir) / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base, dtype=dtype), str(adapter_dir))
    else:
        model = load_model(BaseModelRef(base.model_id, trust_remote_code=base.trust_remote_code, weights_dir=str(adapter_dir)), dtype=dtype)
    return _on_device(model)


def sample_rows(split: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or limit >= split.num_rows:
        return split
    return split.select(sorted(random.Random(seed).sample(range(split.num_rows), limit)))


def _answers(model, processor, rows: datasets.Dataset, config: EvalConfig) -> list[str]:
    return greedy_answers(model, processor, rows, config.batch_size, config.max_new_tokens)[0]


def _on_device(model):
    return (model.to("cuda") if torch.cuda.is_available() else model).eval()


def _save_thumbnails(rows: datasets.Dataset, worst: list[dict[str, Any]], folder: Path, side: int = 96) -> None:
    folder.mkdir(exist_ok=True)
    for example in worst:
        image = rows[example["row"]]["image"].convert("RGB")
        image.thumbnail((side, side))
        image.save(folder.parent / example["thumbnail"])


def _training_history(adapter_dir: Path) -> list[dict[str, Any]]:
    path = Path(adapter_dir) / "log_history.json"
    return json.loads(path.read_text()) if path.is_file() else []
