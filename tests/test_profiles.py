"""Profiles and their seeds, and the seed benchmarks' read-out of a run."""

import sys
from pathlib import Path

import pandas as pd
import pytest

from resources import PipelineSettings
from vlmtune.config import profile_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_seeds  # noqa: E402
import tiny_default  # noqa: E402


@pytest.mark.parametrize("profile", ["smoke", "demo", "gpu"])
def test_a_seed_seeds_pretraining_and_training_and_changes_nothing_else(profile):
    default, seeded = profile_config(profile), profile_config(profile, seed=3)
    assert (default.tiny_model.seed, default.train.seed) == (0, 0)
    assert (seeded.tiny_model.seed, seeded.train.seed) == (3, 3)
    assert seeded.tiny_model.pretrain_steps == default.tiny_model.pretrain_steps
    assert seeded.train.max_steps == default.train.max_steps
    assert seeded.eval == default.eval and seeded.clean == default.clean


def test_the_settings_resource_passes_its_seed_to_every_stage_config():
    config = PipelineSettings(profile="gpu", seed=5).config()
    assert (config.tiny_model.seed, config.train.seed) == (5, 5)
    assert PipelineSettings(profile="gpu").config() == profile_config("gpu")


def test_yes_no_questions_are_split_by_whether_they_name_a_shape():
    predictions = pd.DataFrame({
        "question": ["is there a circle?", "is there not a triangle?", "is the shape red?", "what color is it?"],
        "answer_type": ["yes/no", "yes/no", "yes/no", "color"],
        "score": [1.0, 0.0, 1.0, 0.0],
    })
    assert tiny_default.yes_no_split(predictions) == {"yes/no shape": 0.5, "yes/no colour": 1.0}


def test_the_seed_summary_gives_mean_min_and_max_of_every_figure():
    def row(seed, accuracy, shape):
        return {"seed": seed, "accuracy": accuracy, "end_to_end_s": 100.0 + seed, "stage_s": {"lora_adapter": 10.0},
                "per_type": {"color": 1.0, "shape": shape, "yes/no": 0.9, "yes/no shape": 0.8, "yes/no colour": 1.0},
                "baselines": {"blind": 0.67}}

    summary = profile_seeds.summary([row(0, 0.95, 0.99), row(1, 0.99, 1.0)])
    assert summary["seeds"] == [0, 1]
    assert summary["accuracy"] == pytest.approx({"mean": 0.97, "min": 0.95, "max": 0.99})
    assert summary["per_type"]["shape"] == pytest.approx({"mean": 0.995, "min": 0.99, "max": 1.0})
    assert summary["stage_s"]["base_model"] == {"mean": 0.0, "min": 0.0, "max": 0.0}  # a stage a run lacks counts as 0 s
    assert profile_seeds.summary([]) == {}
