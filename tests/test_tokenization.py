import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import png_bytes, read_rows
from vlmtune import formats
from vlmtune.collate import TrainingCollator, generation_batch
from vlmtune.config import TokenizeConfig
from vlmtune.tokenization import IGNORE_INDEX, assemble_splits, encode_batch, tokenize_drop

IMAGE_TOKENS = 64  # 64x64 image, 8-pixel patches


def image_token_count(processor, ids):
    return sum(1 for token in ids if token == processor.image_token_id)


def test_labels_mask_prompt_and_image_tokens_and_keep_answer_plus_one_eos(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    [example] = encode_batch(tiny_processor, ["what color is it?"], ["red"], [png_bytes((64, 64))])
    ids, labels, n_prompt = example["input_ids"], example["labels"], example["prompt_length"]
    answer_ids = tokenizer("red", add_special_tokens=False)["input_ids"]
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == answer_ids + [tokenizer.eos_token_id]
    assert ids[n_prompt:] == labels[n_prompt:]
    assert image_token_count(tiny_processor, ids[:n_prompt]) == IMAGE_TOKENS
    assert ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True) == "red"


def test_a_literal_image_placeholder_in_a_question_is_not_an_image_slot(tiny_processor):
    [example] = encode_batch(tiny_processor, ["is <image> a word?"], ["yes"], [png_bytes((64, 64))])
    assert image_token_count(tiny_processor, example["input_ids"]) == IMAGE_TOKENS


def clean_parquet(directory, questions, answer="yes", split="train"):
    image = png_bytes((64, 64))
    rows = [
        {
            "sample_id": f"d:{i + 1}", "drop": "d", "line": i + 1, "image": "a.png", "image_sha256": f"sha{i % 2}",
            "image_bytes": image, "image_width": 64, "image_height": 64, "question": question, "answer": answer,
            "answer_raw": answer, "split": split, "split_source": "record", "answer_type": "yes/no", "question_type": "is",
        }
        for i, question in enumerate(questions)
    ]
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=formats.CLEAN_SCHEMA), directory / formats.CLEAN_SAMPLES_FILE)
    return directory


def test_samples_over_budget_are_quarantined_whole_never_truncated(tiny_processor, tmp_path):
    clean = clean_parquet(tmp_path / "clean", ["short?", "x" * 200 + "?"])
    out = tmp_path / "shard"
    out.mkdir()
    summary = tokenize_drop(clean, tiny_processor, out, TokenizeConfig(max_length=120))
    assert (summary["n_in"], summary["n_kept"], summary["n_quarantined"]) == (2, 1, 1)
    [rejected] = read_rows(out / formats.QUARANTINE_FILE)
    assert rejected["reason"] == formats.TOO_LONG and rejected["line"] == 2
    assert "tokens after the processor" in rejected["detail"]
    import datasets

    shard = datasets.load_from_disk(str(out / "shard"))
    assert image_token_count(tiny_processor, shard[0]["input_ids"]) == IMAGE_TOKENS


def test_assembly_keeps_test_images_out_of_training(tiny_processor, tmp_path):
    shards = []
    for name, split in (("train", "train"), ("test", "test")):
        clean = clean_parquet(tmp_path / f"clean-{name}", ["q1?", "q2?", "q3?"], split=split)
        out = tmp_path / f"shard-{name}"
        out.mkdir()
        tokenize_drop(clean, tiny_processor, out, TokenizeConfig())
        shards.append(out)
    out = tmp_path / "assembled"
    out.mkdir()
    summary = assemble_splits(shards, out)
    # both drops use images sha0 / sha1, so every training row leaks
    assert summary["splits"] == {"train": 0, "validation": 0, "test": 3}
    assert summary["quarantine_reasons"] == {formats.TEST_LEAKAGE: 3}


def rows_for(processor, questions):
    images = [Image.new("RGB", (64, 64), (i * 40, 0, 0)) for i in range(len(questions))]
    examples = encode_batch(processor, questions, ["no"] * len(questions), images)
    return [{**example, "image": image} for example, image in zip(examples, images)]


def test_training_collator_pads_right_and_masks_padding(tiny_processor):
    rows = rows_for(tiny_processor, ["a?", "a much longer question?"])
    batch = TrainingCollator(tiny_processor)(rows)
    short = len(rows[0]["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0, :short].all() and not batch["attention_mask"][0, short:].any()
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, short:] == tiny_processor.tokenizer.pad_token_id).all()
    assert batch["pixel_values"].shape == (2, 3, 64, 64)


def test_generation_batch_left_pads_the_prompt_only(tiny_processor):
    rows = rows_for(tiny_processor, ["a?", "a much longer question?"])
    batch = generation_batch(tiny_processor, rows)
    prompt_lengths = [row["prompt_length"] for row in rows]
    assert batch["input_ids"].shape[1] == max(prompt_lengths)
    gap = max(prompt_lengths) - prompt_lengths[0]
    assert not batch["attention_mask"][0, :gap].any() and batch["attention_mask"][0, gap:].all()
    assert batch["input_ids"][0, gap:].tolist() == rows[0]["input_ids"][: prompt_lengths[0]]


def test_a_drop_with_nothing_kept_still_makes_a_loadable_shard(tiny_processor, tmp_path):
    import datasets

    clean = clean_parquet(tmp_path / "clean", ["x" * 300 + "?"])
    out = tmp_path / "shard"
    out.mkdir()
    assert tokenize_drop(clean, tiny_processor, out, TokenizeConfig(max_length=64))["n_kept"] == 0
    assert datasets.load_from_disk(str(out / "shard")).num_rows == 0
    assembled = tmp_path / "assembled"
    assembled.mkdir()
    assert assemble_splits([out], assembled)["splits"] == {"train": 0, "validation": 0, "test": 0}
    assert set(datasets.load_from_disk(str(assembled / "dataset"))) == {"train", "validation", "test"}


def test_a_template_that_loses_the_image_placeholder_fails_loudly(tiny_processor):
    from vlmtune.config import TinyModelConfig
    from vlmtune.models import build_tiny_processor

    broken = build_tiny_processor(TinyModelConfig())
    broken.chat_template = broken.chat_template.replace("<image>", "")  # a template that forgot the image part
    with pytest.raises(ValueError, match="placeholders for 1 image"):
        encode_batch(broken, ["what is it?"], ["red"], [png_bytes((64, 64))])
