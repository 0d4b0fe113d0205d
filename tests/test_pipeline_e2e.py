"""The whole graph through Dagster on the smoke profile, every artifact loaded back as a user would."""

import json
from pathlib import Path

import dagster as dg
import datasets
import pytest
import torch

from pipelines.definitions import build_definitions
from vlmtune.cli import main

STAGES = ["raw_samples", "clean_samples", "base_model", "tokenized_dataset", "lora_adapter", "evaluation_report", "merged_model"]
CHECKS = [
    ("clean_samples", "clean_counts_conserved"),
    ("tokenized_dataset", "tokenized_dataset_sound"),
    ("evaluation_report", "ready_to_ship"),
    ("merged_model", "merged_matches_adapter"),
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as patch:
        for variable, folder in (("DAGSTER_HOME", ".dagster"), ("VQA_HOME", "artifacts"), ("VQA_DATA_DIR", "data")):
            patch.setenv(variable, str(root / folder))
        patch.setenv("VQA_PROFILE", "smoke")
        assert main(["demo", "--profile", "smoke"]) == 0
        yield root, dg.DagsterInstance.get()


def latest(instance, asset):
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was never materialized"
    return event.asset_materialization.metadata


def test_every_asset_is_materialized_with_its_path(smoke_run):
    root, instance = smoke_run
    for asset in STAGES:
        path = Path(latest(instance, asset)["path"].value)
        assert path.is_dir() and path.is_relative_to(root / "artifacts"), asset
        assert (path / "manifest.json").is_file()
    clean = latest(instance, "clean_samples")
    assert clean["n_in"].value == clean["n_kept"].value + clean["n_quarantined"].value
    assert set(instance.get_dynamic_partitions("drops")) == {"easyvqa-train", "easyvqa-test"}


def test_every_check_ran_and_passed(smoke_run):
    _, instance = smoke_run
    keys = [dg.AssetCheckKey(dg.AssetKey(asset), name) for asset, name in CHECKS]
    records = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    for key in keys:
        evaluation = records[key].event.asset_check_evaluation
        assert evaluation.passed, (key, evaluation.metadata)


def test_artifacts_load_back(smoke_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, instance = smoke_run
    dataset = datasets.load_from_disk(str(Path(latest(instance, "tokenized_dataset")["path"].value) / "dataset"))
    assert set(dataset) == {"train", "validation", "test"} and all(dataset[s].num_rows > 0 for s in dataset)
    assert isinstance(dataset["train"].features["image"], datasets.Image)

    base_dir = Path(latest(instance, "base_model")["path"].value) / "weights"
    adapter_dir = Path(latest(instance, "lora_adapter")["path"].value)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), adapter_dir)

    merged_dir = Path(latest(instance, "merged_model")["path"].value)
    assert not list(merged_dir.glob("*.bin")), "no pickle weights"
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(merged_dir, local_files_only=True)
    row = dataset["test"][0]
    inputs = processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}], add_generation_prompt=True
    )], images=[row["image"]], return_tensors="pt")
    with torch.inference_mode():
        merged_logits = merged(**inputs).logits
        adapted_logits = adapted(**inputs).logits
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-3)

    report_dir = Path(latest(instance, "evaluation_report")["path"].value)
    report = json.loads((report_dir / "report.json").read_text())
    assert report["n"] > 0 and 0 <= report["accuracy"] <= 1
    assert {"majority", "blind"} <= set(report["baselines"]) and report["per_answer_type"]
    assert (report_dir / "report.md").read_text().startswith("# Evaluation report")
    assert (report_dir / "plots.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_run_recomputes_nothing(smoke_run):
    _, instance = smoke_run
    before = {asset: latest(instance, asset)["fingerprint"].value for asset in STAGES}
    assert main(["demo", "--profile", "smoke"]) == 0
    for asset in STAGES:
        metadata = latest(instance, asset)
        assert metadata["cached"].value is True, asset
        assert metadata["fingerprint"].value == before[asset]


def test_changing_a_training_setting_retrains_without_retokenizing(smoke_run):
    root, instance = smoke_run
    defs = build_definitions(profile="smoke")
    result = defs.resolve_job_def("train_and_ship").execute_in_process(
        # more steps, not fewer: a 150-step smoke adapter lands on the blind baseline (70-71 % of 200
        # questions, CPU runs differ by a question or two) and the blocking ready_to_ship check refuses it
        instance=instance, run_config={"ops": {"lora_adapter": {"config": {"max_steps": 250}}}}
    )
    assert result.success
    assert latest(instance, "tokenized_dataset")["cached"].value is True
    assert latest(instance, "base_model")["cached"].value is True
    adapter = latest(instance, "lora_adapter")
    assert adapter["cached"].value is False and adapter["steps"].value <= 250
    report = latest(instance, "evaluation_report")
    assert report["cached"].value is False
    assert 0 <= report["previous_adapter_accuracy"].value <= 1, "the 200-step adapter is scored as the previous version"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU (bitsandbytes 4-bit training)")
def test_qlora_trains_and_is_evaluated_through_the_pipeline(smoke_run):
    pytest.importorskip("bitsandbytes")
    _, instance = smoke_run
    defs = build_definitions(profile="smoke")
    result = defs.resolve_job_def("train_and_ship").execute_in_process(
        instance=instance, run_config={"ops": {"lora_adapter": {"config": {"method": "qlora", "max_steps": 250}}}}, raise_on_error=False
    )
    adapter = latest(instance, "lora_adapter")
    assert adapter["cached"].value is False
    config = json.loads((Path(adapter["path"].value) / "train_config.json").read_text())
    assert config["method"] == "qlora" and config["qlora_dtype"] == "float32"
    report = latest(instance, "evaluation_report")
    assert report["cached"].value is False  # the QLoRA adapter was scored, not the earlier one
    print(f"QLoRA smoke: accuracy {report['accuracy'].value:.3f}, blind {report['blind_accuracy'].value:.3f}, "
          f"majority {report['majority_accuracy'].value:.3f}, run success {result.success}")
    assert report["accuracy"].value > report["majority_accuracy"].value


def _materialize(defs, instance, selection, run_config=None):
    return dg.materialize(
        [*defs.assets, *defs.asset_checks], instance=instance, resources=defs.resources, selection=selection,
        run_config=run_config or {}, raise_on_error=False,
    )


def _recorded_inputs(instance, asset) -> dict[str, str]:
    """The upstream data versions Dagster recorded on the latest materialization of `asset`."""
    prefix = "dagster/input_data_version/"
    tags = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.tags or {}
    return {key.removeprefix(prefix): value for key, value in tags.items() if key.startswith(prefix)}


def _failure_text(result) -> str:
    return " ".join(event.step_failure_data.error.to_string() for event in result.all_events if event.is_step_failure)


def test_only_an_adapter_its_passing_report_evaluated_is_ever_merged(smoke_run):
    _, instance = smoke_run
    defs = build_definitions(profile="smoke")
    shipped = latest(instance, "merged_model")
    adapter_a, report_a = shipped["lora_adapter"].value, shipped["evaluation_report"].value
    assert _recorded_inputs(instance, "merged_model")["lora_adapter"] == adapter_a
    assert _recorded_inputs(instance, "merged_model")["evaluation_report"] == report_a

    # adapter B: four steps from the base (every LoRA layer moves), far below the blind baseline
    assert _materialize(defs, instance, ["lora_adapter"], {"ops": {"lora_adapter": {"config": {"max_steps": 4}}}}).success
    adapter_b = latest(instance, "lora_adapter")["fingerprint"].value
    assert adapter_b != adapter_a

    # merging on its own now would pair B with A's report: refused, nothing shipped
    unevaluated = _materialize(defs, instance, ["merged_model"])
    assert not unevaluated.success and "has no evaluation yet" in _failure_text(unevaluated)
    assert latest(instance, "merged_model")["lora_adapter"].value == adapter_a

    # B's evaluation: compared with the shipped A, refused by the blocking gate
    _materialize(defs, instance, ["evaluation_report"])
    report_b = latest(instance, "evaluation_report")
    assert report_b["lora_adapter"].value == adapter_b == _recorded_inputs(instance, "evaluation_report")["lora_adapter"]
    assert adapter_a in report_b["previous_adapter"].value
    gate = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("evaluation_report"), "ready_to_ship")]
    )[dg.AssetCheckKey(dg.AssetKey("evaluation_report"), "ready_to_ship")].event.asset_check_evaluation
    assert not gate.passed and gate.metadata["lora_adapter"].value == adapter_b

    # however it is launched, the merge refuses the rejected adapter and names the reason
    rejected = _materialize(defs, instance, ["merged_model"])
    assert not rejected.success and "did not pass the promotion gate" in _failure_text(rejected)
    assert latest(instance, "merged_model")["lora_adapter"].value == adapter_a
