import math

import pytest

from vlmtune.evaluate import full_reference_matches, pick_previous_adapter, reference_answers, shuffled_image_donors
from vlmtune.metrics import OTHER, bootstrap_ci, confusion_tables, score_predictions, vqa_accuracy


def official_vqa_accuracy(prediction, answers):
    """vqaEval.py's loop, written out: each human left out in turn, min(1, matches among the rest / 3)."""
    accuracies = []
    for index in range(len(answers)):
        others = answers[:index] + answers[index + 1 :]
        accuracies.append(min(1.0, sum(answer == prediction for answer in others) / 3))
    return sum(accuracies) / len(accuracies)


@pytest.mark.parametrize("matches", range(11))
def test_vqa_accuracy_matches_the_official_leave_one_out_loop(matches):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(official_vqa_accuracy("2", answers))


def test_vqa_accuracy_values_and_normalisation():
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 4 + ["cat"] * 6) == 1.0  # 4 humans agree: 3 remain whoever is left out
    assert vqa_accuracy("a dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)  # 2/3 when a "dog" is left out
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_single_answer_falls_back_to_exact_match():
    assert score_predictions(["Red", "circle", ""], [["red"], ["triangle"], ["no"]]) == [1.0, 0.0, 0.0]


def test_reference_answers_use_the_answers_column_when_present():
    import datasets

    single = datasets.Dataset.from_dict({"answer": ["red", "no"]})
    assert reference_answers(single) == [["red"], ["no"]]
    multi = single.add_column("answers", [["red"] * 10, []])
    assert reference_answers(multi) == [["red"] * 10, ["no"]]


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    small = [1.0, 0.0] * 50
    large = [1.0, 0.0] * 5000
    low, high = bootstrap_ci(small, resamples=500)
    assert low < 0.5 < high and 0.05 < high - low < 0.3
    low_large, high_large = bootstrap_ci(large, resamples=200)
    assert high_large - low_large < (high - low) / 5
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_confusion_tables_cover_closed_answer_sets_only():
    tables = confusion_tables(["red", "blue", "circle", "7"], ["red", "blue", "circle", "7"], ["color", "color", "shape", "other"], max_classes=1)
    assert set(tables) == {"shape", "other"}
    tables = confusion_tables(["red", "blue", "circle"], ["red", "blue", "blue"], ["color"] * 3)
    assert tables["color"]["blue"] == {"blue": 1, "red": 0, OTHER: 1}


def test_shuffled_images_never_give_a_question_its_own_image():
    image_ids = ["a", "a", "a", "b", "c", "c", "d"]
    for seed in range(20):
        donors = shuffled_image_donors(image_ids, seed)
        assert all(image_ids[donor] != image_ids[row] for row, donor in enumerate(donors))


def test_previous_adapter_is_the_newest_other_version_on_the_same_base(tmp_path):
    for name, base in (("old", "base1"), ("older", "base1"), ("foreign", "base2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(f'{{"base_model": "{base}"}}')
    history = [("cur", str(tmp_path / "cur")), ("cur", str(tmp_path / "cur")), ("v2", str(tmp_path / "old")), ("v1", str(tmp_path / "older"))]
    assert pick_previous_adapter(history, "cur", "base1")[0] == str(tmp_path / "old")
    assert pick_previous_adapter(history[:2], "cur", "base1") == (None, "first adapter version: none shipped before it")
    assert pick_previous_adapter([("v3", str(tmp_path / "foreign"))], "cur", "base1")[0] is None
    assert pick_previous_adapter([("v3", str(tmp_path / "gone"))], "cur", "base1")[0] is None


def test_full_reference_must_share_data_steps_and_seed():
    adapter = {"base_model": "b", "tokenized_dataset": "d", "config": {"method": "lora", "max_steps": 200, "seed": 0, "batch_size": 32}}
    full = {"base_model": "b", "tokenized_dataset": "d", "config": {"method": "full", "max_steps": 200, "seed": 0, "batch_size": 32}}
    assert full_reference_matches(full, adapter)
    assert not full_reference_matches(full | {"tokenized_dataset": "other"}, adapter)
    assert not full_reference_matches({**full, "config": {**full["config"], "max_steps": 12}}, adapter)


def test_report_images_are_inlined_for_the_ui(tmp_path):
    import base64

    from vlmtune.report import with_inline_images

    (tmp_path / "worst").mkdir()
    (tmp_path / "plots.png").write_bytes(b"\x89PNG plot")
    (tmp_path / "worst" / "0.png").write_bytes(b"\x89PNG thumb")
    markdown = "![plots](plots.png) and ![q](worst/0.png) and [a link](report.json)"
    inlined = with_inline_images(markdown, tmp_path)
    for content in (b"\x89PNG plot", b"\x89PNG thumb"):
        assert "](data:image/png;base64," + base64.b64encode(content).decode() + ")" in inlined
    assert "[a link](report.json)" in inlined
