"""Each drop layout read from small real files: detection, the samples it yields, and what it quarantines."""

import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import png_bytes
from test_ingest_clean import reasons_by_line, run_stages
from vlmtune import formats
from vlmtune.readers import UnknownDropFormat, detect_format


def write_images(drop, names, size=(32, 32)):
    for i, name in enumerate(names):
        (drop / name).parent.mkdir(parents=True, exist_ok=True)
        (drop / name).write_bytes(png_bytes(size, color=(20 * i, 100, 200)))


def test_csv_with_a_broken_quote_loses_only_that_line(tmp_path):
    drop = tmp_path / "csv-drop"
    write_images(drop, ["images/a.png", "images/b.png"])
    (drop / "annotations.csv").write_text(
        "image,question,answer,split\n"
        "images/a.png,What colour?,Red,train\n"  # 2
        'images/a.png,"What shape?,circle,train\n'  # 3: the quote is never closed
        "images/b.png,What shape?,circle,\n"  # 4
        'images/b.png,"Is it\nround?",yes,\n'  # 5: a quoted field spanning two lines is one record
    )
    assert detect_format(drop) == "table"
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert reasons_by_line(quarantined) == {3: formats.INVALID_CSV}
    assert [(row["line"], row["question"]) for row in kept] == [(2, "What colour?"), (4, "What shape?"), (5, "Is it round?")]
    assert quarantined[0]["file"] == "annotations.csv" and quarantined[0]["record"].startswith('images/a.png,"What shape?')


def test_parquet_annotations_with_extra_answers(tmp_path):
    drop = tmp_path / "parquet-drop"
    write_images(drop, ["images/a.png"])
    pq.write_table(pa.Table.from_pylist([
        {"image": "images/a.png", "question": "How many?", "answer": "Two", "answers": ["Two", "2", "two."]},
        {"image": "/etc/hostname", "question": "How many?", "answer": "1", "answers": None},
    ]), drop / "annotations.parquet")
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert reasons_by_line(quarantined) == {2: formats.PATH_OUTSIDE_DROP}
    assert kept[0]["answer"] == "2" and kept[0]["answers"] == ["2", "2", "2"]


def llava_record(image, *turns):
    return {"id": image, "image": image, "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(turns)]}


def test_llava_conversations_become_one_sample_per_answer_turn(tmp_path):
    drop = tmp_path / "llava-drop"
    write_images(drop, ["images/a.png", "images/b.png"])
    (tmp_path / "outside.png").write_bytes(png_bytes())
    records = [
        llava_record("images/a.png", "<image>\nWhat colour is it?", "Red."),  # 1: one sample
        llava_record("images/b.png", "What is this?\n<image>", "A circle.", "How many are there?", "One."),  # 2: two samples
        {"image": "images/a.png", "conversations": "not a list"},  # 3
        llava_record("../outside.png", "<image>\nWhat?", "x"),  # 4
        llava_record("images/a.png", "<image>\nOnly a question"),  # 5: nothing to learn from
    ]
    (drop / "llava_instruct.json").write_text(json.dumps(records))
    assert detect_format(drop) == "llava"
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert summary["n_in"] == 6 and summary["n_kept"] == 3
    assert reasons_by_line(quarantined) == {3: formats.INVALID_FIELD, 4: formats.PATH_OUTSIDE_DROP, 5: formats.MISSING_FIELD}
    assert [(row["sample_id"], row["question"], row["answer"]) for row in kept] == [
        ("llava-drop:1", "What colour is it?", "red"),
        ("llava-drop:2#1", "What is this?", "circle"),
        ("llava-drop:2#2", "How many are there?", "1"),
    ]
    assert kept[1]["history"] is None
    assert json.loads(kept[2]["history"]) == [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A circle."}]


def test_vqav2_questions_and_annotations_keep_all_ten_answers(tmp_path):
    drop = tmp_path / "vqa-drop"
    write_images(drop, ["train2014/COCO_train2014_000000000009.jpg", "train2014/COCO_train2014_000000000025.jpg"])
    questions = [
        {"image_id": 9, "question": "How many plates?", "question_id": 90},
        {"image_id": 25, "question": "What animal is this?", "question_id": 250},
        {"image_id": 25, "question": "Is it night?", "question_id": 251},  # no annotation
        {"image_id": 77, "question": "What colour?", "question_id": 770},  # no image file
    ]
    answers = ["two", "2", "Two.", "two", "2", "two", "3", "two", "2", "two"]
    annotations = [
        {"question_id": 90, "image_id": 9, "answer_type": "number", "question_type": "how many", "multiple_choice_answer": "2",
         "answers": [{"answer": text, "answer_confidence": "yes", "answer_id": i + 1} for i, text in enumerate(answers)]},
        {"question_id": 250, "image_id": 25, "answer_type": "other", "question_type": "what animal is", "multiple_choice_answer": "giraffe",
         "answers": [{"answer": "giraffe", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
        {"question_id": 770, "image_id": 77, "answer_type": "other", "question_type": "what color", "multiple_choice_answer": "red",
         "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]},
    ]
    (drop / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps({"data_subtype": "train2014", "questions": questions}))
    (drop / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"data_subtype": "train2014", "annotations": annotations}))
    assert detect_format(drop) == "vqav2"
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert reasons_by_line(quarantined) == {3: formats.MISSING_FIELD, 4: formats.IMAGE_MISSING}
    first = kept[0]
    assert (first["answer"], first["answer_type"], first["question_type"], first["split"]) == ("2", "number", "how many", "train")
    assert first["answers"] == ["2", "2", "2", "2", "2", "2", "3", "2", "2", "2"]
    assert first["image"] == "train2014/COCO_train2014_000000000009.jpg"
    assert quarantined[0]["file"] == "v2_OpenEnded_mscoco_train2014_questions.json"


def pil_images(n, size=(32, 32)):
    return [Image.new("RGB", size, (30 * i, 60, 90)) for i in range(n)]


def test_hf_dataset_saved_to_disk_with_embedded_images(tmp_path):
    drop = tmp_path / "hf-drop"
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": pil_images(2), "question": ["q1?", "q2?"], "answer": ["red", "blue"]}, features=features),
        "test": datasets.Dataset.from_dict({"image": pil_images(4)[2:], "question": ["q3?", ""], "answer": ["green", "teal"]}, features=features),
    }).save_to_disk(str(drop))
    assert detect_format(drop) == "hf_dataset"
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert [(row["question"], row["split"]) for row in kept] == [("q1?", "train"), ("q2?", "train"), ("q3?", "test")]
    assert [row["reason"] for row in quarantined] == [formats.EMPTY_QUESTION]
    assert quarantined[0]["file"].startswith("test/") and "bytes>" in quarantined[0]["record"]
    assert Image.open(__import__("io").BytesIO(kept[0]["image_bytes"])).size == (32, 32)


def test_hf_parquet_files_with_bytes_or_path_images_never_read_outside_the_drop(tmp_path):
    drop = tmp_path / "hf-parquet-drop"
    write_images(drop, ["pictures/local.png"])
    (tmp_path / "secret.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "secret.png", drop / "pictures" / "link.png")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        {"image": {"bytes": png_bytes(color=(1, 2, 3)), "path": "x.png"}, "question": "q1?", "answer": "red"},
        {"image": {"bytes": None, "path": "pictures/local.png"}, "question": "q2?", "answer": "b"},
        {"image": {"bytes": None, "path": str(tmp_path / "secret.png")}, "question": "q3?", "answer": "c"},
        {"image": {"bytes": None, "path": "pictures/link.png"}, "question": "q4?", "answer": "d"},
    ]
    (drop / "data").mkdir()
    schema = pa.schema([("image", image_type), ("question", pa.string()), ("answer", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), drop / "data" / "validation-00000-of-00001.parquet")
    assert detect_format(drop) == "hf_dataset"
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert reasons_by_line(quarantined) == {3: formats.PATH_OUTSIDE_DROP, 4: formats.PATH_OUTSIDE_DROP}
    assert [(row["line"], row["split"]) for row in kept] == [(1, "validation"), (2, "validation")]


def test_drop_config_names_the_format_and_an_unknown_name_is_refused(tmp_path):
    drop = tmp_path / "named"
    write_images(drop, ["a.png"])
    (drop / "conversations.json").write_text(json.dumps([llava_record("a.png", "<image>\nq?", "yes")]))
    (drop / formats.DROP_CONFIG_FILE).write_text(json.dumps({"format": "llava"}))
    assert detect_format(drop) == "llava"
    (drop / formats.DROP_CONFIG_FILE).write_text(json.dumps({"format": "coco-captions"}))
    with pytest.raises(UnknownDropFormat, match="coco-captions.*annotations.jsonl"):
        detect_format(drop)
