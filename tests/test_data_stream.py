"""The mixed stream on real tar shards: per-consumer sequences, weights, resume seeds, batch format."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers import AutoProcessor

from mole.data.conversation import IGNORE_INDEX
from mole.data.stream import Domain, MixedStream, SampleProcessor, make_loader
from tests.helpers import REPO, TINY_MODEL, text_sample, write_shard

SHARD_SAMPLES = 3  # tiny shards: many shard draws per consumer, so every shard shows up


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def sample_processor(processor):
    return SampleProcessor(processor, 64, "pad")


@pytest.fixture(scope="module")
def text_domains(tmp_path_factory):
    """Three text-only domains of two small shards each; keys are ``<domain>-<shard>-<index>``."""
    root = tmp_path_factory.mktemp("domains")
    domains = []
    for name in ("alpha", "beta", "gamma"):
        urls = []
        for shard in range(2):
            samples = [text_sample(f"{name}-{shard}-{i}", f"{name} question {i}?", f"answer {i}") for i in range(SHARD_SAMPLES)]
            urls.append(str(write_shard(root / name / f"train-{shard:06d}.tar", samples)))
        domains.append(Domain(name, urls, 1.0))
    return domains


def make_stream(domains, sample_processor, processor, **kwargs) -> MixedStream:
    args = {"batch_size": 4, "pad_token_id": processor.tokenizer.pad_token_id, "seed": 0, "rank": 0, "shuffle_buffer": 8}
    return MixedStream(domains, sample_processor, **{**args, **kwargs})


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def test_two_ranks_by_two_workers_draw_four_different_sequences_from_every_shard(
        text_domains, sample_processor, processor, monkeypatch):
    # As under a real launcher: if webdataset split shards by node or worker, consumers would miss shards.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    batches_per_worker = 16
    sequences = {}
    for rank in (0, 1):
        stream = make_stream(text_domains, sample_processor, processor, rank=rank, batch_size=8)
        loader = make_loader(stream, num_workers=2, pin_memory=False)
        batches = iter(loader)
        drawn = [next(batches) for _ in range(2 * batches_per_worker)]  # the DataLoader alternates workers 0, 1, 0, ...
        for worker in (0, 1):
            sequences[(rank, worker)] = keys_of(drawn[worker::2])
        del batches, loader
    firsts = {consumer: tuple(seq[:16]) for consumer, seq in sequences.items()}
    assert len(set(firsts.values())) == 4, f"two consumers drew the same sequence: {firsts}"
    for consumer, seq in sequences.items():
        shards = {key.rsplit("-", 1)[0] for key in seq}
        assert shards == {f"{d}-{s}" for d in ("alpha", "beta", "gamma") for s in (0, 1)}, \
            f"consumer {consumer} (rank, worker) never drew from some shard: {sorted(shards)}"
    in_process = next(iter(make_stream(text_domains, sample_processor, processor, rank=1, batch_size=8)))["keys"]
    assert in_process == sequences[(1, 0)][:8], "seeds must derive from (seed, rank, worker) alone: worker 0 == in-process"


def test_domain_proportions_match_the_weights_within_three_sigma(tmp_path, text_domains, sample_processor, processor):
    # A fourth domain, half of whose samples are bad: the mixer's weights count valid samples.
    half_bad = [text_sample(f"delta-{i}", "q?", "a") if i % 2 else {"__key__": f"delta-{i}", "json": b"{"} for i in range(10)]
    delta = Domain("delta", [str(write_shard(tmp_path / "delta.tar", half_bad))], 2.0)
    weights = [1.0, 3.0, 0.5, 2.0]
    domains = [Domain(d.name, d.urls, w) for d, w in zip(text_domains, weights[:3])] + [delta]
    stream = iter(make_stream(domains, sample_processor, processor, batch_size=16, seed=7))
    counts, skipped = Counter(), Counter()
    for _ in range(200):
        batch = next(stream)
        counts.update(batch["domain"].tolist())
        skipped.update(batch["skipped"])
    n = sum(counts.values())
    assert n == 3200
    for index, weight in enumerate(weights):
        p = weight / sum(weights)
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[index] - n * p) <= 3 * sigma, f"domain {domains[index].name}: {counts[index]} of {n}, expected {n * p:.0f} +- {3 * sigma:.0f}"
    assert skipped["delta/invalid_json"] >= counts[3] * 0.8, f"the bad half of delta should be skipped and counted: {skipped}"


def test_resumed_stream_is_reseeded_not_replayed(text_domains, sample_processor, processor):
    def first_keys(**kwargs):
        stream = iter(make_stream(text_domains, sample_processor, processor, **kwargs))
        return keys_of(next(stream) for _ in range(16))

    original = first_keys(start_step=0)
    assert first_keys(start_step=0) == original, "the same seed, rank, worker and start step must give the same sequence"
    resumed = first_keys(start_step=500)
    same_position = sum(a == b for a, b in zip(original, resumed))
    assert same_position <= len(original) // 5, f"resumed run replays the original: {same_position}/{len(original)} positions equal"
    other_seed = first_keys(seed=1)
    assert sum(a == b for a, b in zip(original, other_seed)) <= len(original) // 5, "train.seed must change the data order"


def test_batches_are_padded_to_their_longest_sample_and_carry_domain_ids(tmp_path, sample_processor, processor):
    short = write_shard(tmp_path / "short.tar", [text_sample(f"s{i}", "Hi?", "yes") for i in range(4)])
    long = write_shard(tmp_path / "long.tar", [text_sample(f"l{i}", "Tell me everything about it?" * 3, "no") for i in range(4)])
    stream = iter(make_stream([Domain("short", [str(short)], 1.0), Domain("long", [str(long)], 1.0)], sample_processor,
                              processor, batch_size=6))
    for _ in range(5):
        batch = next(stream)
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max()), "dynamic padding: width == longest sample"
        pad = batch["attention_mask"] == 0
        assert (batch["input_ids"][pad] == processor.tokenizer.pad_token_id).all() and (batch["labels"][pad] == IGNORE_INDEX).all()
        assert batch["pixel_values"] is None, "a text-only batch has no pixel values"
        assert batch["domain"].dtype == torch.long and batch["domain"].tolist() == [k.startswith("l") for k in batch["keys"]]
        assert isinstance(batch["skipped"], Counter)


def test_image_and_text_samples_batch_together_with_images_in_sample_order(tmp_path, sample_processor, processor):
    shapes = f"{REPO}/data_shards/shapes/train-000000.tar"  # bundled: every 30th sample is text-only
    stream = iter(make_stream([Domain("shapes", [shapes], 1.0)], sample_processor, processor, batch_size=8, shuffle_buffer=0))
    batches = [next(stream) for _ in range(5)]
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for batch in batches:
        has_image = (batch["input_ids"] == image_token).any(1)
        assert batch["pixel_values"].shape == (int(has_image.sum()), 3, 56, 56), "one pixel tensor per sample with an image"
    assert any(not (b["input_ids"] == image_token).any(1).all() for b in batches), "precondition: a text-only sample in a batch"


@pytest.mark.parametrize("packing", ["grouped", "packed"])
def test_grouped_and_packed_streams_keep_every_drawn_sample_in_the_mixs_order(text_domains, sample_processor, processor,
                                                                               packing):
    """The plain stream's samples, in its order up to a buffer, through a DataLoader worker (worker 0 draws
    what the process would): grouping and packing only rearrange them into batches."""
    plain = keys_of(b for _, b in zip(range(30), make_stream(text_domains, sample_processor, processor)))
    stream = make_stream(text_domains, sample_processor, processor, packing=packing, packing_buffer=8)
    batches = [b for _, b in zip(range(6), iter(make_loader(stream, num_workers=1, pin_memory=False)))]
    drawn = keys_of(batches)
    if packing == "grouped":  # three buffers of 8: exactly the first 24 samples
        assert Counter(drawn) == Counter(plain[:24]), "grouping lost, repeated or invented samples"
    else:  # the oldest buffered sample goes first: at most a buffer beyond what was placed
        assert Counter(drawn) <= Counter(plain[: len(drawn) + 8]), "packing drew samples out of the mix's order"
    if packing == "packed":
        assert all(b["attention_mask"] is None and b["input_ids"].shape[1] <= 64 for b in batches)
        assert sum(b["num_samples"] for b in batches) > 6 * 4, "rows of 64 tokens should hold several short samples"
        assert all(b["position_ids"].shape == b["input_ids"].shape for b in batches)
    else:
        assert all(len(b["keys"]) == 4 for b in batches)
