"""Time the data stages on the easy-VQA training split, from scratch and for one new 1 % drop.

    PYTHONPATH=. python benchmarks/data_stages.py [--work DIR] [--fraction 0.01]

The full run ingests, cleans and tokenizes all 38,575 training questions as one drop (format v1:
images + `annotations.jsonl`). The new drop holds 1 % as many questions on easy-VQA *test* images,
in CSV, so it is new data rather than a copy; its cost is ingest + clean + tokenize of that drop
alone plus re-assembling the splits from both shards, which is what the pipeline re-runs when a
drop arrives. Both are measured in the same invocation, so the ratio is free of machine drift.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import datasets

from vlmtune.clean import clean_drop
from vlmtune.config import CleanConfig, TinyModelConfig, TokenizeConfig
from vlmtune.easyvqa import easyvqa_answer_type
from vlmtune.ingest import ingest_drop
from vlmtune.models import build_tiny_processor
from vlmtune.tokenization import assemble_splits, tokenize_drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--fraction", type=float, default=0.01, help="size of the new drop relative to the full one")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    work = args.work or Path(tempfile.mkdtemp(prefix="vlmtune-bench-"))
    try:
        run(work, args.fraction)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, fraction: float) -> None:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    full_drop = write_jsonl_drop(work / "drops" / "easyvqa-train", easy_vqa.get_train_image_paths(), list(zip(questions, answers, image_ids)))
    test_questions, test_answers, test_ids = easy_vqa.get_test_questions()
    n_new = max(1, round(len(questions) * fraction))
    new_drop = write_csv_drop(work / "drops" / "new-drop", easy_vqa.get_test_image_paths(), list(zip(test_questions, test_answers, test_ids))[:n_new])
    processor = build_tiny_processor(TinyModelConfig())
    clean_config, tokenize_config = CleanConfig(), TokenizeConfig()

    full = time_drop(full_drop, work / "full", processor, clean_config, tokenize_config, shards=[])
    new = time_drop(new_drop, work / "new", processor, clean_config, tokenize_config, shards=[work / "full" / "tokenized_shard"])

    total_full, total_new = sum(full["seconds"].values()), sum(new["seconds"].values())
    print(f"\ndata stages on {os.cpu_count()} CPU cores, num_proc={clean_config.num_proc}\n")
    print(f"| stage | full run: records | s | records/s | new {fraction:.0%} drop: records | s | records/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage in ("raw_samples", "clean_samples", "tokenized_dataset"):
        print(f"| {stage} | {full['records'][stage]:,} | {full['seconds'][stage]:.1f} | {rate(full, stage)} "
              f"| {new['records'][stage]:,} | {new['seconds'][stage]:.2f} | {rate(new, stage)} |")
    print(f"| **total** | {full['records']['raw_samples']:,} | **{total_full:.1f}** | {full['records']['raw_samples'] / total_full:,.0f} "
          f"| {new['records']['raw_samples']:,} | **{total_new:.2f}** | {new['records']['raw_samples'] / total_new:,.0f} |")
    print(f"\nnew drop / full run: {total_new / total_full:.1%} (target <= 5%); full run {total_full:.1f} s (target <= 60 s)")
    print(f"quarantine reasons, full run: {json.dumps(full['reasons'])}")
    print(f"quarantine reasons, new drop: {json.dumps(new['reasons'])}")


def time_drop(drop: Path, out: Path, processor, clean_config: CleanConfig, tokenize_config: TokenizeConfig, shards: list[Path]) -> dict:
    """Run the three stages of one drop into fresh folders; tokenized_dataset includes assembling the splits."""
    stage_dirs = {name: out / name for name in ("raw_samples", "clean_samples", "tokenized_shard", "tokenized_dataset")}
    for path in stage_dirs.values():
        path.mkdir(parents=True)
    seconds, records = {}, {}
    started = time.perf_counter()
    raw = ingest_drop(drop, drop.name, stage_dirs["raw_samples"])
    seconds["raw_samples"], records["raw_samples"] = time.perf_counter() - started, raw["n_in"]
    started = time.perf_counter()
    clean = clean_drop(stage_dirs["raw_samples"], drop, stage_dirs["clean_samples"], clean_config)
    seconds["clean_samples"], records["clean_samples"] = time.perf_counter() - started, clean["n_in"]
    started = time.perf_counter()
    tokenize_drop(stage_dirs["clean_samples"], processor, stage_dirs["tokenized_shard"], tokenize_config)
    assembled = assemble_splits([*shards, stage_dirs["tokenized_shard"]], stage_dirs["tokenized_dataset"])
    seconds["tokenized_dataset"], records["tokenized_dataset"] = time.perf_counter() - started, clean["n_kept"]
    reasons = dict(clean["quarantine_reasons"])
    for reason, count in assembled["quarantine_reasons"].items():
        reasons[reason] = reasons.get(reason, 0) + count
    return {"seconds": seconds, "records": records, "reasons": reasons}


def rate(result: dict, stage: str) -> str:
    return f"{result['records'][stage] / result['seconds'][stage]:,.0f}"


def write_jsonl_drop(drop: Path, image_paths: dict[int, str], records: list[tuple[str, str, int]]) -> Path:
    lines = [json.dumps({"image": copy_image(drop, image_paths, image_id), "question": question, "answer": answer,
                         "answer_type": easyvqa_answer_type(answer)}) for question, answer, image_id in records]
    (drop / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return drop


def write_csv_drop(drop: Path, image_paths: dict[int, str], records: list[tuple[str, str, int]]) -> Path:
    rows = [{"image": copy_image(drop, image_paths, image_id), "question": question, "answer": answer} for question, answer, image_id in records]
    with open(drop / "annotations.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    return drop


def copy_image(drop: Path, image_paths: dict[int, str], image_id: int) -> str:
    relative = f"images/{image_id}.png"
    target = drop / relative
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image_paths[image_id], target)
    return relative


if __name__ == "__main__":
    main()
