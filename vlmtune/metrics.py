"""VQA scoring and the baselines every report is measured against."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from vlmtune.answers import normalize_answer


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1.0 where the VQA-normalised prediction equals the (already normalised) reference answer."""
    return [float(normalize_answer(prediction) == answer) for prediction, answer in zip(predictions, answers)]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def breakdown(scores: Sequence[float], groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy and count per group (answer type, question type)."""
    by_group: dict[str, list[float]] = defaultdict(list)
    for score, group in zip(scores, groups):
        by_group[group].append(score)
    return {group: {"accuracy": mean(values), "n": len(values)} for group, values in sorted(by_group.items())}


def majority_baseline(train_answers: Sequence[str], n: int) -> list[str]:
    """The most frequent training answer, for every test question."""
    most_common = Counter(train_answers).most_common(1)[0][0] if train_answers else ""
    return [most_common] * n


def blind_baseline(train_questions: Sequence[str], train_answers: Sequence[str], test_questions: Sequence[str]) -> list[str]:
    """Question-only prior: the most frequent training answer to the same question text, else the global one.

    This is the best any model can do without looking at the image on questions seen in training,
    so an accuracy above it is evidence that the image was used.
    """
    per_question: dict[str, Counter] = defaultdict(Counter)
    for question, answer in zip(train_questions, train_answers):
        per_question[question.lower()][answer] += 1
    fallback = majority_baseline(train_answers, 1)[0]
    return [
        per_question[q.lower()].most_common(1)[0][0] if q.lower() in per_question else fallback
        for q in test_questions
    ]
