"""LLaVA conversation JSON: a list of {"image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}.

Every gpt turn becomes one sample: its question is the human turn before it, with the `<image>`
placeholder taken out (the prompt builder places the image itself), and the turns before that
go, as JSON, into `history`. A record that cannot be read is rejected whole, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmtune import formats
from vlmtune.readers.base import SourceRecord, peek, record_text, rejected

IMAGE_PLACEHOLDER = "<image>"
USER_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")


def detect(drop_dir: Path) -> list[Path]:
    return [path for path in sorted(drop_dir.glob("*.json")) if path.name != formats.DROP_CONFIG_FILE and '"conversations"' in peek(path)]


def read(drop_dir: Path) -> Iterator[SourceRecord]:
    for path in detect(drop_dir):
        yield from read_file(path)


def read_file(path: Path) -> Iterator[SourceRecord]:
    raw = path.read_bytes()
    try:
        records = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        yield rejected(path.name, 1, raw[:2000].decode("utf-8", errors="replace"), formats.INVALID_UTF8, str(error))
        return
    except json.JSONDecodeError as error:
        yield rejected(path.name, 1, raw[:2000].decode("utf-8", errors="replace"), formats.INVALID_JSON, str(error))
        return
    if not isinstance(records, list):
        yield rejected(path.name, 1, record_text(records)[:2000], formats.NOT_AN_OBJECT, "expected a list of conversations")
        return
    for index, record in enumerate(records, start=1):
        yield from _samples(path.name, index, record)


def _samples(file: str, index: int, record: Any) -> Iterator[SourceRecord]:
    text = record_text(record)
    if not isinstance(record, dict):
        yield rejected(file, index, text, formats.NOT_AN_OBJECT, type(record).__name__)
        return
    if record.get("image") is None:
        yield rejected(file, index, text, formats.MISSING_FIELD, "image")
        return
    if not isinstance(record["image"], str):
        yield rejected(file, index, text, formats.INVALID_FIELD, "image must be one path; several images per conversation are not supported")
        return
    turns, problem = _turns(record.get("conversations"))
    if problem:
        yield rejected(file, index, text, formats.INVALID_FIELD, problem)
        return
    answer_turns = [position for position, (role, _) in enumerate(turns) if role == "gpt"]
    if not answer_turns:
        yield rejected(file, index, text, formats.MISSING_FIELD, "a gpt turn to learn from")
        return
    for turn, position in enumerate(answer_turns, start=1):
        earlier = [{"from": role, "value": value} for role, value in turns[: position - 1]]
        yield SourceRecord(
            file, index, text,
            sample={
                "image": record["image"],
                "image_bytes": None,
                "question": turns[position - 1][1],
                "answer": turns[position][1],
                "answers": None,
                "split": record.get("split"),
                "answer_type": None,
                "question_type": None,
                "history": json.dumps(earlier, ensure_ascii=False) if earlier else None,
            },
            turn=turn if len(answer_turns) > 1 else None,
        )


def _turns(conversations: Any) -> tuple[list[tuple[str, str]], str]:
    """(role, text) pairs alternating human, gpt, ...; or a problem that rejects the record."""
    if not isinstance(conversations, list) or not conversations:
        return [], "conversations must be a non-empty list of turns"
    turns = []
    for position, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return [], f"turn {position + 1} is not {{'from': ..., 'value': '...'}}"
        role = "human" if turn.get("from") in USER_ROLES else "gpt" if turn.get("from") in ASSISTANT_ROLES else None
        if role is None:
            return [], f"turn {position + 1} is from {turn.get('from')!r}, not human or gpt"
        if role != ("human" if position % 2 == 0 else "gpt"):
            return [], f"turn {position + 1} breaks the human/gpt alternation"
        turns.append((role, turn["value"].replace(IMAGE_PLACEHOLDER, "").strip()))
    return turns, ""
