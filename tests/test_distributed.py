"""The multi-process training path on CPU: two gloo processes through the launcher, then a resume on one."""

import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

from resources import TrainingLauncher
from vlmtune.config import TinyModelConfig, TrainConfig, as_dict
from vlmtune.models import BaseModelRef, build_tiny_vlm
from vlmtune.pinning import processor_pins
from vlmtune.tokenization import dataset_from_rows, encode_batch, save_dataset

ROOT = Path(__file__).resolve().parents[1]


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (i * 20 % 255, 80, 0)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def spec(tmp_path):
    model, processor = build_tiny_vlm(TinyModelConfig(vision_hidden=32, text_hidden=32, heads=2))
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")

    def rows(split, n):
        examples = encode_batch(processor, [f"q{i}?" for i in range(n)], ["red"] * n, [png(i) for i in range(n)])
        return [{"sample_id": f"{split}:{i}", "drop": "d", "split": split, "image_sha256": f"{split}{i}",
                 "image": {"bytes": png(i), "path": None}, "question": f"q{i}?", "answer": "red", "answer_type": "other",
                 "question_type": "q", **example} for i, example in enumerate(examples)]

    splits = {name: dataset_from_rows(rows(name, n)) for name, n in (("train", 32), ("validation", 8), ("test", 4))}
    save_dataset(datasets.DatasetDict(splits), tmp_path / "dataset")

    def write(version: str, max_steps: int) -> Path:
        path = tmp_path / f"{version}.json"
        path.write_text(json.dumps({
            "store_root": str(tmp_path / "store"), "version": version, "inputs": {"drop_versions": {}},
            "config": as_dict(TrainConfig(max_steps=max_steps, eval_steps=2, batch_size=4)),
            "base": BaseModelRef("tiny", weights_dir=str(tmp_path / "base")).to_dict(), "processor_dir": str(tmp_path / "base"),
            "dataset_dir": str(tmp_path / "dataset"), "checkpoint_dir": str(tmp_path / "checkpoints"),
            "warm_start_dir": None, "warm_start_from": None, "pins": processor_pins(processor),
        }))
        return path

    return tmp_path, write


def run(command: list[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def summary(root: Path, version: str) -> dict:
    return json.loads((root / "store" / "lora_adapter" / "_all" / version / "summary.json").read_text())


def test_two_processes_train_together_and_a_single_process_resumes_their_checkpoint(spec):
    root, write = spec
    two = TrainingLauncher(num_processes=2).command("pipelines.train_worker")
    assert "--multi_gpu" in two and two[two.index("--num_processes") + 1] == "2"
    run([*two, str(write("v1", 4))])
    first = summary(root, "v1")
    assert first["world_size"] == 2 and first["steps"] == 4

    one = TrainingLauncher().command("pipelines.train_worker")
    assert one == [sys.executable, "-m", "pipelines.train_worker"]
    run([*one, str(write("v2", 6))])
    resumed = summary(root, "v2")
    assert resumed["world_size"] == 1 and resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert (root / "store" / "lora_adapter" / "_all" / "v2" / "adapter_model.safetensors").is_file()


def test_training_logs_metrics_and_the_manifest_to_tensorboard(spec):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, write = spec
    run([*TrainingLauncher().command("pipelines.train_worker"), str(write("tb", 4))])
    runs = root / "checkpoints" / "runs"
    manifest_events = EventAccumulator(str(runs / "manifest"), size_guidance={"tensors": 0})
    manifest_events.Reload()
    [text] = manifest_events.Tensors("manifest/text_summary")
    logged = text.tensor_proto.string_val[0].decode()
    assert '"pins"' in logged and '"git_commit"' in logged and '"learning_rate"' in logged
    metric_runs = [path for path in runs.iterdir() if path.name != "manifest"]
    metrics = EventAccumulator(str(metric_runs[0]))
    metrics.Reload()
    assert "train/loss" in metrics.Tags()["scalars"]


def test_with_a_tracking_uri_the_manifest_and_metrics_go_to_mlflow(spec, tmp_path, monkeypatch):
    import pytest

    mlflow = pytest.importorskip("mlflow", reason="mlflow is optional; install it to log to a tracking server")
    root, write = spec
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a plain folder keeps the test self-contained
    run([*TrainingLauncher().command("pipelines.train_worker"), str(write("mlflow", 4))])
    [experiment] = [e for e in mlflow.MlflowClient(tracking_uri=store.as_uri()).search_experiments() if e.name == "Default"]
    [logged] = mlflow.MlflowClient(tracking_uri=store.as_uri()).search_runs([experiment.experiment_id])
    artifacts = [item.path for item in mlflow.MlflowClient(tracking_uri=store.as_uri()).list_artifacts(logged.info.run_id)]
    assert "manifest.json" in artifacts
    assert "train_loss" in logged.data.metrics or "loss" in logged.data.metrics


def test_the_scaling_benchmark_runs_data_parallel_processes(tmp_path):
    result = tmp_path / "scaling.json"
    run([sys.executable, "benchmarks/train_throughput.py", "--tiny", "--gpus", "2", "--steps", "2", "--warmup", "1", "--json", str(result)])
    rows = json.loads(result.read_text())["scaling"]
    assert [row["world_size"] for row in rows] == [1, 2]
    assert rows[0]["efficiency"] == 1.0 and all(row["tokens_per_s"] > 0 for row in rows)


def test_the_trainer_process_grows_cuda_memory_in_place_unless_the_user_says_otherwise(monkeypatch):
    from pipelines import train_worker

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    train_worker.use_allocator_default()
    assert train_worker.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    train_worker.use_allocator_default()
    assert train_worker.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
