"""VQAv2-style answer normalisation, on hand-written cases."""

import pytest

from mole.answers import answers_match, exact_match, normalize_answer


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two.", "2"),  # number word, final period
        ("  The Red  ", "red"),  # case, article, whitespace
        ("an apple", "apple"),
        ("Yes!", "yes"),
        ("3.5", "3.5"),  # a period inside a number stays
        ("1,000", "1000"),  # thousands separator
        ("stain: red", "stain red"),  # punctuation becomes a space
        ("x-ray", "x ray"),
        ("dont", "don't"),  # contraction restored
        ("don't", "don't"),  # and an apostrophe kept
        ("It's red", "it's red"),
        ("'yes'", "yes"),  # quote marks go
        ("3.", "3"),  # a final period after a number goes
        ("There are 3.", "there are 3"),
        ("1,000.", "1000"),
        ("none", "0"),
        ("R\n", "r"),
        ("count: two", "count 2"),
    ],
)
def test_normalize_answer_hand_cases(raw, expected):
    assert normalize_answer(raw) == expected, f"normalize_answer({raw!r}) = {normalize_answer(raw)!r}, expected {expected!r}"


def test_answers_match_after_normalisation_but_exact_match_does_not():
    assert answers_match("Two", "2"), "number words and digits should match"
    assert answers_match("the circle.", "Circle"), "article, case and period should not matter"
    assert not answers_match("T", "yes"), "different answers must not match"


@pytest.mark.parametrize("prediction, reference, match", [
    ("", "A", False), ("The", "A", False), ("a", "A", True), ("(A).", "A", True), ("B", "A", False),
    ("", "the", False), ("the", "The", True), ("", "?", False), ("a circle", "A", False),
])
def test_answers_that_normalise_to_nothing_are_compared_as_written(prediction, reference, match):
    """VQA's normalisation drops articles, so a multiple-choice letter "A" becomes "": an empty or
    article-only prediction must not match it."""
    assert answers_match(prediction, reference) is match
    assert not exact_match("Two", "2"), "exact match compares raw strings"
    assert exact_match(" red ", "red"), "exact match ignores only surrounding whitespace"
    assert not exact_match("Red", "red"), "exact match is case-sensitive"
