"""A domain's examples, read once in shard order and dealt to ranks: held-out loss and evaluation.

Unlike the training stream (endless, resampled, shuffled), this reads each shard once, in order, and
stops. Sample ``i`` goes to rank ``i % world_size``; what ``i`` counts is ``deal``:

- ``"read"``: every sample read, usable or not. A rank prepares only its own samples, so ranks may
  end with different numbers of examples; ``limit`` counts samples read. Offline evaluation, which
  sums its counts over ranks, deals this way.
- ``"usable"``: usable samples only. Every rank prepares every sample to learn which are usable, and
  the shares differ by at most one example; ``limit`` counts usable samples. Held-out loss during
  training deals this way: its forwards are collectives, and equal shares keep the ranks' work equal.

Bad samples (shard damage and samples that fail processing) are skipped and counted by reason.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Literal

from mole.data.errors import BadSample
from mole.data.sample import Example, SampleProcessor
from mole.data.shards import read_shard

Deal = Literal["read", "usable"]


def shard_examples(urls: list[str], process: SampleProcessor, skipped: Counter, *, domain: int = 0, rank: int = 0,
                   world_size: int = 1, limit: int | None = None, deal: Deal = "read") -> Iterator[Example]:
    """This rank's examples of the first ``limit`` samples (all if ``None``) of the shards ``urls``,
    in order, each of domain number ``domain``; bad samples this rank met are counted in ``skipped``
    by reason (with ``deal="usable"`` every rank meets every bad sample)."""
    samples = (sample for url in urls for sample in read_shard(url))
    if deal == "read":
        return _usable(_share(itertools.islice(samples, limit), rank, world_size), process, domain, skipped)
    if deal == "usable":
        return _share(itertools.islice(_usable(samples, process, domain, skipped), limit), rank, world_size)
    raise ValueError(f"deal must be 'read' or 'usable', got {deal!r}")


def _share(items: Iterable, rank: int, world_size: int) -> Iterator:
    return (item for index, item in enumerate(items) if index % world_size == rank)


def _usable(samples: Iterable, process: SampleProcessor, domain: int, skipped: Counter) -> Iterator[Example]:
    for sample in samples:
        try:
            example = process(sample, domain)
        except BadSample as bad:
            skipped[bad.reason] += 1
            continue
        yield example
