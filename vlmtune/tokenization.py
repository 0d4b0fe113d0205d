"""Stage 3: turn clean samples into an Arrow dataset of token ids with prompt-masked labels.

Each drop is tokenized once into its own shard (keyed by the drop's clean version and the
processor), and the train / validation / test splits are assembled from shards, so a new drop
costs only its own tokenization. Images stay encoded bytes (`datasets.Image`); pixels are made
in the collator, so the dataset stays near the size of its source images.

The processor expands the image placeholder into the model's image tokens, so the prompt length
is measured after expansion. A sample over `max_length` is quarantined with its length rather
than truncated: cutting image tokens breaks the model's input and cutting the answer trains on
nothing (TRL #5904, LLaMA-Factory #7363).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from vlmtune import formats
from vlmtune.artifacts import fingerprint
from vlmtune.config import CleanConfig, TokenizeConfig
from vlmtune.near_duplicates import near_matches
from vlmtune.quarantine import QuarantineLog

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips
TOKENIZED_FEATURES = datasets.Features(
    {
        "sample_id": datasets.Value("string"),
        "drop": datasets.Value("string"),
        "split": datasets.Value("string"),
        "image_sha256": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
        "question_type": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "prompt_length": datasets.Value("int32"),
        "answers": datasets.List(datasets.Value("string")),  # all human answers (VQAv2: ten), for the official VQA accuracy
        "history": datasets.Value("string"),  # earlier turns of a conversation as JSON; not yet part of the prompt
        "image_phash": datasets.Value("string"),
        "image_colors": datasets.Value("binary"),
    }
)


def tokenize_drop(clean_dir: Path, processor, out_dir: Path, config: TokenizeConfig) -> dict[str, Any]:
    """Tokenize one drop's clean samples into an Arrow shard at `out_dir/shard`; return counts."""
    table = pq.read_table(Path(clean_dir) / formats.CLEAN_SAMPLES_FILE)
    rows = table.to_pylist()
    quarantine = QuarantineLog(stage="tokenized_dataset")
    encoded = []
    batch_size = 256
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        for row, example in zip(batch, encode_batch(processor, [r["question"] for r in batch], [r["answer"] for r in batch], [r["image_bytes"] for r in batch])):
            if len(example["input_ids"]) > config.max_length:
                quarantine.add(
                    drop=row["drop"], file=formats.CLEAN_SAMPLES_FILE, line=row["line"], reason=formats.TOO_LONG,
                    detail=f"{len(example['input_ids'])} tokens after the processor; budget {config.max_length}",
                    record=row["sample_id"],
                )
                continue
            encoded.append(
                {
                    "sample_id": row["sample_id"],
                    "drop": row["drop"],
                    "split": row["split"],
                    "image_sha256": row["image_sha256"],
                    "image": {"bytes": row["image_bytes"], "path": None},
                    "question": row["question"],
                    "answer": row["answer"],
                    "answer_type": row["answer_type"],
                    "question_type": row["question_type"],
                    "answers": row.get("answers"),
                    "history": row.get("history"),
                    "image_phash": row.get("image_phash"),
                    "image_colors": row.get("image_colors"),
                    **example,
                }
            )
    shard = datasets.Dataset.from_list(encoded, features=TOKENIZED_FEATURES) if encoded else _empty()
    shard.save_to_disk(str(Path(out_dir) / "shard"))
    quarantine.write(Path(out_dir) / formats.QUARANTINE_FILE)
    return {
        "n_in": len(rows),
        "n_kept": len(encoded),
        "n_quarantined": len(quarantine),
        "quarantine_reasons": quarantine.counts(),
        "n_tokens": sum(len(example["input_ids"]) for example in encoded),
        "n_label_tokens": sum(sum(1 for label in example["labels"] if label != IGNORE_INDEX) for example in encoded),
    }


def assemble_splits(shard_dirs: list[Path], out_dir: Path, config: CleanConfig = CleanConfig()) -> dict[str, Any]:
    """Concatenate drop shards into a train / validation / test `DatasetDict` saved at `out_dir/dataset`.

    Across drops: a train or validation image that is, or is near-identical to, an image in the
    test split anywhere is quarantined as `test_leakage`, so no image is both trained on and
    tested on; a question asked again in a later drop on the same image (`duplicate`) or on a
    near-identical one (`near_duplicate`) is quarantined too. The near-duplicate thresholds are
    `config`'s (CleanConfig). Work is on Arrow columns, so adding a small drop costs little more
    than writing the splits.
    """
    shards = [datasets.load_from_disk(str(Path(path) / "shard")) for path in shard_dirs]
    table = pa.concat_tables([shard.data.table for shard in shards]) if shards else _empty().data.table
    features = shards[0].features if shards else TOKENIZED_FEATURES
    quarantine = QuarantineLog(stage="tokenized_dataset")
    rejected = _cross_drop_rejections(table, config)
    sample_ids, drops, splits = table["sample_id"].to_pylist(), table["drop"].to_pylist(), table["split"].to_pylist()
    keep = np.ones(table.num_rows, dtype=bool)
    for index, (reason, detail) in rejected.items():
        keep[index] = False
        line = int(sample_ids[index].rsplit(":", 1)[-1].split("#")[0])
        quarantine.add(drop=drops[index], file=formats.CLEAN_SAMPLES_FILE, line=line, reason=reason, detail=f"{detail}, was {splits[index]}", record=sample_ids[index])
    split_array = np.array(splits, dtype=object)
    # An explicit fingerprint: datasets would otherwise hash the whole table to make one (a fifth of the time here).
    version = fingerprint([str(path) for path in shard_dirs], sorted(rejected))
    dataset = datasets.DatasetDict(
        {
            name: datasets.Dataset(
                table.filter(pa.array(keep & (split_array == name))), info=datasets.DatasetInfo(features=features), fingerprint=f"{version}-{name}"
            )
            for name in formats.SPLITS
        }
    )
    dataset.save_to_disk(str(Path(out_dir) / "dataset"))
    quarantine.write(Path(out_dir) / formats.QUARANTINE_FILE)
    return {
        "splits": {name: dataset[name].num_rows for name in formats.SPLITS},
        "n_quarantined": len(quarantine),
        "quarantine_reasons": quarantine.counts(),
        "n_tokens": {name: int(pc.sum(pc.list_value_length(dataset[name].data.table["input_ids"])).as_py() or 0) for name in formats.SPLITS},
    }


def _cross_drop_rejections(table: pa.Table, config: CleanConfig) -> dict[int, tuple[str, str]]:
    """Row index -> (reason, detail) for test leakage and for duplicates of an earlier drop's rows."""
    shas, splits = table["image_sha256"].to_pylist(), table["split"].to_pylist()
    has_hashes = "image_phash" in table.column_names
    phashes = table["image_phash"].to_pylist() if has_hashes else [None] * table.num_rows
    colors = table["image_colors"].to_pylist() if has_hashes else [None] * table.num_rows
    first_row: dict[str, int] = {}
    for index, sha in enumerate(shas):
        first_row.setdefault(sha, index)
    # Images from before perceptual hashes (or whose hash is missing) take part in exact matching only.
    hashed = [sha for sha, index in first_row.items() if phashes[index] is not None]
    hash_of = {sha: (phashes[first_row[sha]], colors[first_row[sha]]) for sha in hashed}

    def fingerprints(images: list[str]) -> tuple[list[str], list[bytes]]:
        return [hash_of[sha][0] for sha in images], [hash_of[sha][1] for sha in images]

    test_images = {sha for sha, split in zip(shas, splits) if split == "test"}
    trained = [sha for sha in hashed if sha not in test_images]
    test_hashed = [sha for sha in hashed if sha in test_images]
    near_test = near_matches(*fingerprints(trained), *fingerprints(test_hashed), config.near_duplicate_distance, config.near_duplicate_color_tolerance)
    leaked = {sha: test_hashed[match] for sha, match in zip(trained, near_test) if match >= 0}
    earlier = near_matches(*fingerprints(hashed), *fingerprints(hashed), config.near_duplicate_distance, config.near_duplicate_color_tolerance, earlier_only=True)
    representative = {sha: sha for sha in first_row}
    for sha, match in zip(hashed, earlier):
        if match >= 0:
            representative[sha] = representative[hashed[match]]

    rejected: dict[int, tuple[str, str]] = {}
    seen: dict[tuple, str] = {}
    histories = table["history"].to_pylist() if "history" in table.column_names else [None] * table.num_rows
    for index, (sha, split, question, drop, history) in enumerate(zip(shas, splits, table["question"].to_pylist(), table["drop"].to_pylist(), histories)):
        if split != "test" and sha in test_images:
            rejected[index] = (formats.TEST_LEAKAGE, "image also in test")
            continue
        if split != "test" and sha in leaked:
            rejected[index] = (formats.TEST_LEAKAGE, f"image near-identical to test image {leaked[sha][:12]}")
            continue
        key = (representative[sha], question.lower(), history)
        earlier_drop = seen.setdefault(key + (sha,), drop)
        near_drop = seen.setdefault(key, drop)
        if earlier_drop != drop:
            rejected[index] = (formats.DUPLICATE, f"same image and question as in drop {earlier_drop!r}")
        elif near_drop != drop:
            rejected[index] = (formats.NEAR_DUPLICATE, f"same question on a near-identical image in drop {near_drop!r}")
    return rejected


def encode_batch(processor, questions: list[str], answers: list[str], images: list[bytes | Image.Image]) -> list[dict[str, Any]]:
    """input_ids = processed prompt + answer + EOS; labels mask the prompt (and its image tokens) with -100."""
    tokenizer = processor.tokenizer
    pil_images = [_as_pil(image) for image in images]
    prompts = [build_prompt(processor, question) for question in questions]
    prompt_ids = processor(text=prompts, images=pil_images, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    examples = []
    for prompt, answer in zip(prompt_ids, answer_ids):
        prompt, target = list(prompt), list(answer) + [tokenizer.eos_token_id]
        examples.append(
            {
                "input_ids": prompt + target,
                "labels": [IGNORE_INDEX] * len(prompt) + target,
                "prompt_length": len(prompt),
            }
        )
    return examples


def build_prompt(processor, question: str) -> str:
    """The user turn (image + question) and the cue for the assistant's answer, in the model's own template."""
    image_token = getattr(processor, "image_token", "<image>")
    # A literal placeholder typed in a question must not become an image slot (LLaMA-Factory #7909).
    safe_question = question.replace(image_token, image_token[0] + "\u200b" + image_token[1:])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": safe_question}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{image_token}{safe_question}\n"


def _as_pil(image: bytes | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image)).convert("RGB")


def _empty() -> datasets.Dataset:
    return datasets.Dataset.from_list([], features=TOKENIZED_FEATURES)


def label_token_counts(dataset: datasets.Dataset) -> list[int]:
    return [sum(1 for label in labels if label != IGNORE_INDEX) for labels in dataset["labels"]]


def shard_table(shard_dir: Path) -> pa.Table:
    return datasets.load_from_disk(str(Path(shard_dir) / "shard")).data.table
