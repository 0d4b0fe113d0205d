import pytest

from vlmtune.answers import answer_type, normalize_answer, normalize_text, question_type


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes", "yes"),
        ("yes!", "yes"),
        ("Two.", "2"),
        ("the red circle", "red circle"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("  Blue\tsky ", "blue sky"),
        ("a", ""),
    ],
)
def test_answers_are_normalised_like_the_vqa_evaluation(raw, expected):
    assert normalize_answer(raw) == expected


def test_text_is_nfc_with_collapsed_whitespace():
    decomposed = "cafe\u0301  au\n lait"
    assert normalize_text(decomposed) == "caf\u00e9 au lait"


def test_answer_and_question_types():
    assert answer_type("yes") == "yes/no"
    assert answer_type("3") == "number"
    assert answer_type("red") == "other"
    assert question_type("What color is the shape?") == "what color is"
