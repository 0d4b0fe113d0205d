"""The VQAv2 / COCO layout: a questions JSON and an annotations JSON, and COCO image files.

Questions and annotations are joined on `question_id`; all ten human answers are kept in
`answers` (the official VQA accuracy needs them) and `multiple_choice_answer` is the training
target. Images are found by the COCO id at the end of their file name
(`COCO_train2014_000000000009.jpg` is image 9). `data_subtype` names the split (train2014 ->
train, val2014 -> validation, test2015 -> test).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmtune import formats
from vlmtune.readers.base import IMAGE_SUFFIXES, SourceRecord, answer_texts, peek, record_text, rejected, walk_files

_TRAILING_NUMBER = re.compile(r"(\d+)$")


def detect(drop_dir: Path) -> list[tuple[Path, Path | None]]:
    """(questions file, annotations file or None) pairs; empty when the drop has no questions file."""
    candidates = [path for path in walk_files(drop_dir, (".json",)) if path.name != formats.DROP_CONFIG_FILE]
    heads = {path: peek(path) for path in candidates}
    questions = [path for path in candidates if '"questions"' in heads[path] and '"conversations"' not in heads[path]]
    annotations = [path for path in candidates if '"annotations"' in heads[path] and path not in questions]
    if not questions or not annotations:
        return []
    return [(path, _matching_annotations(path, annotations)) for path in questions]


def read(drop_dir: Path) -> Iterator[SourceRecord]:
    images = _images_by_id(drop_dir)
    for questions_path, annotations_path in detect(drop_dir):
        yield from _read_pair(drop_dir, questions_path, annotations_path, images)


def _read_pair(drop_dir: Path, questions_path: Path, annotations_path: Path | None, images: dict[int, str]) -> Iterator[SourceRecord]:
    file = str(questions_path.relative_to(drop_dir))
    questions_doc, problem = _load(questions_path)
    if problem:
        yield rejected(file, 1, peek(questions_path, 2000), *problem)
        return
    annotations_doc, problem = _load(annotations_path) if annotations_path else ({}, None)
    if problem:
        yield rejected(str(annotations_path.relative_to(drop_dir)), 1, peek(annotations_path, 2000), *problem)
        return
    by_question = {
        item.get("question_id"): item for item in annotations_doc.get("annotations", []) if isinstance(item, dict)
    }
    split = _split(questions_doc.get("data_subtype"))
    for index, question in enumerate(questions_doc.get("questions") or [], start=1):
        annotation = by_question.get(question.get("question_id")) if isinstance(question, dict) else None
        text = record_text({"question": question, "annotation": annotation})
        if not isinstance(question, dict):
            yield rejected(file, index, text, formats.NOT_AN_OBJECT, type(question).__name__)
            continue
        if annotation is None:
            yield rejected(file, index, text, formats.MISSING_FIELD, f"no annotation for question_id {question.get('question_id')!r}")
            continue
        image = images.get(question.get("image_id")) if isinstance(question.get("image_id"), int) else None
        if image is None:
            yield rejected(file, index, text, formats.IMAGE_MISSING, f"no image file for image_id {question.get('image_id')!r}")
            continue
        yield SourceRecord(
            file, index, text,
            sample={
                "image": image,
                "image_bytes": None,
                "question": question.get("question"),
                "answer": annotation.get("multiple_choice_answer"),
                "answers": answer_texts(annotation.get("answers")),
                "split": split,
                "answer_type": annotation.get("answer_type"),
                "question_type": annotation.get("question_type"),
                "history": None,
            },
        )


def _load(path: Path) -> tuple[dict[str, Any], tuple[str, str] | None]:
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        return {}, (formats.INVALID_UTF8, str(error))
    except json.JSONDecodeError as error:
        return {}, (formats.INVALID_JSON, str(error))
    if not isinstance(document, dict):
        return {}, (formats.NOT_AN_OBJECT, "expected a JSON object with 'questions' or 'annotations'")
    return document, None


def _matching_annotations(questions: Path, annotations: list[Path]) -> Path | None:
    """The annotations file for the same subtype (train2014 with train2014), or the only one."""
    subtype = re.search(r"(train|val|test)\d*", questions.name)
    same = [path for path in annotations if subtype and subtype.group(0) in path.name]
    return same[0] if same else (annotations[0] if len(annotations) == 1 else None)


def _images_by_id(drop_dir: Path) -> dict[int, str]:
    images = {}
    for path in walk_files(drop_dir, IMAGE_SUFFIXES):
        if match := _TRAILING_NUMBER.search(path.stem):
            images.setdefault(int(match.group(1)), str(path.relative_to(drop_dir)))
    return images


def _split(data_subtype: Any) -> str | None:
    if not isinstance(data_subtype, str):
        return None
    for prefix, split in (("train", "train"), ("val", "validation"), ("test", "test")):
        if data_subtype.startswith(prefix):
            return split
    return None
