"""Stage 5: answer the test split with the adapted model and score it against baselines.

Writes `report.json` (accuracy, n, per answer / question type, baselines), `report.md`,
`plots.png` and `predictions.parquet` into the output folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch

from vlmtune.config import EvalConfig, as_dict
from vlmtune.generate import greedy_answers
from vlmtune.metrics import blind_baseline, breakdown, exact_match, majority_baseline, mean
from vlmtune.models import BaseModelRef, load_model, load_processor
from vlmtune.report import render_markdown, render_plots
from vlmtune.train import Log


def evaluate_adapter(
    base: BaseModelRef,
    adapter_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    config: EvalConfig,
    log: Log = print,
) -> dict[str, Any]:
    """Score the adapter in `adapter_dir` on the test split of `dataset_dir`; write the report files."""
    out_dir = Path(out_dir)
    splits = datasets.load_from_disk(str(dataset_dir))
    test = sample_rows(splits["test"], config.max_samples, config.seed)
    if test.num_rows == 0:
        raise ValueError("the test split is empty: add a drop with split=test records")
    model = load_adapted_model(base, adapter_dir)
    processor = load_processor(adapter_dir)
    log(f"generating answers for {test.num_rows} test questions")
    predictions, hit_limit = greedy_answers(model, processor, test, config.batch_size, config.max_new_tokens)
    answers, questions = test["answer"], test["question"]
    scores = exact_match(predictions, answers)
    train_questions, train_answers = splits["train"]["question"], splits["train"]["answer"]
    baselines = {
        "majority": exact_match(majority_baseline(train_answers, len(answers)), answers),
        "blind": exact_match(blind_baseline(train_questions, train_answers, questions), answers),
    }
    report = {
        "accuracy": mean(scores),
        "n": len(scores),
        "metric": "exact match after VQA answer normalisation",
        "per_answer_type": breakdown(scores, test["answer_type"]),
        "per_question_type": breakdown(scores, test["question_type"]),
        "baselines": {
            name: {"accuracy": mean(values), "per_answer_type": breakdown(values, test["answer_type"])}
            for name, values in baselines.items()
        },
        "hit_max_new_tokens_rate": mean([float(flag) for flag in hit_limit]),
        "config": as_dict(config),
        "adapter_dir": str(adapter_dir),
    }
    training = _training_history(adapter_dir)
    pd.DataFrame(
        {"sample_id": test["sample_id"], "question": questions, "answer": answers, "prediction": predictions,
         "correct": scores, "answer_type": test["answer_type"], "hit_max_new_tokens": hit_limit}
    ).to_parquet(out_dir / "predictions.parquet")
    render_plots(report, training, out_dir / "plots.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report, plot_name="plots.png"))
    return {key: report[key] for key in ("accuracy", "n", "hit_max_new_tokens_rate")} | {
        "baselines": {name: value["accuracy"] for name, value in report["baselines"].items()},
        "per_answer_type": {name: value["accuracy"] for name, value in report["per_answer_type"].items()},
    }


def load_adapted_model(base: BaseModelRef, adapter_dir: Path):
    """Base + adapter (or a fully fine-tuned model saved in `adapter_dir`), in eval mode."""
    if (Path(adapter_dir) / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), str(adapter_dir))
    else:
        model = load_model(BaseModelRef(base.model_id, weights_dir=str(adapter_dir)), dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def sample_rows(split: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or limit >= split.num_rows:
        return split
    return split.select(sorted(random.Random(seed).sample(range(split.num_rows), limit)))


def _training_history(adapter_dir: Path) -> list[dict[str, Any]]:
    path = Path(adapter_dir) / "log_history.json"
    return json.loads(path.read_text()) if path.is_file() else []
