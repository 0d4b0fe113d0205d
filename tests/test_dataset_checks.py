import datasets

from conftest import png_bytes
from vlmtune.dataset_checks import labels_are_answer, tokenized_dataset_problems
from vlmtune.tokenization import IGNORE_INDEX, dataset_from_rows, encode_batch, save_dataset


def rows(processor, split, answers, sha="a"):
    examples = encode_batch(processor, ["what is it?"] * len(answers), answers, [png_bytes((64, 64))] * len(answers))
    return [
        {"sample_id": f"{split}:{i}", "drop": "d", "split": split, "image_sha256": f"{sha}{i}", "image": {"bytes": png_bytes((8, 8)), "path": None},
         "question": "what is it?", "answer": answer, "answer_type": "other", "question_type": "what is", **example}
        for i, (answer, example) in enumerate(zip(answers, examples))
    ]


def save(tmp_path, train, test):
    path = tmp_path / "dataset"
    save_dataset(datasets.DatasetDict({
        "train": dataset_from_rows(train),
        "validation": dataset_from_rows([]),
        "test": dataset_from_rows(test),
    }), path)
    return path


def test_a_sound_dataset_passes(tiny_processor, tmp_path):
    path = save(tmp_path, rows(tiny_processor, "train", ["red", "blue"]), rows(tiny_processor, "test", ["yes"], sha="t"))
    assert tokenized_dataset_problems(path, tiny_processor) == {
        "images_shared_with_test": 0, "rows_without_answer_tokens": 0, "rows_sampled_for_targets": 3,
        "rows_with_wrong_targets": 0, "examples": [],
    }


def test_an_unmasked_prompt_or_a_missing_eos_is_caught(tiny_processor):
    [good] = rows(tiny_processor, "train", ["red"])
    assert labels_are_answer(good, tiny_processor)
    unmasked = {**good, "labels": list(good["input_ids"])}  # a template that forgot to mask the prompt
    assert not labels_are_answer(unmasked, tiny_processor)
    no_eos = {**good, "labels": good["labels"][:-1] + [IGNORE_INDEX]}
    assert not labels_are_answer(no_eos, tiny_processor)
    wrong = {**good, "answer": "blue"}
    assert not labels_are_answer(wrong, tiny_processor)


def test_leakage_and_empty_targets_are_counted(tiny_processor, tmp_path):
    train = rows(tiny_processor, "train", ["red", "blue"])
    train[1]["labels"] = [IGNORE_INDEX] * len(train[1]["labels"])
    test = rows(tiny_processor, "test", ["yes"])  # same image hash as train row 0
    problems = tokenized_dataset_problems(save(tmp_path, train, test), tiny_processor)
    assert problems["images_shared_with_test"] == 1 and problems["rows_without_answer_tokens"] == 1
    assert problems["rows_with_wrong_targets"] >= 1
