"""Batches that spend no compute on padding: length-grouped batches and packed rows (``data.packing``).

* ``grouped``: a buffer of samples from the mix is sorted by length and cut into micro-batches, which
  are shuffled: each batch pads to a length close to all of its samples'. The buffer is refilled from
  the weighted mix, so the domain proportions hold over time (LLaVA's ``group_by_modality_length``).
* ``packed``: several samples share a row of up to ``data.max_length`` tokens. Position ids restart at
  0 for each sample, which is how transformers tells samples apart without an attention mask (its
  SDPA/eager path builds a block-diagonal causal mask from them when the mask is ``None`` and there is
  no cache; flash attention's varlen path reads the same position ids). Each sample's first label is
  ignored, so no token predicts across a boundary; ``sample_ids`` say which sample each token is, so
  routing statistics and the balance losses count samples, not rows.

The position ids a packed batch carries are the text positions, 0, 1, 2, ... per sample: what every
family's model reads to keep the samples apart. A family whose rotary positions follow another rule
(Qwen-VL's M-RoPE: three position streams per token from the image grid) numbers each sample its own
way in its forward, from these boundaries (:meth:`mole.backbones.base.Backbone.forward`), since that
rule needs the model's config and collation runs in data workers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from mole.data.collate import image_inputs
from mole.data.conversation import IGNORE_INDEX
from mole.data.sample import Example


def consecutive_batches(examples: Iterator[Example], batch_size: int) -> Iterator[list[Example]]:
    """``none``: the mix's samples ``batch_size`` at a time, in the order drawn."""
    while True:
        yield [next(examples) for _ in range(batch_size)]


def grouped_batches(examples: Iterator[Example], batch_size: int, buffer: int, rng: random.Random) -> Iterator[list[Example]]:
    """Micro-batches of similar length: fill a buffer of ``buffer`` samples (rounded up to whole
    batches), sort it by length, cut it into batches and yield them in random order; repeat."""
    size = max(buffer, batch_size) // batch_size * batch_size
    while True:
        pool = sorted((next(examples) for _ in range(size)), key=lambda e: len(e.input_ids))
        batches = [pool[i : i + batch_size] for i in range(0, size, batch_size)]
        rng.shuffle(batches)
        yield from batches


def packed_batches(examples: Iterator[Example], rows: int, max_length: int, buffer: int) -> Iterator[list[list[Example]]]:
    """Micro-batches of ``rows`` rows of at most ``max_length`` tokens each, filled from a buffer of
    ``buffer`` samples (refilled from ``examples`` before each row): each row takes the buffer's oldest
    sample, so none waits for ever and the mix's proportions hold over time, then the subset of the
    others that fills the row best (:func:`best_fill`). A sample must fit one row (``SampleProcessor``
    truncates to ``max_length``)."""
    pool: list[Example] = []
    while True:
        batch = []
        for _ in range(rows):
            while len(pool) < max(buffer, 1):
                pool.append(next(examples))
            first, rest = pool[0], pool[1:]
            chosen = set(best_fill([len(e.input_ids) for e in rest], max_length - len(first.input_ids)))
            batch.append([first] + [e for i, e in enumerate(rest) if i in chosen])
            pool = [e for i, e in enumerate(rest) if i not in chosen]
        yield batch


def best_fill(lengths: list[int], capacity: int) -> list[int]:
    """Indices of a subset of ``lengths`` whose sum is the largest not above ``capacity`` (subset sum,
    exact: the sums reachable with the first i items are the bits of one integer)."""
    if capacity <= 0:
        return []
    mask = (1 << (capacity + 1)) - 1
    reach = [1]  # reach[i]: bit s set when the first i items can sum to s
    for n in lengths:
        reach.append(reach[-1] | ((reach[-1] << n) & mask))
    total = reach[-1].bit_length() - 1
    chosen = []
    for i in range(len(lengths), 0, -1):
        if not (reach[i - 1] >> total) & 1:  # this sum needs item i-1
            chosen.append(i - 1)
            total -= lengths[i - 1]
    return chosen[::-1]


def collate_packed(rows: list[list[Example]], pad_token_id: int) -> dict:
    """Packed rows -> one batch: each row the concatenation of its samples, right-padded to the longest row.

    Samples are numbered in row-major order (``sample_ids``, -1 on padding), which is also the order of
    the images (``pixel_values``, ``image_sizes``: see :func:`mole.data.collate.collate`), ``domain`` and
    ``keys`` (the model scatters image features in token order).
    ``attention_mask`` is ``None``; ``position_ids`` restart per sample (and at the padding, which then
    attends only to itself); each sample's first label is ``IGNORE_INDEX``. ``tokens`` counts the real
    tokens, ``num_samples`` the samples.
    """
    length = max(sum(len(e.input_ids) for e in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sample_ids = torch.full(shape, -1, dtype=torch.long)
    ordered = [example for row in rows for example in row]
    sample = 0
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, start : start + n] = torch.tensor(example.input_ids)
            labels[r, start + 1 : start + n] = torch.tensor(example.labels[1:], dtype=torch.long)
            position_ids[r, start : start + n] = torch.arange(n)
            sample_ids[r, start : start + n] = sample
            start, sample = start + n, sample + 1
        position_ids[r, start:] = torch.arange(length - start)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": None,
        "position_ids": position_ids,
        "sample_ids": sample_ids,
        "num_samples": len(ordered),
        **image_inputs(ordered),
        "domain": torch.tensor([example.domain for example in ordered], dtype=torch.long),
        "keys": [example.key for example in ordered],
        "tokens": sum(len(example.input_ids) for example in ordered),
    }
