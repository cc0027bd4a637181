"""Per-domain infinite webdataset streams, mixed by weight, batched with skip counts attached.

Every consumer (rank x DataLoader worker) draws its own seeded sequence: shards are *resampled*
with a seed derived from (seed, rank, worker, start step, domain), so no two consumers replay the
same sequence, a resumed run is reseeded rather than replaying what it saw, and a rank never runs
dry. That last point is what keeps ranks in lockstep: every rank runs exactly ``max_steps`` steps.

Nothing from a shard is ever unpickled: only the members we expect (``json`` and an image) are
read, with our own decoders; webdataset's ``.decode()`` is not used because its default handlers
``pickle.loads`` ``.pyd``/``.pickle`` members.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mole.data.collate import collate
from mole.data.conversation import parse_conversation, tokenize_conversation
from mole.data.errors import BadSample
from mole.data.images import IMAGE_EXTENSIONS, decode_image, image_to_pixels

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 1000  # a domain yielding nothing valid this long is broken, not unlucky


@dataclass
class Domain:
    name: str
    urls: list[str]  # expanded shard URLs
    weight: float


def expand_shards(name: str, shards: str | list[str]) -> list[str]:
    """Brace-expand a domain's shard patterns; a local pattern that matches no file is an error."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        expanded = wds.shardlists.expand_urls(pattern)
        local = [url for url in expanded if "://" not in url and not url.startswith("pipe:")]
        missing = [url for url in local if not os.path.exists(url)]
        if local and len(missing) == len(local):
            raise FileNotFoundError(f"data domain {name!r}: shard pattern {pattern!r} matches no file")
        for url in missing:
            log.warning("data domain %r: shard %s does not exist, skipping it", name, url)
        urls += [url for url in expanded if url not in missing]
    return urls


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes and Python hash randomisation."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class SampleProcessor:
    """A raw tar sample (member name -> bytes) -> one training example, or ``BadSample``."""

    def __init__(self, processor, max_length: int, image_aspect: str):
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.num_image_tokens = count_image_tokens(processor)
        self.max_length, self.image_aspect = max_length, image_aspect

    def __call__(self, raw: dict) -> dict:
        if "json" not in raw:
            raise BadSample("no_conversations", f"sample {raw.get('__key__')!r} has no .json member")
        turns, has_placeholder = parse_conversation(raw["json"])
        image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if has_placeholder and image_bytes is None:
            raise BadSample("image_missing", "<image> in the text but no image member")
        pixels = None
        if image_bytes is not None:
            pixels = image_to_pixels(decode_image(image_bytes), self.image_processor, self.image_aspect)
        ids, labels = tokenize_conversation(
            turns, pixels is not None, self.tokenizer, self.image_token_id, self.num_image_tokens, self.max_length
        )
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def count_image_tokens(processor) -> int:
    """How many tokens one image expands to, asked of the processor itself (16 tiny, 576 LLaVA-1.5)."""
    from PIL import Image

    size = processor.image_processor.crop_size
    image = Image.new("RGB", (size["width"], size["height"]))
    ids = processor(text=processor.image_token, images=image, return_tensors="pt")["input_ids"][0]
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int((ids == image_token_id).sum())


class MixedStream(IterableDataset):
    """Infinite batches drawn from weighted domains; each batch carries the skip counts since the last.

    Yields dicts from :func:`mole.data.collate.collate` plus ``skipped``: a Counter of
    ``"<domain>/<reason>"`` -> samples skipped in this consumer since its previous batch. Skip
    counters live in DataLoader worker processes, so they travel with the batches.
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
    ):
        super().__init__()
        self.domains, self.process = domains, sample_processor
        self.batch_size, self.pad_token_id = batch_size, pad_token_id
        self.seed, self.rank, self.start_step, self.shuffle_buffer = seed, rank, start_step, shuffle_buffer
        total = sum(domain.weight for domain in domains)
        self.probabilities = [domain.weight / total for domain in domains]

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        consumer = (self.seed, self.rank, worker_id, self.start_step)
        skipped: Counter = Counter()
        reported: set[str] = set()
        streams = [self._domain_samples(i, consumer, skipped) for i in range(len(self.domains))]
        mixer = random.Random(derive_seed("mix", *consumer))
        while True:
            examples = []
            while len(examples) < self.batch_size:
                index = mixer.choices(range(len(self.domains)), weights=self.probabilities)[0]
                example = self._next_valid(index, streams[index], skipped, reported)
                example["domain"] = index
                examples.append(example)
            batch = collate(examples, self.pad_token_id)
            batch["skipped"] = Counter(skipped)
            skipped.clear()
            yield batch

    def _domain_samples(self, index: int, consumer: tuple, skipped: Counter) -> Iterator[dict]:
        domain = self.domains[index]

        errors_in_a_row = [0]

        def on_tar_error(err: Exception) -> bool:
            skipped[f"{domain.name}/corrupt_tar"] += 1
            errors_in_a_row[0] += 1
            if errors_in_a_row[0] == 1:
                log.warning("data domain %r: unreadable tar data skipped (%s)", domain.name, err)
            return errors_in_a_row[0] < MAX_CONSECUTIVE_SKIPS  # False ends the stream: every shard is broken

        def reset_errors(sample: dict) -> dict:
            errors_in_a_row[0] = 0
            return sample

        seed = derive_seed("shards", *consumer, domain.name)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(domain.urls, seed=seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(handler=on_tar_error),
            wds.map(reset_errors),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 10), seed=seed),
        )
        return iter(pipeline)

    def _next_valid(self, index: int, samples: Iterator[dict], skipped: Counter, reported: set[str]) -> dict:
        domain = self.domains[index]
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            try:
                raw = next(samples)
            except StopIteration:
                raise RuntimeError(f"data domain {domain.name!r}: no readable shard among {domain.urls[:3]}...") from None
            try:
                return self.process(raw)
            except BadSample as bad:
                key = f"{domain.name}/{bad.reason}"
                skipped[key] += 1
                if key not in reported:
                    reported.add(key)
                    log.warning("data domain %r: skipping %s (%s); further ones are only counted", domain.name, raw.get("__key__"), bad)
        raise RuntimeError(
            f"data domain {domain.name!r}: {MAX_CONSECUTIVE_SKIPS} consecutive samples were unusable "
            f"(counts so far: {dict(skipped)}); check its shards"
        )


def make_loader(stream: MixedStream, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader over already-batched stream output (``batch_size=None``)."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
