"""How well and how fast the tiny default learns easy-VQA: pretraining, LoRA, per-type test accuracy, over seeds.

    python benchmarks/tiny_default.py                                  # the `demo` profile's settings, seed 0
    python benchmarks/tiny_default.py --profile gpu --seeds 0,1,2 --parallel 6
    python benchmarks/tiny_default.py --variant wide:vision_hidden=256,vision_layers=4 --variant long:pretrain_steps=6000

Each variant runs the pipeline's own functions (the `base_model` pretraining on generated scenes,
LoRA through `train_adapter`, `evaluate_adapter` on the whole easy-VQA test split), one process per
job. A variant is `name:field=value,...` over the profile's TinyModelConfig and TrainConfig fields
(`lora_` prefix for the latter where the names collide: `lora_max_steps`, `lora_batch_size`,
`lora_learning_rate`). `--seeds` seeds pretraining and LoRA as `vlmtune demo --seed` does; variants
that change only the LoRA stage share the pretrained base of their seed, so their differences are
paired on one base. Each finished row is appended to `--out` (JSON lines) at once, so a run cut off
keeps what it measured. The tables give, per run, the training seconds (pretraining + LoRA) and the
accuracy per answer type (yes/no split into questions about shapes and about colours), and per
variant the mean, min and max over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmtune.config import PROFILES, TINY_MODEL_ID, TinyModelConfig, TrainConfig, profile_config, with_overrides  # noqa: E402

TRAIN_PREFIX = "lora_"
SHAPE_WORDS = ("circle", "rectangle", "triangle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="demo")
    parser.add_argument("--variant", action="append", default=[], help="name:field=value,... (repeatable; default: the profile as is)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; every variant runs once per seed")
    parser.add_argument("--parallel", type=int, default=1, help="jobs run at once (one GPU is shared)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append each row here as a JSON line")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job = json.loads(args.job)
        result = pretrain_job(args.profile, job) if job["kind"] == "pretrain" else lora_job(args.profile, job)
        print(json.dumps(result))
        return
    seeds = [int(seed) for seed in args.seeds.split(",")]
    variants = [parse_variant(spec) for spec in args.variant or ["profile:"]]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tiny-default-"))
    workdir.mkdir(parents=True, exist_ok=True)

    bases = {}  # one pretraining per distinct (tiny-model overrides, seed)
    runs = []
    for name, overrides in variants:
        tiny, _ = split_overrides(args.profile, overrides)
        for seed in seeds:
            key = base_key(tiny, seed)
            bases.setdefault(key, {"kind": "pretrain", "name": f"base-{key}", "tiny": tiny, "seed": seed, "dir": str(workdir / f"base-{key}")})
            runs.append({"kind": "lora", "name": f"{name}-s{seed}", "variant": name, "overrides": overrides, "seed": seed,
                         "base": bases[key]["dir"], "dir": str(workdir / f"{name}-s{seed}")})
    pretrained = {job["dir"]: row for job, row in run_jobs(args.profile, list(bases.values()), args.parallel, workdir)}
    lora_jobs = [job for job in runs if job["base"] in pretrained]
    rows = []
    for job, row in run_jobs(args.profile, lora_jobs, args.parallel, workdir):
        row = {**pretrained[job["base"]], **row}
        rows.append(row)
        if args.out:
            with open(args.out, "a") as out:
                out.write(json.dumps(row) + "\n")
    print_runs(rows)
    print()
    print_summary(rows)


def parse_variant(spec: str) -> tuple[str, dict[str, object]]:
    name, _, assignments = spec.partition(":")
    values = {}
    for item in filter(None, assignments.split(",")):
        key, _, raw = item.partition("=")
        values[key.strip()] = json.loads(raw) if raw.strip()[:1] in "0123456789-[{tfn\"" else raw
    return name, values


def split_overrides(profile: str, overrides: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """(TinyModelConfig overrides, TrainConfig overrides), validated against the profile's configs."""
    tiny_fields = {f.name for f in dataclasses.fields(TinyModelConfig)} - {"seed"}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}
    tiny = {key: value for key, value in overrides.items() if key in tiny_fields}
    train = {(key if key in train_fields else key.removeprefix(TRAIN_PREFIX)): value for key, value in overrides.items() if key not in tiny_fields}
    config = profile_config(profile)
    with_overrides(config.tiny_model, tiny), with_overrides(config.train, train)  # refuse unknown names before anything runs
    return tiny, train


def base_key(tiny: dict[str, object], seed: int) -> str:
    return hashlib.sha256(json.dumps([tiny, seed], sort_keys=True).encode()).hexdigest()[:10]


def run_jobs(profile: str, jobs: list[dict], parallel: int, workdir: Path):
    """Run each job in its own process, `parallel` at a time; yield (job, row) as each one ends."""
    waiting, running = list(jobs), []
    while waiting or running:
        while waiting and len(running) < parallel:
            job = waiting.pop(0)
            log = open(workdir / f"{job['name']}.log", "w")
            command = [sys.executable, __file__, "--profile", profile, "--job", json.dumps(job)]
            running.append((job, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)))
        time.sleep(1)
        for job, process in [entry for entry in running if entry[1].poll() is not None]:
            running.remove((job, process))
            out = process.stdout.read()
            if process.returncode != 0:
                print(f"{job['name']}: failed, see {workdir / (job['name'] + '.log')}", file=sys.stderr)
                continue
            yield job, json.loads(out.strip().splitlines()[-1])


def pretrain_job(profile: str, job: dict) -> dict[str, object]:
    """The `base_model` stage for one tiny config and seed, and easy-VQA tokenized with its processor."""
    from vlmtune.base_model import prepare_base_model

    config = profile_config(profile, job["seed"])
    tiny = with_overrides(config.tiny_model, job["tiny"])
    workdir = Path(job["dir"])
    started = time.time()
    summary = prepare_base_model(TINY_MODEL_ID, None, False, tiny, workdir / "base", workdir / "checkpoints", _log(job["name"]))
    pretrain_seconds = time.time() - started
    (workdir / "base" / "summary.json").write_text(json.dumps(summary))
    write_easyvqa_dataset(workdir / "base" / "processor", workdir / "dataset", config.demo_data.max_finetune_samples, config.demo_data.max_test_samples)
    return {"pretrain_steps": summary["pretrain_steps"], "pretrain_s": round(pretrain_seconds, 1), "pretrain_eval_loss": summary["pretrain_eval_loss"]}


def lora_job(profile: str, job: dict) -> dict[str, object]:
    """LoRA on a pretrained base through `train_adapter`, then `evaluate_adapter` on the whole test split."""
    import pandas as pd

    from vlmtune.base_model import ref_from_summary
    from vlmtune.evaluate import evaluate_adapter
    from vlmtune.train import train_adapter

    config = profile_config(profile, job["seed"])
    _, train_overrides = split_overrides(profile, job["overrides"])
    train = with_overrides(config.train, train_overrides)
    base_dir, workdir = Path(job["base"]) / "base", Path(job["dir"])
    workdir.mkdir(parents=True, exist_ok=True)
    log = _log(job["name"])
    base = ref_from_summary(json.loads((base_dir / "summary.json").read_text()), base_dir)
    dataset_dir = Path(job["base"]) / "dataset"
    started = time.time()
    adapter = train_adapter(base, base_dir / "processor", dataset_dir, workdir / "adapter", train, workdir / "checkpoints", log)
    lora_seconds = time.time() - started
    (workdir / "report").mkdir(exist_ok=True)
    report = evaluate_adapter(base, workdir / "adapter", dataset_dir, workdir / "report", dataclasses.replace(config.eval, max_samples=None), log)
    full = json.loads((workdir / "report" / "report.json").read_text())
    per_type = {key: value["accuracy"] for key, value in full["per_answer_type"].items()}
    per_type |= yes_no_split(pd.read_parquet(workdir / "report" / "predictions.parquet"))
    return {
        "variant": job["variant"],
        "seed": job["seed"],
        "overrides": job["overrides"],
        "lora_steps": adapter["steps"],
        "lora_s": round(lora_seconds, 1),
        "best_eval_loss": adapter["best_eval_loss"],
        "accuracy": report["accuracy"],
        "ci95": full["ci95"],
        "base_accuracy": report["baselines"]["base_model"],
        "blind_accuracy": report["baselines"]["blind"],
        "image_shuffle_accuracy": report["baselines"]["image_shuffle"],
        "per_type": per_type,
        "n": report["n"],
        "device": adapter["device"],
    }


def yes_no_split(predictions) -> dict[str, float]:
    """Yes/no accuracy on questions that name a shape and on the others (which name a colour)."""
    yes_no = predictions[predictions["answer_type"] == "yes/no"]
    about_shape = yes_no["question"].str.contains("|".join(SHAPE_WORDS))
    return {"yes/no shape": float(yes_no[about_shape]["score"].mean()), "yes/no colour": float(yes_no[~about_shape]["score"].mean())}


def _log(name: str):
    return lambda message: print(f"[{name}] {message}", file=sys.stderr, flush=True)


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


TYPES = ("color", "shape", "yes/no", "yes/no shape", "yes/no colour")


def print_runs(rows: list[dict[str, object]]) -> None:
    print(f"{'run':<22}{'pretrain':>14}{'lora':>12}{'train s':>9}{'accuracy':>10}" + "".join(f"{t:>14}" for t in TYPES) + f"{'base':>8}{'blind':>8}  device")
    for row in rows:
        per_type = row["per_type"]
        print(
            f"{row['variant'] + ' s' + str(row['seed']):<22}{row['pretrain_steps']:>6} /{row['pretrain_s']:>6.0f}s{row['lora_steps']:>5} /{row['lora_s']:>4.0f}s"
            f"{row['pretrain_s'] + row['lora_s']:>9.0f}{row['accuracy']:>10.2%}" + "".join(f"{per_type.get(t, float('nan')):>14.1%}" for t in TYPES)
            + f"{row['base_accuracy']:>8.1%}{row['blind_accuracy']:>8.1%}  {row['device']}"
        )


def print_summary(rows: list[dict[str, object]]) -> None:
    """Per variant: mean [min, max] over its seeds of the accuracy and of each answer type."""
    print(f"{'variant':<14}{'seeds':>6}{'accuracy mean [min, max]':>28}" + "".join(f"{t + ' min':>18}" for t in TYPES))
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = [row for row in rows if row["variant"] == variant]
        accuracy = [row["accuracy"] for row in mine]
        spread = f"{statistics.mean(accuracy):.2%} [{min(accuracy):.2%}, {max(accuracy):.2%}]"
        minima = "".join(f"{min(row['per_type'].get(t, float('nan')) for row in mine):>18.1%}" for t in TYPES)
        print(f"{variant:<14}{len(mine):>6}{spread:>28}{minima}")


if __name__ == "__main__":
    main()
