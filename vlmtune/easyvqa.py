"""The embedded default data: easy-VQA, as shipped by the `easy-vqa` package (no download).

Training images are divided once by a stable hash of their id: one part pretrains the tiny base
model, the rest becomes the fine-tuning drop, so the adapter never sees a pretraining image.
The official test split becomes the test drop.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

from vlmtune import formats
from vlmtune.clean import assign_split

FINETUNE_DROP = "easyvqa-train"
TEST_DROP = "easyvqa-test"
COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
SHAPES = {"circle", "rectangle", "triangle"}
VALIDATION_FRACTIONS = (0.9, 0.1, 0.0)  # the fine-tuning drop's own train / validation split


def easyvqa_answer_type(answer: str) -> str:
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    return "yes/no"


def is_pretraining_image(image_id: int, fraction: float) -> bool:
    bucket = int(hashlib.sha256(f"easyvqa-pretrain:{image_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def pretraining_samples(fraction: float, max_samples: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """Questions on the pretraining share of easy-VQA's training images, with a train/validation split."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    image_bytes: dict[int, bytes] = {}
    samples = []
    for index in _subset(len(questions), max_samples, seed, keep=lambda i: is_pretraining_image(image_ids[i], fraction)):
        image_id = image_ids[index]
        if image_id not in image_bytes:
            image_bytes[image_id] = Path(paths[image_id]).read_bytes()
        data = image_bytes[image_id]
        samples.append(
            {
                "question": questions[index],
                "answer": answers[index],
                "image_bytes": data,
                "split": assign_split(hashlib.sha256(data).hexdigest(), VALIDATION_FRACTIONS),
            }
        )
    return samples


def write_demo_drops(drops_dir: Path, pretrain_fraction: float, max_finetune: int | None, max_test: int | None) -> list[Path]:
    """Write the fine-tuning and test drops (format v1); an unchanged drop is left untouched."""
    import easy_vqa

    train_questions, train_answers, train_ids = easy_vqa.get_train_questions()
    test_questions, test_answers, test_ids = easy_vqa.get_test_questions()
    finetune = _subset(len(train_questions), max_finetune, 1, keep=lambda i: not is_pretraining_image(train_ids[i], pretrain_fraction))
    test = _subset(len(test_questions), max_test, 2)
    return [
        _write_drop(Path(drops_dir) / FINETUNE_DROP, easy_vqa.get_train_image_paths(),
                    [(train_questions[i], train_answers[i], train_ids[i]) for i in finetune], split=None),
        _write_drop(Path(drops_dir) / TEST_DROP, easy_vqa.get_test_image_paths(),
                    [(test_questions[i], test_answers[i], test_ids[i]) for i in test], split="test"),
    ]


def _write_drop(drop_dir: Path, image_paths: dict[int, str], records: list[tuple[str, str, int]], split: str | None) -> Path:
    spec = {"records": len(records), "first": records[:3], "last": records[-3:], "split": split}
    spec_file = drop_dir / "_drop_spec.json"
    if (drop_dir / formats.READY_MARKER).is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == json.loads(json.dumps(spec)):
        return drop_dir  # rewriting would change file times, and so the drop's version, for nothing
    staging = drop_dir.with_name(f".{drop_dir.name}.{uuid.uuid4().hex}.partial")
    (staging / "images").mkdir(parents=True)
    lines = []
    for question, answer, image_id in records:
        relative = f"images/{image_id}.png"
        if not (staging / relative).exists():
            shutil.copyfile(image_paths[image_id], staging / relative)
        data_split = split or assign_split(hashlib.sha256((staging / relative).read_bytes()).hexdigest(), VALIDATION_FRACTIONS)
        lines.append(json.dumps({"image": relative, "question": question, "answer": answer, "split": data_split, "answer_type": easyvqa_answer_type(answer)}))
    (staging / formats.ANNOTATIONS_FILE).write_text("\n".join(lines) + "\n")
    spec_file_staged = staging / "_drop_spec.json"
    spec_file_staged.write_text(json.dumps(spec))
    (staging / formats.READY_MARKER).write_text("")
    if drop_dir.exists():
        retired = drop_dir.with_name(f".{drop_dir.name}.{uuid.uuid4().hex}.old")
        os.replace(drop_dir, retired)
        shutil.rmtree(retired)
    os.replace(staging, drop_dir)
    return drop_dir


def _subset(n: int, limit: int | None, seed: int, keep=lambda index: True) -> list[int]:
    indices = [index for index in range(n) if keep(index)]
    if limit is not None and limit < len(indices):
        indices = sorted(random.Random(seed).sample(indices, limit))
    return indices
