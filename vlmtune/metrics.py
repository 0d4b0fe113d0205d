"""VQA scoring, its uncertainty, and the text-only baselines every report is measured against.

With several human answers per question (VQAv2 has ten) the score is the official VQA accuracy:
min(#humans that gave the prediction / 3, 1), averaged over the ten leave-one-out subsets of the
answers, after the official normalisation of both sides (github.com/GT-Vision-Lab/VQA,
vqaEval.py). With a single reference answer it reduces to exact match.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from vlmtune.answers import normalize_answer

OTHER = "(other)"  # a prediction outside the closed answer set, in the confusion table


def score_predictions(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-question score: VQA accuracy where a question has several human answers, exact match where one."""
    return [vqa_accuracy(prediction, answers) for prediction, answers in zip(predictions, references)]


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction; exact match when there is a single reference."""
    predicted = normalize_answer(prediction)
    answers = [normalize_answer(answer) for answer in human_answers]
    if len(answers) <= 1:
        return float(bool(answers) and predicted == answers[0])
    matches = [answer == predicted for answer in answers]
    total = sum(matches)
    # Leave each human out in turn and count how many of the others agree with the prediction.
    return sum(min((total - left_out) / 3, 1.0) for left_out in matches) / len(answers)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if len(values) else float("nan")


def bootstrap_ci(scores: Sequence[float], level: float = 0.95, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval on the mean score: questions resampled with replacement."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // values.size)  # bounds memory at a few million indices per step
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        means[start:stop] = values[rng.integers(0, values.size, size=(stop - start, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def breakdown(scores: Sequence[float], groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy and count per group (answer type, question type)."""
    by_group: dict[str, list[float]] = defaultdict(list)
    for score, group in zip(scores, groups):
        by_group[group].append(score)
    return {group: {"accuracy": mean(values), "n": len(values)} for group, values in sorted(by_group.items())}


def confusion_tables(
    predictions: Sequence[str], answers: Sequence[str], answer_types: Sequence[str], max_classes: int = 12
) -> dict[str, dict[str, dict[str, int]]]:
    """Reference -> predicted counts, per answer type whose answer set is closed (at most `max_classes`).

    Predictions outside the type's answer set are counted under `(other)`: a model that answers a
    colour question with a shape shows up there.
    """
    by_type: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for prediction, answer, kind in zip(predictions, answers, answer_types):
        by_type[kind].append((answer, normalize_answer(prediction)))
    tables = {}
    for kind, pairs in sorted(by_type.items()):
        classes = sorted({answer for answer, _ in pairs})
        if len(classes) > max_classes:
            continue
        table = {answer: dict.fromkeys([*classes, OTHER], 0) for answer in classes}
        for answer, predicted in pairs:
            table[answer][predicted if predicted in table else OTHER] += 1
        tables[kind] = table
    return tables


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
