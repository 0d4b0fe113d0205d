import io
import os

import pytest
from PIL import Image

from conftest import png_bytes, read_rows
from vlmtune import formats
from vlmtune.clean import assign_split, clean_drop
from vlmtune.config import CleanConfig
from vlmtune import ingest
from vlmtune.ingest import drop_fingerprint, ingest_drop
from vlmtune.readers import UnknownDropFormat


def run_stages(drop, tmp_path, config=CleanConfig()):
    raw_dir, clean_dir = tmp_path / "raw", tmp_path / "clean"
    raw_dir.mkdir(parents=True), clean_dir.mkdir()
    raw = ingest_drop(drop, drop.name, raw_dir)
    clean = clean_drop(raw_dir, drop, clean_dir, config)
    kept = read_rows(clean_dir / formats.CLEAN_SAMPLES_FILE)
    quarantined = read_rows(clean_dir / formats.QUARANTINE_FILE)
    assert raw["n_in"] == raw["n_kept"] + raw["n_quarantined"]
    assert clean["n_in"] == clean["n_kept"] + clean["n_quarantined"] == len(kept) + len(quarantined)
    return clean, kept, quarantined


def reasons_by_line(quarantined):
    return {row["line"]: row["reason"] for row in quarantined}


def test_good_records_are_kept_with_normalised_text(make_drop, tmp_path):
    drop = make_drop(images={"images/a.png": png_bytes()}, records=[{"image": "images/a.png", "question": "What  colour?", "answer": "Red."}])
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert summary == {**summary, "n_in": 1, "n_kept": 1, "n_quarantined": 0}
    assert kept[0]["question"] == "What colour?"
    assert kept[0]["answer"] == "red" and kept[0]["answer_raw"] == "Red."
    assert Image.open(io.BytesIO(kept[0]["image_bytes"])).mode == "RGB"


def test_broken_lines_and_bad_paths_are_quarantined_with_reasons(make_drop, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    drop = make_drop(
        images={"images/a.png": png_bytes()},
        records=[
            '{"image": "images/a.png", "question": "q?", ',  # 1: cut off
            {"image": "images/missing.png", "question": "q?", "answer": "x"},  # 2
            {"image": "../secret.png", "question": "q?", "answer": "x"},  # 3
            {"image": str(outside), "question": "q?", "answer": "x"},  # 4: absolute
            {"image": "images/link.png", "question": "q?", "answer": "x"},  # 5: symlink out of the drop
            {"image": "images/a.png", "question": "q?"},  # 6
            b'{"image": "images/a.png", "question": "\xff\xfe", "answer": "x"}',  # 7: not UTF-8
            '["not", "an", "object"]',  # 8
            {"image": "images/a.png", "question": "q?", "answer": "x", "split": "holdout"},  # 9
            {"image": "images/a.png", "question": "q?", "answer": "x"},  # 10: the only good one
        ],
    )
    os.symlink(outside, drop / "images" / "link.png")
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert [row["line"] for row in kept] == [10]
    assert reasons_by_line(quarantined) == {
        1: formats.INVALID_JSON,
        2: formats.IMAGE_MISSING,
        3: formats.PATH_OUTSIDE_DROP,
        4: formats.PATH_OUTSIDE_DROP,
        5: formats.PATH_OUTSIDE_DROP,
        6: formats.MISSING_FIELD,
        7: formats.INVALID_UTF8,
        8: formats.NOT_AN_OBJECT,
        9: formats.INVALID_SPLIT,
    }
    assert all(row["record"] for row in quarantined), "the original record is kept for every rejection"


def test_image_rules(make_drop, tmp_path):
    truncated = png_bytes((40, 40))[:60]
    drop = make_drop(
        images={
            "images/truncated.png": truncated,
            "images/empty.png": b"",
            "images/tiny.png": png_bytes((4, 4)),
            "images/big.png": png_bytes((50, 50)),
            "images/rgba.png": png_bytes((16, 16), mode="RGBA", color=(0, 0, 0)),
        },
        records=[
            {"image": "images/truncated.png", "question": "q1?", "answer": "x"},
            {"image": "images/empty.png", "question": "q2?", "answer": "x"},
            {"image": "images/tiny.png", "question": "q3?", "answer": "x"},
            {"image": "images/big.png", "question": "q4?", "answer": "x"},
            {"image": "images/rgba.png", "question": "q5?", "answer": "x"},
        ],
    )
    summary, kept, quarantined = run_stages(drop, tmp_path, CleanConfig(max_image_pixels=2_000))
    assert reasons_by_line(quarantined) == {
        1: formats.IMAGE_UNREADABLE,
        2: formats.IMAGE_UNREADABLE,
        3: formats.IMAGE_TOO_SMALL,
        4: formats.DECOMPRESSION_BOMB,
    }
    converted = Image.open(io.BytesIO(kept[0]["image_bytes"]))
    assert converted.mode == "RGB"
    # black at half opacity over white: mid grey, not black
    assert converted.getpixel((0, 0)) == pytest.approx((127, 127, 127), abs=2)


def test_text_rules_duplicates_and_split_conflicts(make_drop, tmp_path):
    image = png_bytes()
    drop = make_drop(
        images={"images/a.png": image, "images/b.png": png_bytes(color=(1, 2, 3))},
        records=[
            {"image": "images/a.png", "question": "   ", "answer": "x"},  # 1
            {"image": "images/a.png", "question": "q?", "answer": "the"},  # 2: normalises to nothing
            {"image": "images/a.png", "question": "bell\u0007?", "answer": "x"},  # 3
            {"image": "images/a.png", "question": "Is it red?", "answer": "yes", "split": "train"},  # 4 kept
            {"image": "images/a.png", "question": "is it  red?", "answer": "yes"},  # 5 duplicate of 4
            {"image": "images/a.png", "question": "Is it blue?", "answer": "no", "split": "test"},  # 6 conflict
            {"image": "images/b.png", "question": "Is it blue?", "answer": "no"},  # 7 kept, hashed split
        ],
    )
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert reasons_by_line(quarantined) == {
        1: formats.EMPTY_QUESTION,
        2: formats.EMPTY_ANSWER,
        3: formats.CONTROL_CHARACTERS,
        5: formats.DUPLICATE,
        6: formats.SPLIT_CONFLICT,
    }
    assert [(row["line"], row["split_source"]) for row in kept] == [(4, "record"), (7, "hash")]


def test_split_from_hash_is_stable_and_follows_fractions():
    hashes = [f"{i:064x}" for i in range(2000)]
    splits = [assign_split(h, (0.8, 0.1, 0.1)) for h in hashes]
    assert splits == [assign_split(h, (0.8, 0.1, 0.1)) for h in hashes]
    assert 0.75 < splits.count("train") / len(splits) < 0.85
    assert {assign_split(h, (1.0, 0.0, 0.0)) for h in hashes} == {"train"}


def test_an_entirely_bad_drop_still_materializes(make_drop, tmp_path):
    drop = make_drop(records=["not json", "{}", '{"image": "x.png", "question": "q", "answer": "x"}'])
    summary, kept, quarantined = run_stages(drop, tmp_path)
    assert summary["n_kept"] == 0 and summary["n_quarantined"] == 3


def test_a_drop_in_no_known_layout_is_refused_with_the_formats_it_accepts(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(UnknownDropFormat) as refused:
        ingest_drop(tmp_path / "empty", "empty", tmp_path)
    for accepted in ("annotations.jsonl", "annotations.csv", "annotations.parquet", "LLaVA", "VQAv2", "save_to_disk", "Parquet"):
        assert accepted in str(refused.value)


def test_permission_denied_fails_the_run_with_a_clear_message(make_drop, tmp_path, monkeypatch):
    drop = make_drop(images={"images/a.png": png_bytes()}, records=[{"image": "images/a.png", "question": "q", "answer": "x"}])

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ingest, "_hash_file", denied)  # the tests run as root, where chmod 000 does not stop a read
    with pytest.raises(PermissionError, match="permission denied while ingesting drop 'drop1'.*a.png"):
        ingest_drop(drop, "drop1", tmp_path)


def test_drop_fingerprint_changes_with_content(make_drop):
    drop = make_drop(images={"images/a.png": png_bytes()}, records=[{"image": "images/a.png", "question": "q", "answer": "x"}])
    before = drop_fingerprint(drop)
    assert drop_fingerprint(drop) == before
    (drop / "images" / "b.png").write_bytes(png_bytes())
    assert drop_fingerprint(drop) != before
