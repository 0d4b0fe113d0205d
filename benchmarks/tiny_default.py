"""How well and how fast the tiny default learns easy-VQA: pretraining, LoRA, per-type test accuracy.

    python benchmarks/tiny_default.py                                  # the `demo` profile's settings
    python benchmarks/tiny_default.py --profile gpu
    python benchmarks/tiny_default.py --variant wide:vision_hidden=256,vision_layers=4 --variant long:pretrain_steps=6000

Each variant runs the pipeline's own functions (the `base_model` pretraining on generated scenes,
LoRA through `train_adapter`, `evaluate_adapter` on the whole easy-VQA test split) in its own
process; `--parallel` runs several at once on one GPU. A variant is `name:field=value,...` over
the profile's TinyModelConfig and TrainConfig fields (`lora_` prefix for the latter where the
names collide: `lora_max_steps`, `lora_batch_size`, `lora_learning_rate`). The table gives the
training seconds (pretraining + LoRA: the "within 10 minutes" of the tiny default's target) and
the accuracy per answer type next to the base model's before fine-tuning.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmtune.config import PROFILES, TINY_MODEL_ID, TinyModelConfig, TrainConfig, profile_config, with_overrides  # noqa: E402

TRAIN_PREFIX = "lora_"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="demo")
    parser.add_argument("--variant", action="append", default=[], help="name:field=value,... (repeatable; default: the profile as is)")
    parser.add_argument("--parallel", type=int, default=1, help="variants run at once (one GPU is shared)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.profile, *parse_variant(args.one), Path(args.workdir))))
        return
    variants = args.variant or ["profile:"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiny-default-"))
    workdir.mkdir(parents=True, exist_ok=True)
    running, rows = [], []
    for spec in variants:
        name = spec.split(":", 1)[0]
        log = open(workdir / f"{name}.log", "w")
        command = [sys.executable, __file__, "--profile", args.profile, "--one", spec, "--workdir", str(workdir / name)]
        running.append((name, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)))
        while len([p for _, p in running if p.poll() is None]) >= args.parallel:
            time.sleep(2)
    for name, process in running:
        out, _ = process.communicate()
        if process.returncode != 0:
            print(f"{name}: failed, see {workdir / (name + '.log')}", file=sys.stderr)
            continue
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


def parse_variant(spec: str) -> tuple[str, dict[str, object]]:
    name, _, assignments = spec.partition(":")
    values = {}
    for item in filter(None, assignments.split(",")):
        key, _, raw = item.partition("=")
        values[key.strip()] = json.loads(raw) if raw.strip()[:1] in "0123456789-[{tfn\"" else raw
    return name, values


def run_variant(profile: str, name: str, overrides: dict[str, object], workdir: Path) -> dict[str, object]:
    from vlmtune.base_model import prepare_base_model, ref_from_summary
    from vlmtune.evaluate import evaluate_adapter
    from vlmtune.train import train_adapter

    config = profile_config(profile)
    tiny_fields = {f.name for f in dataclasses.fields(TinyModelConfig)}
    tiny = with_overrides(config.tiny_model, {k: v for k, v in overrides.items() if k in tiny_fields})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = with_overrides(config.train, {
        (key if key in train_fields else key.removeprefix(TRAIN_PREFIX)): value for key, value in overrides.items() if key not in tiny_fields
    })
    workdir.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(f"[{name}] {message}", file=sys.stderr, flush=True)  # noqa: E731

    started = time.time()
    base_dir = workdir / "base"
    base_summary = prepare_base_model(TINY_MODEL_ID, None, False, tiny, base_dir, workdir / "base_checkpoints", log)
    base = ref_from_summary(base_summary, base_dir)
    pretrain_seconds = time.time() - started

    dataset_dir = workdir / "dataset"
    write_easyvqa_dataset(base_dir / "processor", dataset_dir, config.demo_data.max_finetune_samples, config.demo_data.max_test_samples)
    started = time.time()
    adapter = train_adapter(base, base_dir / "processor", dataset_dir, workdir / "adapter", train, workdir / "adapter_checkpoints", log)
    lora_seconds = time.time() - started
    (workdir / "report").mkdir(exist_ok=True)
    report = evaluate_adapter(base, workdir / "adapter", dataset_dir, workdir / "report", dataclasses.replace(config.eval, max_samples=None), log)
    types = json.loads((workdir / "report" / "report.json").read_text())
    return {
        "variant": name,
        "overrides": overrides,
        "pretrain_steps": base_summary["pretrain_steps"],
        "pretrain_s": round(pretrain_seconds, 1),
        "pretrain_eval_loss": base_summary["pretrain_eval_loss"],
        "lora_steps": adapter["steps"],
        "lora_s": round(lora_seconds, 1),
        "accuracy": report["accuracy"],
        "base_accuracy": report["baselines"]["base_model"],
        "blind_accuracy": report["baselines"]["blind"],
        "per_type": {key: value["accuracy"] for key, value in types["per_answer_type"].items()},
        "base_per_type": {key: value["accuracy"] for key, value in types["baselines"]["base_model"]["per_answer_type"].items()},
        "n": report["n"],
        "device": adapter["device"],
    }


def write_easyvqa_dataset(processor_dir: Path, out_dir: Path, max_train: int | None, max_test: int | None) -> None:
    """easy-VQA's train split (with the validation share the demo drop uses) and its test split, tokenized."""
    import datasets
    import easy_vqa

    from vlmtune.clean import assign_split
    from vlmtune.easyvqa import VALIDATION_FRACTIONS, easyvqa_answer_type
    from vlmtune.models import load_processor
    from vlmtune.tokenization import dataset_from_rows, encode_batch, save_dataset

    processor = load_processor(processor_dir)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    sources = [
        (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths(), None, max_train),
        (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(), "test", max_test),
    ]
    for (questions, answers, image_ids), paths, split, limit in sources:
        image_bytes = {image_id: Path(paths[image_id]).read_bytes() for image_id in set(image_ids[:limit])}
        for start in range(0, len(questions[:limit]), 1024):
            chunk = range(start, min(start + 1024, len(questions[:limit])))
            encoded = encode_batch(processor, [questions[i] for i in chunk], [answers[i] for i in chunk], [image_bytes[image_ids[i]] for i in chunk])
            for i, example in zip(chunk, encoded):
                data = image_bytes[image_ids[i]]
                digest = hashlib.sha256(data).hexdigest()
                row_split = split or assign_split(digest, VALIDATION_FRACTIONS)
                splits[row_split].append({
                    "sample_id": f"{split or 'train'}:{i}", "drop": "easyvqa", "split": row_split, "image_sha256": digest,
                    "image": {"bytes": data, "path": None}, "question": questions[i], "answer": answers[i],
                    "answer_type": easyvqa_answer_type(answers[i]), "question_type": "", **example,
                })
    save_dataset(datasets.DatasetDict({name: dataset_from_rows(rows) for name, rows in splits.items()}), out_dir)


def print_table(rows: list[dict[str, object]]) -> None:
    header = f"{'variant':<14}{'pretrain':>14}{'lora':>12}{'train s':>9}{'accuracy':>10}{'color':>8}{'shape':>8}{'yes/no':>8}{'base':>8}{'blind':>8}  device"
    print(header)
    for row in rows:
        per_type = row["per_type"]
        print(
            f"{row['variant']:<14}{row['pretrain_steps']:>6} /{row['pretrain_s']:>6.0f}s{row['lora_steps']:>5} /{row['lora_s']:>4.0f}s"
            f"{row['pretrain_s'] + row['lora_s']:>9.0f}{row['accuracy']:>10.2%}"
            f"{per_type.get('color', float('nan')):>8.1%}{per_type.get('shape', float('nan')):>8.1%}{per_type.get('yes/no', float('nan')):>8.1%}"
            f"{row['base_accuracy']:>8.1%}{row['blind_accuracy']:>8.1%}  {row['device']}"
        )


if __name__ == "__main__":
    main()
