"""The benchmarks' metrics on hand-worked cases: the published definitions' edges, one assertion each."""

import pytest

from mole.scoring import METRICS, levenshtein, parse_metric_choices, score


@pytest.mark.parametrize("prediction, reference, expected", [
    ("10.4", "10", 1.0),  # 4 % off
    ("10.5", "10", 1.0),  # exactly 5 % off still counts
    ("10.6", "10", 0.0),  # 6 % off
    ("-10.4", "-10", 1.0),  # relative to |reference|
    ("45%", "0.45", 1.0),  # a percent sign divides by 100
    ("45%", "45", 0.0),  # 0.45 against 45
    ("45", "45%", 0.0),
    ("12 kg", "12", 0.0),  # a number with a unit is text, compared as text
    ("12 KG", "12 kg", 1.0),  # ... case-insensitively
    (" Paris ", "paris", 1.0),  # surrounding whitespace and case
    ("0", "0", 1.0),
    ("0.0", "0", 0.0),  # a reference of 0 has no 5 % band: text must match
    ("0.01", "0", 0.0),
    ("", "", 1.0),
    ("", "5", 0.0),
    ("1,000", "1000", 0.0),  # "1,000" is not a number to float()
    ("inf", "inf", 1.0),  # not a number either: equal as text
])
def test_relaxed_accuracy_hand_cases(prediction, reference, expected):
    got = score("relaxed_accuracy", prediction, [reference])
    assert got == expected, f"relaxed_accuracy({prediction!r}, {reference!r}) = {got}, expected {expected}"


def test_relaxed_accuracy_takes_the_best_reference():
    assert score("relaxed_accuracy", "10.4", ["3", "10"]) == 1.0
    assert score("relaxed_accuracy", "7", ["3", "10"]) == 0.0


@pytest.mark.parametrize("prediction, references, expected", [
    ("Hello", ["hello"], 1.0),  # case
    ("  hello   world ", ["Hello World"], 1.0),  # whitespace collapsed
    ("helo", ["hello"], 0.8),  # 1 edit over 5 characters
    ("abc", ["abd"], 2 / 3),
    ("ab", ["abcd"], 0.5),  # similarity exactly 0.5 is kept
    ("a", ["abc"], 0.0),  # 1/3 is below 0.5: zero
    ("", [""], 1.0),
    ("", ["abc"], 0.0),
    ("abc", [""], 0.0),
    ("helo", ["world", "hello"], 0.8),  # best over references
])
def test_anls_hand_cases(prediction, references, expected):
    got = score("anls", prediction, references)
    assert got == pytest.approx(expected), f"anls({prediction!r}, {references}) = {got}, expected {expected}"


def test_levenshtein_counts_insertions_deletions_and_substitutions():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_ten_references_averages_the_leave_one_out_votes(matching, expected):
    """With k of 10 humans agreeing: k subsets lose a match (min(1, (k-1)/3)), 10-k keep all k."""
    references = ["two"] * matching + ["three"] * (10 - matching)
    got = score("vqa_accuracy", "2", references)
    assert got == pytest.approx(expected), f"{matching} matching answers: {got}, expected {expected}"


def test_vqa_accuracy_normalises_answers_and_degenerates_to_a_match_with_one_reference():
    assert score("vqa_accuracy", "The Dog.", ["dog", "dog", "dog"]) == pytest.approx(2 / 3), "each subset holds 2 of 3"
    assert score("vqa_accuracy", "Two", ["2"]) == 1.0, "one reference: a normalised match"
    assert score("vqa_accuracy", "3", ["2"]) == 0.0


@pytest.mark.parametrize("prediction, references, expected", [
    ("Yes, it is.", ["yes"], 1.0),  # the first word decides
    ("yes", ["Yes"], 1.0),
    ("no", ["yes"], 0.0),
    ("Not sure", ["no"], 0.0),  # "not" is not "no"
    ("", ["no"], 0.0),
    ("yes", ["fibrin"], None),  # an open question is not scored
])
def test_closed_accuracy_hand_cases(prediction, references, expected):
    assert score("closed_accuracy", prediction, references) == expected


@pytest.mark.parametrize("prediction, references, expected", [
    ("fibrin deposits", ["fibrin"], 1.0),
    ("fibrin", ["fibrin deposits"], 0.5),
    ("Fibrin, deposits.", ["fibrin deposits"], 1.0),  # case and punctuation
    ("the the", ["the the the"], 2 / 3),  # a word counts as often as the reference has it
    ("", ["fibrin"], 0.0),
    ("x", ["fibrin", "x"], 1.0),  # best over references
    ("no", ["Yes"], None),  # a yes/no question is not scored
])
def test_open_recall_hand_cases(prediction, references, expected):
    got = score("open_recall", prediction, references)
    assert got == (pytest.approx(expected) if expected is not None else None), f"open_recall = {got}"


def test_match_metrics_keep_todays_definitions():
    assert score("exact_match", " red ", ["Red", "red"]) == 1.0, "best over references, stripped"
    assert score("exact_match", "Red", ["red"]) == 0.0, "case-sensitive"
    assert score("normalized_match", "Two.", ["three", "2"]) == 1.0


def test_every_metric_refuses_a_question_without_references():
    for metric in METRICS:
        with pytest.raises(ValueError, match="at least one reference"):
            score(metric, "x", [])


def test_metric_choices_are_parsed_per_domain_and_mistakes_are_named():
    chosen = parse_metric_choices(["charts=relaxed_accuracy", "tissue=closed_accuracy,open_recall"], ["charts", "tissue"])
    assert chosen == {"charts": ("relaxed_accuracy",), "tissue": ("closed_accuracy", "open_recall")}
    with pytest.raises(ValueError, match="unknown metric 'anl'; the metrics are exact_match, .*anls"):
        parse_metric_choices(["charts=anl"], ["charts"])
    with pytest.raises(ValueError, match="no domain 'docs'; the domains are charts"):
        parse_metric_choices(["docs=anls"], ["charts"])
    with pytest.raises(ValueError, match="DOMAIN=METRIC"):
        parse_metric_choices(["charts"], ["charts"])
    with pytest.raises(ValueError, match="given metrics twice"):
        parse_metric_choices(["charts=anls", "charts=exact_match"], ["charts"])
