"""Per-domain infinite streams, mixed by weight, batched with skip counts attached.

Every consumer (rank x DataLoader worker) draws its own seeded sequence: shards are *resampled*
with a seed derived from (seed, rank, worker, start step, domain), so no two consumers replay the
same sequence, a resumed run is reseeded rather than replaying what it saw, and a rank never runs
dry. That last point is what keeps ranks in lockstep: every rank runs exactly ``max_steps`` steps.
Nothing is split by node or worker (no ``nodesplitter``): every consumer draws from every shard,
which stays correct when a domain has fewer shards than there are consumers.

The mixer picks a domain by weight for each sample, then takes that domain's next *valid* sample,
so the proportions hold whatever fraction of a domain's data is bad. Bad data is skipped and counted
per ``"<domain>/<reason>"`` (logged once per reason and consumer); a domain that yields
``MAX_CONSECUTIVE_SKIPS`` bad samples or unusable shards in a row is an error naming it.
Nothing from a shard is ever unpickled (see :mod:`mole.data.shards`).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mole.choices import Packing
from mole.data.collate import collate
from mole.data.packing import collate_packed, consecutive_batches, grouped_batches, packed_batches
from mole.data.errors import BadSample, DataError
from mole.data.sample import Example, SampleProcessor, count_image_tokens  # noqa: F401  (re-exported)
from mole.data.shards import expand_shards, read_shard, resampled_urls  # noqa: F401  (expand_shards re-exported)

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 1000  # a domain yielding nothing valid this long is broken, not unlucky


@dataclass
class Domain:
    name: str
    urls: list[str]  # expanded shard URLs
    weight: float


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes and Python hash randomisation."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class MixedStream(IterableDataset):
    """Infinite batches drawn from weighted domains; each batch carries the skip counts since the last.

    ``packing`` (``data.packing``) says how samples become batches (:mod:`mole.data.packing`); packed
    rows hold up to the sample processor's ``max_length`` tokens. Yields dicts from :func:`mole.data.collate.collate` (or
    :func:`mole.data.packing.collate_packed`) plus ``skipped``: a Counter of
    ``"<domain>/<reason>"`` -> samples (or shard reads) skipped in this consumer since its previous
    batch. Skip counters live in DataLoader worker processes, so they travel with the batches.
    ``on_read(domain, shard)`` is called before each raw sample is read (the watchdog's data phase;
    in a DataLoader worker it reaches only the worker's copy).
    """

    def __init__(
        self,
        domains: list[Domain],
        sample_processor: SampleProcessor,
        batch_size: int,
        pad_token_id: int,
        seed: int,
        rank: int,
        start_step: int = 0,
        shuffle_buffer: int = 100,
        on_read: Callable[[str, str], None] | None = None,
        packing: Packing = "none",
        packing_buffer: int = 64,
    ):
        super().__init__()
        if not domains:
            raise ValueError("MixedStream needs at least one domain")
        self.domains, self.process = domains, sample_processor
        self.batch_size, self.pad_token_id = batch_size, pad_token_id
        self.seed, self.rank, self.start_step, self.shuffle_buffer = seed, rank, start_step, shuffle_buffer
        self.on_read = on_read
        self.packing, self.packing_buffer = packing, packing_buffer
        total = sum(domain.weight for domain in domains)
        self.probabilities = [domain.weight / total for domain in domains]

    def consumer(self) -> tuple:
        """What this consumer's seeds derive from: (seed, rank, DataLoader worker, start step)."""
        worker = get_worker_info()
        return self.seed, self.rank, worker.id if worker is not None else 0, self.start_step

    def __iter__(self) -> Iterator[dict]:
        consumer = self.consumer()
        skipped: Counter = Counter()
        examples = self.mixed_examples(consumer, skipped)
        pad = self.pad_token_id
        if self.packing == "packed":
            rows = packed_batches(examples, self.batch_size, self.process.max_length, self.packing_buffer)
            batches = (collate_packed(batch, pad) for batch in rows)
        elif self.packing == "grouped":
            rng = random.Random(derive_seed("group", *consumer))
            batches = (collate(batch, pad) for batch in grouped_batches(examples, self.batch_size, self.packing_buffer, rng))
        else:
            batches = (collate(batch, pad) for batch in consecutive_batches(examples, self.batch_size))
        for batch in batches:
            batch["skipped"] = Counter(skipped)
            skipped.clear()
            yield batch

    def mixed_examples(self, consumer: tuple, skipped: Counter) -> Iterator[Example]:
        """The weighted mix of valid examples, endless: a domain drawn by weight, then its next valid sample."""
        reported: set[str] = set()
        sources = [self.domain_samples(domain, consumer) for domain in self.domains]
        mixer = random.Random(derive_seed("mix", *consumer))
        indices = range(len(self.domains))
        while True:
            index = mixer.choices(indices, weights=self.probabilities)[0]
            yield self._next_valid(index, sources[index], skipped, reported)

    def domain_samples(self, domain: Domain, consumer: tuple) -> Iterator[dict | BadSample]:
        """One domain's endless raw samples for one consumer: resampled shards, then a shuffle buffer."""
        urls = resampled_urls(domain.urls, derive_seed("shards", *consumer, domain.name))
        samples = (item for url in urls for item in self._read(domain.name, url))
        return shuffled(samples, self.shuffle_buffer, random.Random(derive_seed("shuffle", *consumer, domain.name)))

    def _read(self, name: str, url: str) -> Iterator[dict | BadSample]:
        if self.on_read is None:
            yield from read_shard(url)
            return
        items = read_shard(url)
        while True:
            self.on_read(name, url)  # before the read that may block
            item = next(items, None)
            if item is None:
                return
            yield item

    def _next_valid(self, index: int, samples: Iterator, skipped: Counter, reported: set[str]) -> Example:
        domain = self.domains[index]
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            try:
                return self.process(next(samples), index)
            except BadSample as bad:
                key = f"{domain.name}/{bad.reason}"
                skipped[key] += 1
                if key not in reported:
                    reported.add(key)
                    log.warning("data domain %r: skipping %s; further ones are only counted", domain.name, bad)
        raise DataError(
            f"data domain {domain.name!r}: {MAX_CONSECUTIVE_SKIPS} samples or shard reads in a row were unusable "
            f"(skipped since the last batch: {dict(skipped)}); check its shards: {domain.urls[:3]}"
        )


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: fill a buffer of ``size``, then emit a random element per element read."""
    if size <= 0:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def make_loader(stream: MixedStream, num_workers: int, pin_memory: bool, prefetch_factor: int = 2) -> torch.utils.data.DataLoader:
    """A DataLoader over already-batched stream output (``batch_size=None``): ``num_workers`` processes
    each running their own consumer, ``prefetch_factor`` batches ahead per worker, pinned host
    memory for fast, asynchronous copies to a GPU."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
