"""`vlmtune`: run the pipeline through Dagster from the command line.

    vlmtune demo [--profile smoke|demo|gpu] [--seed N]
                                          write the easy-VQA drops and materialize every asset
    vlmtune ingest PATH [--name NAME]     register one drop and materialize its raw and clean samples
    vlmtune reexecute RUN_ID              re-run a failed run from its failed step; upstream results are reused

Runs go into the persistent Dagster instance at $DAGSTER_HOME (default ./.dagster), so
`dagster dev -w workspace.yaml` shows them afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from vlmtune.config import PROFILES, profile_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlmtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the whole pipeline on the bundled easy-VQA data")
    demo.add_argument("--profile", choices=PROFILES, default=os.environ.get("VQA_PROFILE", "demo"))
    demo.add_argument("--seed", type=int, default=int(os.environ.get("VQA_SEED", "0")), help="seeds pretraining and training")
    ingest = commands.add_parser("ingest", help="add one drop folder and process its raw and clean samples")
    ingest.add_argument("path", type=Path)
    ingest.add_argument("--name", help="partition name (default: the folder's name)")
    reexecute = commands.add_parser("reexecute", help="re-run a failed run from failure, as the UI's 'Re-execute from failure'")
    reexecute.add_argument("run_id")
    args = parser.parse_args(argv)
    _default_environment()
    if args.command == "demo":
        os.environ["VQA_PROFILE"], os.environ["VQA_SEED"] = args.profile, str(args.seed)
        return run_demo(args.profile)
    if args.command == "reexecute":
        return run_reexecute(args.run_id)
    return run_ingest(args.path, args.name)


def run_demo(profile: str) -> int:
    from vlmtune.easyvqa import write_demo_drops

    started = time.time()
    config = profile_config(profile)
    drops_dir = Path(os.environ["VQA_DATA_DIR"]) / "drops"
    drop_dirs = write_demo_drops(
        drops_dir, config.demo_data.max_finetune_samples, config.demo_data.max_test_samples
    )
    print(f"[vlmtune] profile {profile}: drops {[d.name for d in drop_dirs]} under {drops_dir}")
    instance = _instance()
    _register_drops(instance, [d.name for d in drop_dirs])
    timings = {}
    for drop_dir in drop_dirs:
        timings[f"ingest {drop_dir.name}"] = _execute(instance, "ingest_drop", partition_key=drop_dir.name)
    timings["train_and_ship"] = _execute(instance, "train_and_ship")
    _print_headline(instance, timings, time.time() - started)
    return 0


def run_ingest(path: Path, name: str | None) -> int:
    source = path.resolve()
    if not source.is_dir():
        print(f"[vlmtune] {source} is not a folder", file=sys.stderr)
        return 2
    drops_dir = Path(os.environ["VQA_DATA_DIR"]) / "drops"
    name = name or source.name
    target = drops_dir / name
    if target.resolve() != source:
        if target.exists():
            print(f"[vlmtune] a different drop named {name!r} already exists at {target}", file=sys.stderr)
            return 2
        drops_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target, symlinks=True)  # links are copied as links and judged inside the drop
        copied = True
    else:
        copied = False
    instance = _instance()
    registered = _register_drops(instance, [name])
    try:
        _execute(instance, "ingest_drop", partition_key=name)
    except SystemExit:
        # a drop that could not be ingested is not left behind: registered, it would fail every later
        # training run ("registered but have no clean_samples"), and its copy would block the retry
        _unregister_drops(instance, registered)
        if copied:
            shutil.rmtree(target)
        raise
    summary = _clean_summary(instance, name)
    print(f"[vlmtune] drop {name}: {summary['n_in']} records, {summary['n_kept']} kept, {summary['n_quarantined']} quarantined {summary['quarantine_reasons']}")
    return 0


def run_reexecute(run_id: str) -> int:
    import dagster as dg

    instance = _instance()
    run = instance.get_run_by_id(run_id)
    if run is None:
        print(f"[vlmtune] no run {run_id} in {os.environ['DAGSTER_HOME']}", file=sys.stderr)
        return 2
    result = dg.execute_job(
        _reconstructable(run.job_name), instance, reexecution_options=dg.ReexecutionOptions.from_failure(run_id, instance)
    )
    print(f"[vlmtune] re-execution {result.run_id} of {run.job_name}: {'succeeded' if result.success else 'failed'}")
    return 0 if result.success else 1


# The instance's defaults: one GPU-bound step at a time (the `gpu` pool), and no usage statistics.
INSTANCE_YAML = """\
concurrency:
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""


def _default_environment() -> None:
    for variable, default in (("DAGSTER_HOME", ".dagster"), ("VQA_HOME", "artifacts"), ("VQA_DATA_DIR", "data")):
        path = Path(os.environ.get(variable) or default).resolve()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(path)
    instance_yaml = Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml"
    if not instance_yaml.exists():
        instance_yaml.write_text(INSTANCE_YAML)


def _instance():
    import dagster as dg

    return dg.DagsterInstance.get()


def _reconstructable(job_name: str):
    """Jobs are run through a re-importable handle so the UI and `reexecute` can run them again."""
    import dagster as dg

    from pipelines import definitions

    handles = {"ingest_drop": definitions.ingest_drop_job, "train_and_ship": definitions.train_and_ship_job}
    job = dg.reconstructable(handles[job_name])
    # Dagster keeps the last job it reconstructed (an lru_cache on the class, shared by every handle).
    # The handles build from the environment, so a later call in this process with other folders
    # (tests, notebooks) must not be handed the earlier call's resources.
    type(job).get_definition.cache_clear()
    type(job).get_repository_definition.cache_clear()
    return job


def _register_drops(instance, names: list[str]) -> list[str]:
    """Register the drops Dagster does not know yet; return those it registered."""
    from pipelines.partitions import drops_partitions

    known = set(instance.get_dynamic_partitions(drops_partitions.name))
    new = [name for name in names if name not in known]
    if new:
        instance.add_dynamic_partitions(drops_partitions.name, new)
    return new


def _unregister_drops(instance, names: list[str]) -> None:
    from pipelines.partitions import drops_partitions

    for name in names:
        instance.delete_dynamic_partition(drops_partitions.name, name)


def _clean_summary(instance, drop: str) -> dict:
    """The summary of the clean_samples version Dagster recorded last for `drop`."""
    import dagster as dg

    from vlmtune.artifacts import ArtifactStore

    [record] = instance.fetch_materializations(dg.AssetRecordsFilter(dg.AssetKey("clean_samples"), asset_partitions=[drop]), limit=1).records
    fp = record.asset_materialization.metadata["fingerprint"].value
    return ArtifactStore(os.environ["VQA_HOME"]).find("clean_samples", fp, drop).summary


def _execute(instance, job_name: str, partition_key: str | None = None) -> float:
    import dagster as dg

    started = time.time()
    tags = {"dagster/partition": partition_key} if partition_key else None
    result = dg.execute_job(_reconstructable(job_name), instance, tags=tags)
    if not result.success:
        failed = [event.step_key for event in result.all_events if event.is_step_failure]
        raise SystemExit(
            f"[vlmtune] run {result.run_id} of {job_name} failed in {failed}; "
            f"fix the cause, then `vlmtune reexecute {result.run_id}` (or Re-execute from failure in the UI)"
        )
    return time.time() - started


def _print_headline(instance, timings: dict[str, float], total: float) -> None:
    """The model this run shipped, with the report and adapter it names (never the store's moving pointers)."""
    import dagster as dg

    from vlmtune.artifacts import ArtifactStore, read_json

    store = ArtifactStore(os.environ["VQA_HOME"])
    event = instance.get_latest_materialization_event(dg.AssetKey("merged_model"))
    merged = store.find("merged_model", event.asset_materialization.metadata["fingerprint"].value)
    manifest = read_json(merged.path / "manifest.json")
    report, adapter = store.find("evaluation_report", manifest["evaluation_report"]), store.find("lora_adapter", manifest["lora_adapter"])
    summary = report.summary
    print("\n[vlmtune] done in {:.0f}s ({})".format(total, ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())))
    print(f"  {'accuracy':<27}{summary['accuracy']:.1%} on {summary['n']} test questions")
    for name, value in summary["baselines"].items():
        print(f"  {'baseline ' + name:<27}{value:.1%}")
    for name, value in summary["per_answer_type"].items():
        print(f"  {name:<27}{value:.1%}")
    print(f"  {'adapter':<27}{adapter.path} ({adapter.summary['trainable_share']:.2%} of parameters trained)")
    print(f"  {'merged model':<27}{merged.path} (max logit diff {merged.summary['max_logit_diff']:.2e})")
    print(f"  {'report':<27}{report.path / 'report.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
