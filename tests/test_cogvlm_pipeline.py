"""The Dagster pipeline end to end with a CogVLM base model: tests/fixtures/tiny_cogvlm through every asset.

The drop asks the colour of solid images, each with a black square in its own place so that no two
are near-identical and the clean stage keeps them all; the records give their splits. The base is
the fixture's folder with random weights, run with `trust_remote_code`, configured as a user would
in the launchpad: run config for the `base` resource and for `lora_adapter`.
"""

import json
from pathlib import Path

import dagster as dg
import datasets
from PIL import Image

from pipelines.definitions import build_definitions
from pipelines.jobs import TRAIN_ASSETS
from test_cogvlm import COLORS, build_base
from vlmtune.collate import TrainingCollator
from vlmtune.generate import greedy_answers
from vlmtune.merge import load_standalone
from vlmtune.models import load_processor
from vlmtune.tokenization import IGNORE_INDEX

SPLITS = {"train": 40, "validation": 8, "test": 12}
# tests/test_cogvlm.py's TRAINING, which learns the colours; the smoke profile already turns checkpointing off
TRAINING = {"learning_rate": 1e-2, "max_steps": 60, "batch_size": 4}


def write_colour_drop(drop: Path) -> Path:
    (drop / "images").mkdir(parents=True)
    names, records, index = list(COLORS), [], 0
    for split, n in SPLITS.items():
        for _ in range(n):
            answer = names[index % len(names)]
            image = Image.new("RGB", (32, 32), COLORS[answer])
            cell = index // len(names)  # a different 8x8 thumbnail cell per image of a colour
            image.paste((0, 0, 0), (4 * (cell % 8), 4 * (cell // 8), 4 * (cell % 8) + 4, 4 * (cell // 8) + 4))
            image.save(drop / "images" / f"{index}.png")
            records.append({"image": f"images/{index}.png", "question": "What color is it?", "answer": answer, "split": split})
            index += 1
    (drop / "annotations.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return drop


def latest(instance, asset):
    return instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata


def artifact_dir(instance, asset) -> Path:
    return Path(latest(instance, asset)["path"].value)


def test_the_whole_graph_ships_a_cogvlm_adapter(tmp_path):
    folder = build_base(tmp_path, "cogvlm")
    write_colour_drop(tmp_path / "data" / "drops" / "colours")
    defs = build_definitions(profile="smoke", home=str(tmp_path / "artifacts"), data_dir=str(tmp_path / "data"), retries=0, automation=False)
    # a resource's run config replaces all its constructor values, so the model id comes with the opt-in
    run_config = {
        "resources": {"base": {"config": {"model_id": str(folder), "trust_remote_code": True}}},
        "ops": {"lora_adapter": {"config": TRAINING}},
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("drops", ["colours"])
        assert defs.resolve_job_def("ingest_drop").execute_in_process(instance=instance, partition_key="colours").success
        result = defs.resolve_job_def("train_and_ship").execute_in_process(instance=instance, run_config=run_config, raise_on_error=False)
        assert result.success, [event.message for event in result.all_events if event.is_failure]
        assert set(TRAIN_ASSETS) <= {event.asset_key.to_user_string() for event in result.all_events if event.is_step_materialization}
        checks = {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}
        assert checks == dict.fromkeys(("tokenized_dataset_sound", "lora_really_trained", "ready_to_ship", "uses_the_image", "merged_matches_adapter"), True)
        assert latest(instance, "clean_samples")["n_kept"].value == sum(SPLITS.values()), "no image was lost as a near duplicate"
        base = latest(instance, "base_model")
        assert base["model_id"].value == str(folder) and base["revision"].value == "local"
        base_dir, data_dir, adapter_dir, report_dir, merged = (artifact_dir(instance, asset) for asset in TRAIN_ASSETS)

    processor = load_processor(base_dir / "processor")
    dataset = datasets.load_from_disk(str(data_dir / "dataset"))
    assert {split: dataset[split].num_rows for split in dataset} == SPLITS
    rows = [dataset["train"][0], dataset["train"][1]]
    n_vision = processor.vision_token_count
    # their layout: BOS, one pad placeholder per vision token, then the text, which token_type_ids route by position
    assert rows[0]["input_ids"][: 1 + n_vision] == [processor.tokenizer.bos_token_id] + [processor.tokenizer.pad_token_id] * n_vision
    assert set(rows[0]["labels"][: rows[0]["prompt_length"]]) == {IGNORE_INDEX}, "the prompt is masked"
    assert processor.tokenizer.decode(rows[0]["labels"][rows[0]["prompt_length"] :]) == rows[0]["answer"] + "</s>"
    batch = TrainingCollator(processor)(rows)
    assert batch["token_type_ids"][0].tolist() == [0] + [1] * n_vision + [0] * (batch["input_ids"].shape[1] - 1 - n_vision)

    adapter = json.loads((adapter_dir / "summary.json").read_text())
    assert adapter["gradient_checkpointing"] is False and adapter["steps"] == TRAINING["max_steps"]
    assert adapter["train_loss_last"] < 0.5 * adapter["train_loss_first"], adapter

    report = json.loads((report_dir / "report.json").read_text())
    blind = report["baselines"]["blind"]
    assert report["n"] == SPLITS["test"] and report["accuracy"] > blind["accuracy"], (report["accuracy"], blind)
    assert blind["difference_ci95"][0] > 0, "beats the blind baseline beyond its 95 % interval"

    assert {path.name for path in folder.glob("*.py")} <= {path.name for path in merged.iterdir()}
    model = load_standalone(merged, trust_remote_code=True)
    assert type(model).__name__ == "CogVLMForCausalLM"
    answers, _ = greedy_answers(model, load_processor(merged), dataset["test"], batch_size=SPLITS["test"], max_new_tokens=8)
    assert sum(answer == reference for answer, reference in zip(answers, dataset["test"]["answer"])) / len(answers) == report["accuracy"]
