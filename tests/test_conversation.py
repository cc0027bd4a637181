"""Conversation -> tokens and labels with the tiny model's real tokenizer and chat template."""

import copy
import json

import pytest
from transformers import AutoConfig, AutoProcessor

from mole.backbones.base import backbone_for
from mole.data.conversation import IGNORE_INDEX, parse_conversation, to_chat_messages, tokenize_conversation
from mole.data.errors import BadSample
from tests.helpers import REPO, TINY_MODEL


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(TINY_MODEL)


def encode(processor, record, max_length=512):
    turns, has_image = parse_conversation(json.dumps(record).encode())
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return tokenize_conversation(turns, has_image, processor.tokenizer, image_id, 16, max_length)


MULTI_TURN = {
    "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the main object?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many objects are there?"},
        {"from": "gpt", "value": "two"},
    ]
}


def test_labels_cover_exactly_each_answer_plus_eos_on_a_multi_turn_sample(processor):
    tokenizer = processor.tokenizer
    ids, labels = encode(processor, MULTI_TURN)
    assert len(ids) == len(labels)
    labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    spans, current = [], [labelled[0]]
    for i in labelled[1:]:
        if i == current[-1] + 1:
            current.append(i)
        else:
            spans.append(current)
            current = [i]
    spans.append(current)
    texts = [tokenizer.decode([ids[i] for i in span]) for span in spans]
    assert texts == [" red</s>", " two</s>"], texts
    assert all(labels[i] == ids[i] for i in labelled), "labels must equal the input ids where not masked"
    prompt = tokenizer.decode(ids[: spans[0][0]])
    assert prompt.startswith("<s>USER: ") and prompt.endswith("What color is the main object? ASSISTANT:"), prompt


THREE_TURNS = [("What is shown?", "A red square."), ("And its colour?", "red"), ("How many sides?", "Four, all equal.")]
FAMILY_MODELS = ["llava", "llava-next", "llava-onevision", "qwen2-5-vl", "qwen3-vl"]


def three_turns(with_image: bool) -> dict:
    conversation = []
    for index, (question, answer) in enumerate(THREE_TURNS):
        image = "<image>\n" if with_image and index == 0 else ""
        conversation += [{"from": "human", "value": image + question}, {"from": "gpt", "value": answer}]
    return {"conversations": conversation}


def family_processor(name: str):
    path = str(REPO / "models" / f"tiny-{name}")
    return backbone_for(AutoConfig.from_pretrained(path)).load_processor(path)


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The labelled tokens, one list per run of consecutive labelled positions."""
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels)), "a label differs from its input id"
    runs, previous = [], None
    for index, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if previous != index - 1:
            runs.append([])
        runs[-1].append(label)
        previous = index
    return runs


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text_only"])
@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_a_multi_turn_conversation_is_the_templates_rendering_with_each_answer_and_its_end_of_turn_labelled(
        name, with_image):
    """ChatML (``<|im_start|>assistant\\n{answer}<|im_end|>\\n``): the tokens are the template's own, the
    newline after ``<|im_end|>`` between turns included; the labels are the answer and ``<|im_end|>``, not
    the newline after ``assistant``. LLaVA-1.5's template ends an answer with a space, its training format
    with EOS: the same, with the space after each answer replaced by EOS."""
    processor = family_processor(name)
    tokenizer, image_tokens = processor.tokenizer, 3
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    turns, has_image = parse_conversation(json.dumps(three_turns(with_image)).encode())
    ids, labels = tokenize_conversation(turns, has_image, tokenizer, image_id, image_tokens, 4096)

    eos, lead = tokenizer.eos_token, ""
    rendered = tokenizer.apply_chat_template(to_chat_messages(turns, has_image), tokenize=False)
    if eos not in rendered:
        lead = " "  # LLaVA-1.5: the space before an answer is labelled with it
        for _, answer in THREE_TURNS:
            rendered = rendered.replace(f"ASSISTANT: {answer} ", f"ASSISTANT: {answer}{eos}", 1)
    expected = [each for token in tokenizer(rendered)["input_ids"]
                for each in [token] * (image_tokens if token == image_id else 1)]
    assert ids == expected, f"\n{tokenizer.decode(ids)!r}\n!= the template's\n{tokenizer.decode(expected)!r}"
    assert ids.count(image_id) == (image_tokens if with_image else 0)
    runs = labelled_runs(ids, labels)
    answers = [lead + answer + eos for _, answer in THREE_TURNS]
    assert runs == [tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in answers], (
        f"labelled {[tokenizer.decode(run) for run in runs]}, expected {answers}")


@pytest.mark.parametrize("name", ["llava-onevision", "qwen2-5-vl", "qwen3-vl"])
def test_a_chatml_multi_turn_inference_prompt_is_the_templates_generation_prompt(name):
    from mole.inference import prompt_text

    tokenizer = family_processor(name).tokenizer
    turns, has_image = parse_conversation(json.dumps(three_turns(True)).encode())
    messages = to_chat_messages(turns[:-1], has_image)
    assert prompt_text(turns[:-1], has_image, tokenizer) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


# tiny-llava's (LLaVA-1.5's template and tokenizer) ids and labels of three_turns(with_image=True), 2 image tokens
LLAVA_THREE_TURNS_IDS = [1, 271, 28, 223, 598, 598, 201, 299, 300, 313, 74, 81, 89, 80, 33, 275, 28, 223, 35, 335, 458, 16, 2,
                         271, 28, 223, 35, 394, 223, 350, 85, 576, 33, 275, 28, 335, 2, 271, 28, 360, 305, 497, 33, 275, 28,
                         382, 81, 337, 14, 287, 472, 223, 71, 431, 407, 16, 2]
LLAVA_THREE_TURNS_LABELLED = [(17, 23), (35, 37), (45, 57)]  # [start, end) of each answer + </s>


@pytest.mark.parametrize("name", ["llava", "llava-next"])
def test_llava_1_5_template_tokens_and_labels_are_pinned(name):
    """LLaVA-1.5's format, ``USER: <image>\\nq ASSISTANT: a</s>USER: ...``, the space before each answer
    labelled with it (SentencePiece's ``▁a``)."""
    processor = family_processor(name)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    turns, has_image = parse_conversation(json.dumps(three_turns(True)).encode())
    ids, labels = tokenize_conversation(turns, has_image, processor.tokenizer, image_id, 2, 4096)
    assert ids == LLAVA_THREE_TURNS_IDS, processor.tokenizer.decode(ids)
    expected = [IGNORE_INDEX] * len(ids)
    for start, end in LLAVA_THREE_TURNS_LABELLED:
        expected[start:end] = ids[start:end]
    assert labels == expected


@pytest.mark.parametrize("answer", ["Blue", "d", "a"])
def test_answer_spans_hold_for_a_template_with_text_after_the_answer(processor, answer):
    """A Llama-3-style template closes each turn with ``<|eot_id|>`` and opens it with the role name: the
    answer is found where the template puts it, not wherever its text also occurs ("d" in
    ``<|eot_id|>``, "a" in "assistant")."""
    from mole.data.conversation import Turn, render_conversation

    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}")
    turns = [Turn("user", "Colour or letter?"), Turn("assistant", answer), Turn("user", "Again?"), Turn("assistant", answer)]
    text, spans = render_conversation(turns, False, tokenizer)
    eos = tokenizer.eos_token
    assert [text[lo:hi] for lo, hi in spans] == [f"{answer}{eos}"] * 2, (text, spans)
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert text == (f"{header.format('user')}Colour or letter?<|eot_id|>{header.format('assistant')}{answer}{eos}"
                    f"{header.format('user')}Again?<|eot_id|>{header.format('assistant')}{answer}{eos}"), text


def test_image_placeholder_expands_to_one_token_per_image_feature(processor):
    ids, _ = encode(processor, MULTI_TURN)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert ids.count(image_id) == 16


def test_prompt_matches_what_the_chat_template_gives_at_inference(processor):
    ids, labels = encode(processor, MULTI_TURN)
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the main object?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = processor(text=text, images=None if False else _blank(processor), return_tensors="pt")["input_ids"][0].tolist()
    assert ids[:first_answer] == expected, "training prompt differs from the inference prompt"


def _blank(processor):
    from PIL import Image

    return Image.new("RGB", (56, 56))


def test_truncation_never_cuts_image_tokens(processor):
    with pytest.raises(BadSample) as err:
        encode(processor, MULTI_TURN, max_length=10)
    assert err.value.reason == "too_long"
    ids, labels = encode(processor, MULTI_TURN, max_length=40)
    assert len(ids) == 40 and any(label != IGNORE_INDEX for label in labels)
    image_end = 1 + max(i for i, token in enumerate(ids) if token == processor.tokenizer.convert_tokens_to_ids("<image>"))
    with pytest.raises(BadSample, match=f"image tokens end at {image_end} > max_length {image_end - 1}"):
        encode(processor, MULTI_TURN, max_length=image_end - 1)  # one image token would be cut
    with pytest.raises(BadSample, match="no answer token left"):
        encode(processor, MULTI_TURN, max_length=image_end)  # every image token fits


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "non_utf8"),
        (b'{"conversations": []}', "no_conversations"),
        (b'{"conversations": [{"from": "human", "value": 3}]}', "wrong_type"),
        (b'{"conversations": [{"from": "human", "value": "hi"}]}', "no_answer"),
        (b'{"conversations": [{"from": {"a": 1}, "value": "hi"}, {"from": "gpt", "value": "a"}]}', "wrong_type"),
        (b'{"conversations": [{"from": "human", "value": "\\udfff"}, {"from": "gpt", "value": "a"}]}', "non_utf8"),
        (b"[" * 100_000, "invalid_json"),
        (b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "answers": "a"}]}', "wrong_type"),
        (b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "answers": []}]}', "wrong_type"),
        (b'{"conversations": [{"from": "human", "value": "q", "answers": ["a"]}, {"from": "gpt", "value": "a"}]}', "wrong_type"),
    ],
)
def test_bad_conversations_name_their_reason(raw, reason):
    with pytest.raises(BadSample) as err:
        parse_conversation(raw)
    assert err.value.reason == reason


def test_text_far_beyond_max_length_is_cut_before_tokenising_to_the_same_tokens(processor, monkeypatch):
    from mole.data import conversation

    pieces = ["the", "chart", "---|---|", " ", "  ", "\n", "é", "数据", "🙂", "|---|---|---|---|", "x" * 40, "."]
    answer = "".join(pieces[(i * 7) % len(pieces)] + " " * (i % 3) for i in range(6000))
    record = {"conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": answer},
                                {"from": "human", "value": "More?"}, {"from": "gpt", "value": answer}]}
    cut = encode(processor, record, max_length=128)
    monkeypatch.setattr(conversation, "longest_token", lambda tokenizer: 10**9)  # no cut
    assert encode(processor, record, max_length=128) == cut, "cutting the text changed the first max_length tokens"


def test_an_image_sample_whose_user_turn_lies_beyond_the_cut_is_too_long(processor):
    record = {"conversations": [{"from": "gpt", "value": "a " * 200_000}, {"from": "human", "value": "<image>\nAnd?"},
                                {"from": "gpt", "value": "b"}]}
    with pytest.raises(BadSample) as err:
        encode(processor, record, max_length=64)
    assert err.value.reason == "too_long"


def test_an_answer_carries_its_reference_answers_for_evaluation():
    raw = b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "two", "answers": ["2", "two", "2"]}]}'
    turns, _ = parse_conversation(raw)
    assert turns[1].text == "two" and turns[1].references == ("2", "two", "2"), turns[1]
    assert parse_conversation(b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}')[0][1].references == ()
