"""Shared shapes: the drop layout, the columns of each stage's tables, and the quarantine reasons."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa

ANNOTATIONS_FILE = "annotations.jsonl"
TABLE_ANNOTATION_FILES = (ANNOTATIONS_FILE, "annotations.csv", "annotations.parquet")
DROP_CONFIG_FILE = "drop.json"  # optional: {"format": "table" | "llava" | "vqav2" | "hf_dataset"} overrides detection
READY_MARKER = "_READY"
SPLITS = ("train", "validation", "test")
Split = Literal["train", "validation", "test"]

RAW_SAMPLES_FILE = "raw_samples.parquet"
CLEAN_SAMPLES_FILE = "clean_samples.parquet"
QUARANTINE_FILE = "quarantine.parquet"
# inside a base_model artifact: the processor every stage loads, and a built model's weights
PROCESSOR_DIR = "processor"
WEIGHTS_DIR = "weights"

# Quarantine reasons, one per rule, so the counts per reason say what went wrong with a drop.
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
INVALID_CSV = "invalid_csv"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
INVALID_SPLIT = "invalid_split"
PATH_OUTSIDE_DROP = "path_outside_drop"
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
IMAGE_TOO_SMALL = "image_too_small"
DECOMPRESSION_BOMB = "decompression_bomb"
EMPTY_QUESTION = "empty_question"
EMPTY_ANSWER = "empty_answer"
CONTROL_CHARACTERS = "control_characters"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
SPLIT_CONFLICT = "split_conflict"
TOO_LONG = "too_long"
TEST_LEAKAGE = "test_leakage"

RAW_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("drop", pa.string()),
        ("line", pa.int64()),
        ("image", pa.string()),
        ("image_sha256", pa.string()),
        ("image_size_bytes", pa.int64()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("split", pa.string()),
        ("answer_type", pa.string()),
        ("question_type", pa.string()),
        ("record", pa.string()),
        ("file", pa.string()),  # the drop's file the record came from (annotations, conversation JSON, Parquet shard)
        ("answers", pa.list_(pa.string())),  # every human answer when the source has several (VQAv2: ten)
        # Earlier turns of a multi-turn conversation as JSON [{"from": "human"|"gpt", "value": ...}];
        # null for single-turn samples. Training on the history is not done yet: the prompt is the last turn.
        ("history", pa.string()),
        # True: the record carried the image bytes (HF datasets); `image` then names the copy that
        # ingestion extracted into its own folder, `embedded/<sha256>`, rather than a file of the drop.
        ("image_embedded", pa.bool_()),
    ]
)

CLEAN_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("drop", pa.string()),
        ("line", pa.int64()),
        ("image", pa.string()),
        ("image_sha256", pa.string()),
        ("image_bytes", pa.binary()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("answer_raw", pa.string()),
        ("split", pa.string()),
        ("split_source", pa.string()),
        ("answer_type", pa.string()),
        ("question_type", pa.string()),
        ("file", pa.string()),
        ("answers", pa.list_(pa.string())),  # normalised as `answer` is, for the official VQA accuracy
        ("history", pa.string()),
        ("image_phash", pa.string()),  # 64-bit perceptual hash (imagehash.phash), hex
        ("image_colors", pa.binary()),  # 8x8 RGB thumbnail: phash is colour-blind, this tells a red from a grey circle
        ("first_frame_of_animation", pa.bool_()),  # the source was animated; only its first frame is kept
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("drop", pa.string()),
        ("file", pa.string()),
        ("line", pa.int64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("record", pa.string()),
    ]
)
