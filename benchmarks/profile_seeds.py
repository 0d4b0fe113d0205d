"""A profile's accuracy and time through the whole pipeline, `vlmtune demo --profile P --seed S`, over seeds.

    python benchmarks/profile_seeds.py --profile gpu --seeds 0,1,2 --parallel 3 --out benchmarks/results/h200_gpu_profile_seeds.json
    python benchmarks/profile_seeds.py --profile demo                  # the CPU demo, alone on the machine

Each seed runs the command a user runs (Dagster, the training worker process, every baseline) in a
fresh `DAGSTER_HOME` / `VQA_HOME` / `VQA_DATA_DIR` of its own. Per seed it reads back the report
(accuracy per answer type, the yes/no questions split into those naming a shape and those naming a
colour, the baselines) and each step's time from the Dagster event log; then it prints the mean,
min and max over the seeds. This is the guard on the README's profile numbers: they are copied from
its result file, which names the commit and the machine. With `--parallel` above 1 the seeds share
the machine, so their times are upper bounds on a run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tiny_default import yes_no_split  # noqa: E402

from vlmtune.config import PROFILES  # noqa: E402

TYPES = ("color", "shape", "yes/no", "yes/no shape", "yes/no colour")
STAGES = ("base_model", "tokenized_dataset", "lora_adapter", "evaluation_report", "merged_model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="gpu")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--parallel", type=int, default=1, help="seeds run at once")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the rows and the summary here as JSON")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="profile-seeds-"))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    rows = []
    for start in range(0, len(seeds), args.parallel):
        running = [(seed, *start_demo(args.profile, seed, workdir / f"seed{seed}")) for seed in seeds[start : start + args.parallel]]
        for seed, process, started in running:
            code = process.wait()
            seconds = time.time() - started
            if code != 0:
                print(f"seed {seed}: vlmtune demo exited with {code}, see {workdir / f'seed{seed}' / 'demo.log'}", file=sys.stderr)
                continue
            rows.append(read_run(workdir / f"seed{seed}", seed, seconds))
    result = {"profile": args.profile, "parallel": args.parallel, **environment(), "rows": rows, "summary": summary(rows)}
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


def start_demo(profile: str, seed: int, home: Path) -> tuple[subprocess.Popen, float]:
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DAGSTER_HOME": str(home / "dagster"), "VQA_HOME": str(home / "artifacts"), "VQA_DATA_DIR": str(home / "data"),
           "VQA_AUTOMATION": "off", "PYTHONUNBUFFERED": "1"}
    log = open(home / "demo.log", "w")
    command = [sys.executable, "-m", "vlmtune.cli", "demo", "--profile", profile, "--seed", str(seed)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.time()


def read_run(home: Path, seed: int, seconds: float) -> dict:
    """The report and the step times of the demo that ran in `home`."""
    import pandas as pd

    from vlmtune.artifacts import ArtifactStore

    report_dir = ArtifactStore(home / "artifacts").require_current("evaluation_report").path
    report = json.loads((report_dir / "report.json").read_text())
    per_type = {key: value["accuracy"] for key, value in report["per_answer_type"].items()}
    per_type |= yes_no_split(pd.read_parquet(report_dir / "predictions.parquet"))
    return {
        "seed": seed,
        "end_to_end_s": round(seconds, 1),
        "stage_s": step_seconds(home / "dagster"),
        "accuracy": report["accuracy"],
        "ci95": report["ci95"],
        "n": report["n"],
        "per_type": per_type,
        "baselines": {name: value["accuracy"] for name, value in report["baselines"].items()},
    }


def step_seconds(dagster_home: Path) -> dict[str, float]:
    """Seconds of every step of every run in the instance (ingestion steps summed over the drops)."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home)))
    seconds: dict[str, float] = {}
    for run in instance.get_runs():
        for step in instance.get_run_step_stats(run.run_id):
            if step.start_time and step.end_time:
                seconds[step.step_key] = round(seconds.get(step.step_key, 0.0) + step.end_time - step.start_time, 1)
    return seconds


def summary(rows: list[dict]) -> dict:
    if not rows:
        return {}

    def spread(values):
        return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}

    return {
        "seeds": [row["seed"] for row in rows],
        "accuracy": spread([row["accuracy"] for row in rows]),
        "end_to_end_s": spread([row["end_to_end_s"] for row in rows]),
        "per_type": {t: spread([row["per_type"][t] for row in rows]) for t in TYPES if all(t in row["per_type"] for row in rows)},
        "stage_s": {s: spread([row["stage_s"].get(s, 0.0) for row in rows]) for s in STAGES},
        "baselines": {b: spread([row["baselines"][b] for row in rows]) for b in rows[0]["baselines"]},
    }


def environment() -> dict:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return {"commit": commit + ("+changes" if dirty else ""), "device": device, "torch": torch.__version__, "transformers": transformers.__version__}


def print_table(result: dict) -> None:
    print(f"profile {result['profile']} at {result['commit']} on {result['device']} ({result['parallel']} at once)")
    print(f"{'seed':<6}{'end to end':>11}" + "".join(f"{s:>19}" for s in STAGES) + f"{'accuracy':>10}" + "".join(f"{t:>14}" for t in TYPES) + f"{'blind':>8}{'base':>8}")
    for row in result["rows"]:
        print(f"{row['seed']:<6}{row['end_to_end_s']:>10.0f}s" + "".join(f"{row['stage_s'].get(s, 0.0):>18.0f}s" for s in STAGES)
              + f"{row['accuracy']:>10.2%}" + "".join(f"{row['per_type'].get(t, float('nan')):>14.1%}" for t in TYPES)
              + f"{row['baselines'].get('blind', float('nan')):>8.1%}{row['baselines'].get('base_model', float('nan')):>8.1%}")
    if not result["summary"]:
        return
    s = result["summary"]
    print(f"mean [min, max] over seeds {s['seeds']}: accuracy {s['accuracy']['mean']:.2%} [{s['accuracy']['min']:.2%}, {s['accuracy']['max']:.2%}], "
          f"end to end {s['end_to_end_s']['mean']:.0f} s [{s['end_to_end_s']['min']:.0f}, {s['end_to_end_s']['max']:.0f}]")
    print("  minimum per type: " + ", ".join(f"{t} {v['min']:.1%}" for t, v in s["per_type"].items()))


if __name__ == "__main__":
    main()
