"""Answer normalisation and matching in the style of the VQAv2 evaluation.

VQAv2 (Antol et al. 2015; the official ``vqaEval.py``) compares answers after: lower-casing,
punctuation handling (a period before a digit stays, ``,`` between digits is a thousands separator
and goes, other punctuation becomes a space or disappears), number words to digits, dropping the
articles ``a``/``an``/``the`` and restoring common contractions written without an apostrophe.
VQAv2 scores against ten human answers; our data have one reference answer, so accuracy here is
equality of the normalised strings (of the lower-cased words where normalisation leaves nothing,
as of a multiple-choice "A"). Exact match compares the stripped raw strings.
"""

from __future__ import annotations

import re

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't",
    "shouldnt": "shouldn't", "wasnt": "wasn't", "werent": "weren't", "wont": "won't", "wouldnt": "wouldn't",
    "youre": "you're", "theyre": "they're", "whats": "what's", "thats": "that's", "its": "it's",
}
PUNCTUATION = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$:~|")  # not the apostrophe: "don't" must stay one word
_PERIOD = re.compile(r"\.(?!\d)")  # a period not before a digit (3.5 keeps it, "3." loses it), as vqaEval.py
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000


def normalize_answer(answer: str) -> str:
    """The VQAv2-normalised form of an answer (``"Two."`` -> ``"2"``, ``"the Red one"`` -> ``"red 1"``)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _THOUSANDS.sub("", text)
    text = "".join(" " if char in PUNCTUATION else char for char in text)
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = word.strip("'")  # quote marks around a word, not an apostrophe inside one
        word = NUMBER_WORDS.get(word, word)
        if not word or word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def answers_match(prediction: str, reference: str) -> bool:
    """Equal after :func:`normalize_answer`; where that leaves nothing of either (a multiple-choice
    letter "A" is an article to VQA's normalisation, as is "the"), equal as lower-cased words without
    punctuation instead, so that an empty prediction never matches such a reference."""
    normal_prediction, normal_reference = normalize_answer(prediction), normalize_answer(reference)
    if normal_prediction and normal_reference:
        return normal_prediction == normal_reference
    plain = _plain_words(prediction)
    return plain == _plain_words(reference) and (bool(plain) or prediction.strip() == reference.strip())


def _plain_words(answer: str) -> str:
    return " ".join("".join(" " if char in PUNCTUATION or char == "." else char for char in answer.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Equal as written, up to surrounding whitespace."""
    return prediction.strip() == reference.strip()
