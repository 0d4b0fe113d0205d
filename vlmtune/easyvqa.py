"""The embedded default data: easy-VQA, as shipped by the `easy-vqa` package (no download).

The official training split becomes the fine-tuning drop (its own train / validation split by image
hash), the official test split the test drop. The tiny base model is pretrained on generated scenes
(vlmtune.shapes), so no easy-VQA image or question is ever seen before fine-tuning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from pathlib import Path

from vlmtune import formats
from vlmtune.clean import assign_split
from vlmtune.shapes import COLOR_VALUES
from vlmtune.shapes import SHAPES as SCENE_SHAPES

FINETUNE_DROP = "easyvqa-train"
TEST_DROP = "easyvqa-test"
# easy-VQA's answer vocabulary; the scene generator draws exactly these (its colours measured on easy-VQA)
COLORS = frozenset(COLOR_VALUES)
SHAPES = frozenset(SCENE_SHAPES)
VALIDATION_FRACTIONS = (0.9, 0.1, 0.0)  # the fine-tuning drop's own train / validation split


def easyvqa_answer_type(answer: str) -> str:
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    return "yes/no"


def write_demo_drops(drops_dir: Path, max_finetune: int | None, max_test: int | None) -> list[Path]:
    """Write the fine-tuning and test drops (format v1); an unchanged drop is left untouched."""
    import easy_vqa

    train_questions, train_answers, train_ids = easy_vqa.get_train_questions()
    test_questions, test_answers, test_ids = easy_vqa.get_test_questions()
    finetune = _subset(len(train_questions), max_finetune, 1)
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


def _subset(n: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))
