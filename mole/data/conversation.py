"""LLaVA conversation JSON -> token ids and labels, with the model's own chat template.

Labels cover each assistant answer plus the EOS token (LLaVA-1.5's chat template alone adds no EOS, and
a model that never learns to stop breaks generation); everything else is masked with ``IGNORE_INDEX``.
Each turn is rendered through the tokenizer's chat template and the rendering of the conversation so
far is subtracted, so the prompt format is exactly the template's, whatever model directory is used.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from mole.data.errors import BadSample

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}
ANSWER_MARKER = "\ue000answer\ue000"  # stands in for an answer while locating it (private-use characters)
CUT_MARGIN_TOKENS = 64  # kept past max_length when text is cut before tokenising (merges across the cut)


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str
    references: tuple[str, ...] = ()
    """An answer's reference answers for evaluation, from the sample's optional ``"answers"`` list
    (VQAv2's ten human answers, DocVQA's several); empty: ``text`` is the one reference."""


def parse_conversation(raw: bytes) -> tuple[list[Turn], bool]:
    """Validate a LLaVA-format sample's JSON; return its turns and whether it references an image
    (one ``<image>`` placeholder, in any turn; more than one is a bad sample)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample("non_utf8", str(err)) from None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, an over-long integer, nesting too deep
        raise BadSample("invalid_json", f"{type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(record, dict):
        raise BadSample("wrong_type", f"top level is {type(record).__name__}, expected an object")
    conversations = record.get("conversations")
    if not conversations:
        raise BadSample("no_conversations", "missing or empty 'conversations'")
    if not isinstance(conversations, list):
        raise BadSample("wrong_type", "'conversations' is not a list")
    turns = []
    for index, message in enumerate(conversations):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("from", "value")):
            raise BadSample("wrong_type", f"turn {index} is not {{'from': str, 'value': str}}")
        role = ROLES.get(message["from"])
        if role is None:
            raise BadSample("wrong_type", f"turn {index} has unknown speaker {message['from']!r}")
        try:
            message["value"].encode("utf-8")
        except UnicodeEncodeError as err:  # JSON's \ud800 escapes decode to lone surrogates
            raise BadSample("non_utf8", f"turn {index}: {err}") from None
        turns.append(Turn(role, message["value"], _references(message, index)))
    if not any(turn.role == "assistant" and turn.text.strip() for turn in turns):
        raise BadSample("no_answer", "no non-empty assistant turn")
    placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders > 1:
        raise BadSample("image_placeholder", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders; a sample has one image")
    return turns, placeholders == 1


def _references(message: dict, index: int) -> tuple[str, ...]:
    """An assistant turn's optional ``"answers"``: a non-empty list of strings."""
    answers = message.get("answers")
    if answers is None:
        return ()
    if message["from"] != "gpt" or not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise BadSample("wrong_type", f"turn {index}: 'answers' must be a non-empty list of strings on an assistant turn")
    return tuple(answers)


def to_chat_messages(turns: list[Turn], has_image: bool) -> list[dict]:
    """LLaVA strings (``"<image>\\n..."``) -> the content-list messages chat templates expect."""
    messages = []
    image_placed = False
    for turn in turns:
        text = turn.text.replace(IMAGE_PLACEHOLDER, "").strip()
        content: list[dict] = []
        if has_image and not image_placed and turn.role == "user":
            content.append({"type": "image"})
            image_placed = True
        content.append({"type": "text", "text": text})
        messages.append({"role": turn.role, "content": content})
    return messages


def tokenize_conversation(
    turns: list[Turn], has_image: bool, tokenizer, image_token_id: int, num_image_tokens: int, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation, image placeholder expanded, truncated at ``max_length``.

    Truncation cuts from the end and never inside the image tokens: a sample whose image tokens do
    not fit, or that keeps no answer token, is a ``BadSample("too_long")``. Text that spells one of
    the tokenizer's special tokens (``</s>``, ``<image>`` beyond the placeholder, ...) is a
    ``BadSample("special_token")``: tokenised, it would become that control token, not the characters.
    Text far beyond what ``max_length`` tokens can hold is cut before tokenising (:func:`cut_turns`), so
    a sample's cost is bounded by ``max_length``, not by its size.
    """
    refuse_special_tokens(turns, tokenizer)
    turns = cut_turns(turns, has_image, (max_length + CUT_MARGIN_TOKENS) * longest_token(tokenizer))
    text, answer_spans = render_conversation(turns, has_image, tokenizer)
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(lo <= start and end <= hi for lo, hi in answer_spans) and end > start else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoded["offset_mapping"])
    ]
    ids, labels = _expand_image(ids, labels, image_token_id, num_image_tokens)
    if has_image and ids.count(image_token_id) != num_image_tokens:
        raise BadSample("image_placeholder", "expected exactly one <image> placeholder")
    last_image = max((i for i, t in enumerate(ids) if t == image_token_id), default=-1)
    if last_image >= max_length:
        raise BadSample("too_long", f"image tokens end at {last_image + 1} > max_length {max_length}")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSample("too_long", f"no answer token left within max_length {max_length}")
    return ids, labels


def cut_turns(turns: list[Turn], has_image: bool, max_chars: int) -> list[Turn]:
    """The turns up to ``max_chars`` characters of text, the last one kept cut short.

    No token spans more than :func:`longest_token` characters, so text cut at ``(max_length + margin)``
    times that tokenises to the same first ``max_length`` tokens (and labels) as the whole: truncation
    keeps only those. A sample whose image would land beyond the cut (no user turn before it) is
    ``too_long``, as it would be after tokenising.
    """
    if sum(len(turn.text) for turn in turns) <= max_chars:
        return turns
    kept, left = [], max_chars
    for turn in turns:
        kept.append(Turn(turn.role, turn.text[:left], turn.references))
        left -= len(turn.text)
        if left <= 0:
            break
    if has_image and not any(turn.role == "user" for turn in kept):
        raise BadSample("too_long", f"no user turn within the first {max_chars} characters to show the image in")
    return kept


@functools.lru_cache(maxsize=8)
def longest_token(tokenizer) -> int:
    """Characters of the tokenizer's longest vocabulary entry: an upper bound on the text one token covers
    (byte-level and byte-fallback entries count bytes, never fewer than the characters)."""
    return max(1, max(map(len, tokenizer.get_vocab())))


def refuse_special_tokens(turns: list[Turn], tokenizer) -> None:
    """``BadSample("special_token")`` if a turn spells one of ``tokenizer``'s special tokens (the one
    ``<image>`` placeholder aside)."""
    specials = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    for index, turn in enumerate(turns):
        text = turn.text.replace(IMAGE_PLACEHOLDER, "", 1)
        found = next((token for token in specials if token in text), None)
        if found is not None:
            raise BadSample("special_token", f"turn {index} spells the special token {found!r}")


def render_conversation(turns: list[Turn], has_image: bool, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as one string in the chat template's format, each answer followed by EOS,
    with the character spans of the answers (leading spaces and EOS included) to be labelled.

    The whole string is tokenised at once (tokenising turns separately splits tokens differently at
    turn boundaries than the inference prompt does). Each turn's text is what the template renders
    for the conversation up to it minus what it rendered before. A template that closes an answer
    with EOS keeps its own text (ChatML: ``<|im_start|>assistant\\na<|im_end|>\\n``, the string is the
    template's rendering of the whole conversation, the newlines unlabelled); any other separator after
    an answer is replaced by EOS, as LLaVA-1.5's own training format has it (``... ASSISTANT: a</s>USER: ...``).
    """
    messages = to_chat_messages(turns, has_image)
    # Rendered with a marker in place of each answer, so that where an answer starts is found as the
    # marker: searching the rendered turn for the answer itself can find it inside the template's own
    # text after it (an answer "d" in "<|eot_id|>") or before it (an answer "a" in "assistant").
    marked = [{**message, "content": [*message["content"][:-1], {"type": "text", "text": ANSWER_MARKER}]}
              if message["role"] == "assistant" else message for message in messages]
    text, rendered, spans = "", "", []
    for index, message in enumerate(marked):
        full = tokenizer.apply_chat_template(marked[: index + 1], tokenize=False)
        if not full.startswith(rendered):
            raise ValueError("the chat template does not render conversations prefix by prefix")
        piece, rendered = full[len(rendered) :], full
        if message["role"] != "assistant":
            text += piece
            continue
        before_answer, found, after_answer = piece.partition(ANSWER_MARKER)
        if not found:
            raise ValueError("the chat template does not render an assistant turn's text as given")
        answer = messages[index]["content"][-1]["text"]
        # Spaces before an answer belong to it (a tokenizer joins them to its first word: "▁a", "Ġa");
        # a newline, as after ChatML's "<|im_start|>assistant", stays with the prompt.
        header = before_answer.rstrip(" ")
        spacing = before_answer[len(header) :]
        text += header
        start = len(text)
        text += spacing + answer + tokenizer.eos_token
        spans.append((start, len(text)))
        if after_answer.startswith(tokenizer.eos_token):
            text += after_answer[len(tokenizer.eos_token) :]  # ChatML's "\n" after "<|im_end|>", unlabelled
    return text, spans


def _expand_image(ids, labels, image_token_id, count):
    """One image placeholder token -> ``count`` copies, one per image feature the projector emits."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        repeat = count if token == image_token_id else 1
        out_ids += [token] * repeat
        out_labels += [label] * repeat
    return out_ids, out_labels
