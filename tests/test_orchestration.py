"""Orchestration as users drive it: new drops alone, scheduled retraining, and a killed training run resumed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from pipelines.definitions import build_definitions
from vlmtune.artifacts import ArtifactStore
from vlmtune.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("orchestration")
    env = {"DAGSTER_HOME": str(root / ".dagster"), "VQA_HOME": str(root / "artifacts"), "VQA_DATA_DIR": str(root / "data"),
           "VQA_PROFILE": "smoke", "VQA_RETRIES": "0", "VQA_AUTOMATION": "off"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert main(["demo", "--profile", "smoke"]) == 0
        yield root, env, dg.DagsterInstance.get()


def materializations(instance, run_id):
    return sorted({
        entry.dagster_event.asset_key.to_user_string()
        for entry in instance.all_logs(run_id)
        if entry.is_dagster_event and entry.dagster_event.is_step_materialization
    })


def test_a_new_drop_costs_only_its_own_processing_and_triggers_retraining(pipeline, capsys):
    root, env, instance = pipeline
    defs = build_definitions()
    schedule = defs.resolve_schedule_def("retrain_on_new_data")
    resources = {"artifacts": defs.resources["artifacts"]}
    skipped = schedule(dg.build_schedule_context(instance=instance, resources=resources))
    assert isinstance(skipped, dg.SkipReason), "nothing new since the adapter: no retraining"

    source = root / "data" / "drops" / "easyvqa-train"
    new_drop = root / "incoming" / "extra"
    (new_drop / "images").mkdir(parents=True)
    lines = (source / "annotations.jsonl").read_text().splitlines()[:6]
    for line in lines:
        image = json.loads(line)["image"]
        shutil.copyfile(source / image, new_drop / image)
    (new_drop / "annotations.jsonl").write_text("\n".join(lines + ['{"broken": ']) + "\n")
    assert main(["ingest", str(new_drop)]) == 0, "bad records are quarantined, not an operational failure"
    assert "7 records, 6 kept, 1 quarantined" in capsys.readouterr().out

    request = schedule(dg.build_schedule_context(instance=instance, resources=resources))
    assert isinstance(request, dg.RunRequest) and "extra" in request.tags["vlmtune/retrain_reason"]
    result = dg.execute_job(dg.reconstructable(__import__("pipelines.definitions", fromlist=["x"]).train_and_ship_job), instance)
    assert result.success
    metadata = {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
                for e in result.all_events if e.is_step_materialization}
    assert metadata["tokenized_dataset"]["shards_reused"].value == 2 and metadata["tokenized_dataset"]["shards_tokenized"].value == 1
    assert metadata["base_model"]["cached"].value is True
    assert metadata["lora_adapter"]["cached"].value is False
    assert "extra" in json.loads(metadata["lora_adapter"]["trained_on"].value)
    assert isinstance(schedule(dg.build_schedule_context(instance=instance, resources=resources)), dg.SkipReason)


def test_a_killed_training_run_resumes_from_its_checkpoint_on_reexecution(pipeline, tmp_path):
    root, env, instance = pipeline
    config = tmp_path / "run.yaml"
    config.write_text("ops:\n  lora_adapter:\n    config:\n      max_steps: 400\n      seed: 7\n")
    child_env = {**os.environ, **env}
    job_log = tmp_path / "job.log"
    job = subprocess.Popen(
        [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipelines.definitions", "-j", "train_and_ship", "-c", str(config)],
        env=child_env, stdout=job_log.open("w"), stderr=subprocess.STDOUT,
    )
    work = Path(env["VQA_HOME"]) / "_work" / "lora_adapter" / "_all"
    earlier_versions = set(work.iterdir())
    worker = None
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        new_versions = set(work.iterdir()) - earlier_versions
        if any(next(version.glob("checkpoints/checkpoint-*/trainer_state.json"), None) for version in new_versions):
            worker = _find_process("pipelines.train_worker")
            if worker:
                os.kill(worker, signal.SIGKILL)
                break
        time.sleep(0.05)
    assert worker, f"the trainer never wrote a checkpoint: {job_log.read_text()[-3000:]}"
    assert job.wait(timeout=120) != 0, "the run fails when its trainer is killed"

    [failed] = instance.get_runs(filters=dg.RunsFilter(job_name="train_and_ship", statuses=[dg.DagsterRunStatus.FAILURE]), limit=1)
    assert main(["reexecute", failed.run_id]) == 0
    [rerun] = instance.get_runs(limit=1)
    assert rerun.parent_run_id == failed.run_id
    done = materializations(instance, rerun.run_id)
    assert "lora_adapter" in done and "base_model" not in done and "tokenized_dataset" not in done, done
    adapter = ArtifactStore(env["VQA_HOME"]).require_current("lora_adapter")
    assert adapter.summary["resumed_from_step"] > 0 and adapter.summary["steps"] >= adapter.summary["resumed_from_step"]
    assert (adapter.path / "adapter_model.safetensors").is_file()


def _find_process(fragment: str) -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if fragment in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    return int(proc.name)
            except OSError:
                continue
    return None


def test_a_drop_that_cannot_be_ingested_is_not_left_registered_and_can_be_retried(pipeline, capsys):
    root, env, instance = pipeline
    broken = root / "incoming" / "no-layout"
    broken.mkdir(parents=True)
    (broken / "notes.txt").write_text("no annotations in any known layout")
    with pytest.raises(SystemExit, match="failed"):
        main(["ingest", str(broken)])
    assert "no-layout" not in instance.get_dynamic_partitions("drops"), "a half-registered drop would fail every training run"
    assert not (root / "data" / "drops" / "no-layout").exists(), "its copy would block the retry"

    # fixed at the source, the same command now ingests it
    source = root / "data" / "drops" / "easyvqa-train"
    (broken / "images").mkdir()
    lines = (source / "annotations.jsonl").read_text().splitlines()[:3]
    for line in lines:
        shutil.copyfile(source / json.loads(line)["image"], broken / json.loads(line)["image"])
    (broken / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["ingest", str(broken)]) == 0
    assert "no-layout" in instance.get_dynamic_partitions("drops")
    assert "3 records, 3 kept, 0 quarantined" in capsys.readouterr().out
