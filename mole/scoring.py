"""Per-question scores as the benchmarks define them, and the choice of scores per domain.

Every metric scores one generated answer against a question's references (one or more strings) and
returns a value in [0, 1], or ``None`` where it does not apply (``closed_accuracy`` scores only yes/no
questions, ``open_recall`` only the others, so a PathVQA-like domain reports both side by side). A
domain's score is the mean over the questions its metric applies to.

* ``exact_match`` — equal as written up to surrounding whitespace (:func:`mole.answers.exact_match`);
* ``normalized_match`` — equal after VQAv2 normalisation (:func:`mole.answers.answers_match`);
* ``relaxed_accuracy`` — ChartQA (Masry et al. 2022, sec. 5; the pix2struct ``relaxed_correctness``):
  when prediction and reference both read as numbers (a final ``%`` divides by 100), the prediction
  may be off by at most 5 % of the reference; otherwise the lower-cased strings must be equal. A
  reference of 0 has no 5 % band and must match as text; ``"12 kg"`` is not a number;
* ``anls`` — DocVQA (Mathew et al. 2021; ST-VQA, Biten et al. 2019, eq. 1): 1 - normalised Levenshtein
  distance between the lower-cased, whitespace-collapsed strings, 0 when that similarity is below
  0.5, best over the references;
* ``vqa_accuracy`` — VQAv2 (Antol et al. 2015; the official ``vqaEval.py``): ``min(1, matches / 3)``
  against each leave-one-out subset of the references, averaged over the subsets (with ten
  references: 1 match 0.3, 2 matches 0.6, 3 matches 0.9, 4 or more 1), matches after VQAv2
  normalisation. With a single reference there is no subset to vote: it is ``normalized_match``;
* ``closed_accuracy`` — PathVQA's yes/no questions (He et al. 2020; LLaVA-Med's evaluation): the
  question is closed when its references are "yes" or "no"; the answer's first word must be the
  reference;
* ``open_recall`` — PathVQA's open questions as LLaVA-Med reports them: the share of the reference's
  words (lower-cased, punctuation removed) that the answer contains, best over the references.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from mole.answers import PUNCTUATION, answers_match, exact_match
from mole.choices import Metric, options

DEFAULT_METRICS: tuple[str, ...] = ("normalized_match",)
"""What a domain that names no metric reports (beside the exact and normalised match every domain reports)."""

RELAXED_TOLERANCE = 0.05
ANLS_THRESHOLD = 0.5
YES_NO = ("yes", "no")


def _words(text: str) -> list[str]:
    """Lower-cased words with punctuation (the period included) turned into spaces."""
    return "".join(" " if char in PUNCTUATION or char == "." else char for char in text.lower()).split()


# ------------------------------------------------------------------------------- one reference


def _as_number(text: str) -> float | None:
    """``"12.5"`` -> 12.5, ``"45%"`` -> 0.45; anything else (units, words, ``inf``) -> None."""
    text = text.strip()
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_match(prediction: str, reference: str) -> bool:
    """ChartQA's relaxed correctness of one prediction against one reference."""
    predicted, expected = _as_number(prediction), _as_number(reference)
    if predicted is not None and expected:  # a reference of 0 falls through to the text comparison
        return abs(predicted - expected) / abs(expected) <= RELAXED_TOLERANCE
    return prediction.strip().lower() == reference.strip().lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls_similarity(prediction: str, reference: str) -> float:
    """1 - normalised Levenshtein distance of the lower-cased, whitespace-collapsed strings (two empty
    strings are identical), before the 0.5 threshold."""
    a, b = " ".join(prediction.lower().split()), " ".join(reference.lower().split())
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def word_recall(prediction: str, reference: str) -> float:
    """Share of the reference's words the prediction contains, each word counted as often as the
    reference has it; an empty reference is recalled only by an empty prediction."""
    wanted, given = Counter(_words(reference)), Counter(_words(prediction))
    if not wanted:
        return float(not given)
    return sum(min(count, given[word]) for word, count in wanted.items()) / sum(wanted.values())


# ------------------------------------------------------------------------------- metrics


def _best(match: Callable[[str, str], float]) -> Callable[[str, Sequence[str]], float]:
    def score(prediction: str, references: Sequence[str]) -> float:
        return max(float(match(prediction, reference)) for reference in references)

    return score


def anls(prediction: str, references: Sequence[str]) -> float:
    best = max(anls_similarity(prediction, reference) for reference in references)
    return best if best >= ANLS_THRESHOLD else 0.0


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    matches = [answers_match(prediction, reference) for reference in references]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(matches)


def _is_closed(references: Sequence[str]) -> bool:
    return all(" ".join(_words(reference)) in YES_NO for reference in references)


def closed_accuracy(prediction: str, references: Sequence[str]) -> float | None:
    if not _is_closed(references):
        return None
    first = (_words(prediction) or [""])[0]
    return float(any(first == " ".join(_words(reference)) for reference in references))


def open_recall(prediction: str, references: Sequence[str]) -> float | None:
    if _is_closed(references):
        return None
    return max(word_recall(prediction, reference) for reference in references)


METRICS: dict[str, Callable[[str, Sequence[str]], float | None]] = {
    "exact_match": _best(exact_match),
    "normalized_match": _best(answers_match),
    "relaxed_accuracy": _best(relaxed_match),
    "anls": anls,
    "vqa_accuracy": vqa_accuracy,
    "closed_accuracy": closed_accuracy,
    "open_recall": open_recall,
}
assert tuple(METRICS) == options(Metric), "mole.choices.Metric and METRICS must name the same metrics"


def score(metric: str, prediction: str, references: Sequence[str]) -> float | None:
    """``metric``'s score of ``prediction`` against ``references`` (at least one); None where the metric
    does not apply to the question."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; the metrics are {', '.join(METRICS)}")
    if not references:
        raise ValueError("a question needs at least one reference answer")
    return METRICS[metric](prediction, references)


def parse_metric_choices(items: Sequence[str], domains: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``["charts=relaxed_accuracy", "tissue=closed_accuracy,open_recall"]`` -> domain -> metrics.

    Raises ValueError naming the item for a domain that is not among ``domains``, an unknown metric
    (listing the metric names) or a domain given twice.
    """
    chosen: dict[str, tuple[str, ...]] = {}
    for item in items:
        name, _, metrics = item.partition("=")
        names = tuple(m.strip() for m in metrics.split(",")) if metrics else ()
        if not name or not names or not all(names):
            raise ValueError(f"--metric takes DOMAIN=METRIC[,METRIC...], got {item!r}")
        if name not in domains:
            raise ValueError(f"--metric {item!r}: no domain {name!r}; the domains are {', '.join(domains)}")
        if name in chosen:
            raise ValueError(f"--metric {item!r}: domain {name!r} was given metrics twice")
        check_metrics(names, f"--metric {item!r}")
        chosen[name] = names
    return chosen


def check_metrics(names: Sequence[str], where: str) -> None:
    """ValueError naming ``where`` and listing the metric names if any of ``names`` is unknown or repeated."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"{where}: unknown metric {unknown[0]!r}; the metrics are {', '.join(METRICS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: a metric is named twice")
