"""Packed rows and length-grouped batches: the same losses, gradients and routing as padded batches, for
the tiny model of every backbone family."""

from __future__ import annotations

import functools
import io
import json
import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mole.balance import aux_loss
from mole.config import load_config
from mole.data.collate import collate, to_device
from mole.data.packing import collate_packed, grouped_batches, packed_batches
from mole.data.stream import SampleProcessor
from mole.lm_loss import answer_tokens
from mole.model import TrainingModel, build_mole_model
from tests.helpers import REPO, TINY_CONFIG, one_thread_for_the_module  # noqa: F401 (autouse fixture)

CONFIGS = {"llava": TINY_CONFIG, **{family: REPO / "launch" / "configs" / f"tiny_{family}.yaml"
                                   for family in ("llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl")}}


def image(size: tuple[int, int], seed: int) -> bytes:
    """A noisy RGB PNG of ``size`` (width, height): sizes differ, so the tiling and dynamic-resolution
    families give the images different numbers of tiles, patches and image tokens."""
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(question: str, answer: str, image_size: tuple[int, int] | None) -> dict:
    turns = [{"from": "human", "value": ("<image>\n" if image_size else "") + question}, {"from": "gpt", "value": answer}]
    raw = {"json": json.dumps({"conversations": turns}).encode()}
    if image_size:
        raw["png"] = image(image_size, len(question))
    return raw


RAGGED = [  # (question, answer, image size): lengths from a few tokens to a few dozen, text-only included
    ("What color is the main object?", "red", (64, 48)),
    ("How many sides has a triangle?", "three sides, as every triangle has", None),
    ("Describe the picture in detail, please, naming every shape and its colour.", "a blue square on white", (40, 90)),
    ("Hi", "hello there, how can I help you today with shapes or charts?", None),
    ("Which bar is tallest?", "B", (100, 100)),
]


@functools.cache
def tiny_family(family: str) -> tuple[TrainingModel, list, int]:
    """The family's tiny model as a MoLE model with non-zero experts, fp32, and the RAGGED samples
    through the family's data path (its own image processor)."""
    cfg = load_config(str(CONFIGS[family]), ["lora.dropout=0.0", "train.train_projector=true"])
    llava, surgery, processor = build_mole_model(cfg, torch.float32)
    torch.manual_seed(0)
    for name, param in llava.named_parameters():  # B starts at zero: make the experts matter
        if param.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    model = TrainingModel(llava, surgery, "switch", 0.05)
    backend = "fast" if family == "llava" else "processor"
    process = SampleProcessor(processor, 256, cfg.data.image_aspect, image_backend=backend, backbone=model.backbone)
    examples = [process(conversation(*sample), index % 2) for index, sample in enumerate(RAGGED)]
    return model, examples, processor.tokenizer.pad_token_id


@pytest.fixture(scope="module")
def tiny():
    return tiny_family("llava")


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
    yield request.param, *tiny_family(request.param)
    tiny_family.cache_clear()  # one family's model at a time


def run(model: TrainingModel, batch: dict, normaliser: float) -> dict:
    """One forward + backward: the outputs, the logits, per-sample routing sums and every trainable gradient."""
    model.zero_grad()
    captured = {}
    handle = model.llava.register_forward_hook(lambda module, args, out: captured.update(logits=out.logits.detach()))
    try:
        out = model(**to_device(batch, torch.device("cpu")), loss_normaliser=normaliser)
    finally:
        handle.remove()
    out["loss"].backward()
    stats = model.context.stats()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return {"out": out, "logits": captured["logits"], "stats": stats, "grads": grads}


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor, samples: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Sum of answer-token losses per sample; ``samples`` (batch, seq) numbers each token's sample."""
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:],
                                                   ignore_index=-100, reduction="none")
    keep = labels[:, 1:] != -100
    return torch.zeros(num_samples, dtype=torch.float64).index_add(0, samples[:, 1:][keep], token_loss[keep].double())


def padded_samples(batch: dict) -> torch.Tensor:
    rows = torch.arange(batch["input_ids"].shape[0]).unsqueeze(1).expand_as(batch["input_ids"])
    return torch.where(batch["attention_mask"].bool(), rows, -1)


def padded_and_packed(examples: list, pad: int) -> tuple[dict, dict]:
    rows = [[examples[0], examples[1], examples[2]], [examples[3], examples[4]]]  # rows of 3 and 2 samples
    packed = collate_packed(rows, pad)
    return collate(examples, pad), packed


@pytest.mark.parametrize("aux_kind", ["switch", "per_sample"])
def test_packed_and_padded_give_the_same_per_sample_losses_routing_and_gradients(family, aux_kind):
    name, model, examples, pad = family
    model.aux_kind = aux_kind
    padded, packed = padded_and_packed(examples, pad)
    assert packed["input_ids"].shape[0] == 2 and packed["num_samples"] == 5
    assert packed["num_images"] == 3 and (packed["input_ids"] == pad).sum() > 0, "a row must have padding"
    if packed["image_sizes"] is not None:
        assert torch.equal(packed["image_sizes"], padded["image_sizes"]), "the images' sizes must keep their order"
    total = float(answer_tokens(padded["labels"]))
    assert float(answer_tokens(packed["labels"])) == total, "packing must not change which tokens are predicted"
    a, b = run(model, padded, total), run(model, packed, total)
    losses_a = per_sample_losses(a["logits"], padded["labels"], padded_samples(padded), 5)
    losses_b = per_sample_losses(b["logits"], packed["labels"], packed["sample_ids"], 5)
    torch.testing.assert_close(losses_b, losses_a, rtol=1e-5, atol=1e-6, msg=f"{name}: per-sample LM losses differ")
    for key in ("lm_loss", "aux_loss", "loss"):
        torch.testing.assert_close(b["out"][key], a["out"][key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key} differs")
    for layer, (sa, sb) in enumerate(zip(a["stats"], b["stats"])):
        for field in ("prob_sum", "count", "tokens"):
            torch.testing.assert_close(getattr(sb, field), getattr(sa, field), rtol=1e-5, atol=1e-5,
                                       msg=f"{name}: layer {layer} per-sample routing {field} differs")
    assert a["grads"].keys() == b["grads"].keys() and any("router" in n for n in a["grads"])
    assert any("lora_A" in n and "self_attn" in n for n in a["grads"]), "precondition: attention adapters train"
    for param, grad in a["grads"].items():
        torch.testing.assert_close(b["grads"][param], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: d/d{param} differs")


def test_packed_rows_are_exact_under_eager_attention_too(tiny):
    model, examples, pad = tiny
    padded, packed = padded_and_packed(examples, pad)
    model.llava.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            a = model(**to_device(padded, torch.device("cpu")))
            b = model(**to_device(packed, torch.device("cpu")))
    finally:
        model.llava.set_attn_implementation("sdpa")
    torch.testing.assert_close(b["lm_loss"], a["lm_loss"], rtol=1e-5, atol=1e-6, msg="eager packed != eager padded")
    torch.testing.assert_close(b["aux_loss"], a["aux_loss"], rtol=1e-5, atol=1e-6)


def test_a_mask_on_a_packed_batch_is_refused_because_samples_would_attend_to_each_other(tiny):
    """transformers finds packed samples from the position ids only when there is no attention mask:
    with an all-ones mask the samples of a row attend to each other (the losses change), silently."""
    model, examples, pad = tiny
    _, packed = padded_and_packed(examples, pad)
    inputs = to_device(packed, torch.device("cpu"))
    with torch.no_grad():
        separate = model.llava(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                               pixel_values=inputs["pixel_values"], use_cache=False).logits
        crossed = model.llava(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                              attention_mask=torch.ones_like(inputs["input_ids"]),
                              pixel_values=inputs["pixel_values"], use_cache=False).logits
    assert not torch.allclose(separate, crossed, atol=1e-4), "a mask no longer changes packed attention: recheck"
    with pytest.raises(ValueError, match="without an attention mask"):
        model(**{**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])})


def test_packed_collate_restarts_positions_and_ignores_each_samples_first_label(tiny):
    _, examples, pad = tiny
    _, packed = padded_and_packed(examples, pad)
    lengths = [len(e.input_ids) for e in examples]
    row0 = packed["position_ids"][0]
    assert row0[: lengths[0]].tolist() == list(range(lengths[0]))
    assert row0[lengths[0]] == 0 and row0[lengths[0] + lengths[1]] == 0, "positions must restart per sample"
    for start in (0, lengths[0], lengths[0] + lengths[1]):
        assert packed["labels"][0, start] == -100, f"label at a sample start ({start}) would be predicted across it"
    assert packed["sample_ids"][1, : lengths[3]].unique().tolist() == [3]
    assert packed["tokens"] == sum(lengths)
    assert packed["domain"].tolist() == [e.domain for e in examples]


def test_packed_batches_fill_rows_to_the_budget_and_keep_every_sample():
    lengths = [random.Random(i).randint(10, 200) for i in range(400)]
    stream = iter(SimpleNamespace(input_ids=[0] * n, key=str(i)) for i, n in enumerate(lengths))
    batches = packed_batches(stream, rows=4, max_length=256, buffer=32)
    seen, placed, used, slots = set(), 0, 0, 0
    for _ in range(20):
        batch = next(batches)
        assert len(batch) <= 4
        for row in batch:
            assert sum(len(e.input_ids) for e in row) <= 256, "a row exceeds the token budget"
            seen.update(e.key for e in row)
            placed += len(row)
            used += sum(len(e.input_ids) for e in row)
        slots += 4 * 256
    assert placed == len(seen), "a sample was placed twice"
    assert 1 - used / slots < 0.05, f"packed padding {1 - used / slots:.3f} of the budget"


def test_grouped_batches_hold_similar_lengths_and_every_sample():
    lengths = [random.Random(i).randint(10, 2000) for i in range(256)]
    stream = iter(SimpleNamespace(input_ids=[0] * n, key=i) for i, n in enumerate(lengths))
    batches = grouped_batches(stream, batch_size=4, buffer=64, rng=random.Random(0))
    drawn = [next(batches) for _ in range(64)]
    assert sorted(e.key for b in drawn for e in b) == list(range(256)), "grouping must drop or repeat nothing"
    padded = sum(4 * max(len(e.input_ids) for e in b) for b in drawn)
    assert 1 - sum(lengths) / padded < 0.1, "length-grouped batches should pad little"
    firsts = [b[0].key for b in drawn[:16]]
    assert firsts != sorted(firsts), "batches must be shuffled, not in length order"


def test_best_fill_finds_the_fullest_subset_that_fits():
    from mole.data.packing import best_fill

    lengths = [7, 5, 9, 3]
    for capacity, best in ((10, 10), (11, 10), (13, 12), (2, 0), (24, 24), (100, 24)):
        chosen = best_fill(lengths, capacity)
        assert len(set(chosen)) == len(chosen) and sum(lengths[i] for i in chosen) == best, (capacity, chosen)


def flash_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                    max_length_q=None, **kwargs):
    """What flash attention computes, on a CPU: causal attention within each varlen segment when the
    segments are given (``cu_seq_lens_q`` over the flattened rows), else over each whole row, as
    ``flash_attn_func`` does. query/key/value: (batch, heads, seq, head_dim)."""
    assert attention_mask is None, "flash attention takes a packed batch without a mask"
    batch, heads, seq, dim = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    if cu_seq_lens_q is None:
        bounds = [(r * seq, (r + 1) * seq) for r in range(batch)]
    else:
        bounds = list(zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist()))
        assert max(e - s for s, e in bounds) == max_length_q
    flat = [t.transpose(1, 2).reshape(batch * seq, heads, dim).transpose(0, 1) for t in (query, key, value)]
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(flat[0][:, s:e], flat[1][:, s:e], flat[2][:, s:e],
                                                                      is_causal=True, scale=scaling)
                     for s, e in bounds], dim=1)  # (heads, batch * seq, dim)
    return out.transpose(0, 1).reshape(batch, seq, heads, dim), None


def test_packed_rows_reach_flash_attention_as_one_segment_per_sample(family):
    """Under flash attention (here a CPU reference of its varlen kernel, registered through transformers'
    AttentionInterface for the language model) a packed batch of several rows must reach every
    decoder layer as one segment per sample: transformers only finds the segments itself for a
    single row, and flash attention over whole rows would let a row's samples attend to each other."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    name, model, examples, pad = family
    AttentionInterface.register("flash_reference", flash_reference)
    AttentionMaskInterface.register("flash_reference", flash_attention_mask)
    _, packed = padded_and_packed(examples, pad)
    assert not _is_packed_sequence(packed["position_ids"], packed["input_ids"].shape[0]), "precondition: two rows"
    before = model.llava.config.get_text_config()._attn_implementation
    model.llava.set_attn_implementation({"text_config": "flash_reference"})
    try:
        with torch.no_grad():
            flash = model(**to_device(packed, torch.device("cpu")))
    finally:
        model.llava.set_attn_implementation({"text_config": before})
    with torch.no_grad():
        sdpa = model(**to_device(packed, torch.device("cpu")))
    torch.testing.assert_close(flash["lm_loss"], sdpa["lm_loss"], rtol=1e-5, atol=1e-6,
                               msg=f"{name}: packed rows under flash attention let samples attend to each other")
