"""Shard patterns -> URLs -> raw samples, reading only what we decode and never failing on bad bytes.

``read_shard`` is our own small tar reader (Python's ``tarfile`` in stream mode, over webdataset's
``gopen`` so ``pipe:`` and other URLs work). It replaces webdataset's ``tarfile_to_samples`` because
of what that does with bad shards (checked with webdataset 1.0.2 on Python 3.11):

- a tar cut inside a member's data calls the error handler twice for the one error, and the torn
  sample it was building is still yielded (e.g. a ``json`` whose image never arrived);
- a tar cut at (or inside) a header, or with garbage where a header should be, raises nothing at all:
  ``tarfile`` takes it for the end of the archive, and the torn last sample is yielded silently;
- a sample is grouped across shard boundaries when two shards end/start with the same key;
- every member is read into memory, whatever its size or type (``.pyd``, ``.pth``, videos).

Here each shard is read on its own; only ``json`` and image members are read (anything else, pickles
included, is skipped over unread); a member above ``MAX_MEMBER_BYTES`` is not read; a shard that
does not end with tar's end-of-archive marker is ``corrupt_tar`` and its last sample is dropped; and
every problem comes out of the iterator as a :class:`BadSample` *value* for the caller to count, once
per event.
"""

from __future__ import annotations

import glob
import logging
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator

import webdataset as wds
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from mole.data.errors import BadSample
from mole.data.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

SAMPLE_MEMBERS = frozenset(("json", *IMAGE_EXTENSIONS))
MAX_MEMBER_BYTES = 64 << 20  # a single JSON or image beyond this is not training data
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)  # what bad bytes raise


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(name: str, shards: str | list[str], *, strict: bool = False) -> list[str]:
    """Shard URLs of a domain: brace patterns expanded, local globs (``*``, ``?``, ``[]``) matched.

    A local pattern that matches no file is an error naming the domain and the pattern; a brace
    pattern that matches only some files warns about the missing ones, or with ``strict`` is an
    error naming them (evaluation: a score over part of a test set would pass for one over all of
    it). URLs pass through unchecked.
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for pattern in patterns:
        expanded = [url for part in wds.shardlists.expand_urls(pattern) for url in _glob(part)]
        local = [url for url in expanded if is_local(url)]
        missing = [url for url in local if not os.path.isfile(url)]
        if not expanded or (local and len(missing) == len(local)):
            raise FileNotFoundError(f"data domain {name!r}: shard pattern {pattern!r} matches no file")
        if strict and missing:
            raise FileNotFoundError(f"data domain {name!r}: shard pattern {pattern!r}: {len(missing)} missing, "
                                    f"e.g. {', '.join(missing[:3])}")
        for url in missing:
            log.warning("data domain %r: shard %s does not exist, skipping it", name, url)
        urls += [url for url in expanded if url not in missing]
    return urls


def _glob(url: str) -> list[str]:
    return sorted(glob.glob(url)) if is_local(url) and glob.has_magic(url) else [url]


def resampled_urls(urls: list[str], seed: int) -> Iterator[str]:
    """An endless, seeded draw of shard URLs with replacement (webdataset's ``ResampledShards``).

    The seed must already tell consumers apart: webdataset's own worker seeding (from torch's worker
    info and the ``RANK`` environment) is switched off, and nothing here splits shards by node or
    worker, so every consumer draws from all shards, however few there are.
    """
    for item in wds.ResampledShards(urls, seed=seed, worker_seed=lambda: 0, deterministic=True):
        yield item["url"]


def read_shard(url: str) -> Iterator[dict | BadSample]:
    """Samples of one tar shard in order, as ``{"__key__", "__url__", "json"?, "<image ext>"?}`` dicts of
    bytes, or :class:`BadSample` values: ``unreadable_shard``, ``corrupt_tar`` (the samples before the
    damage are kept, the torn one is dropped), ``empty_shard``, ``member_too_large``,
    ``duplicate_member``."""
    try:
        stream = gopen(url)
    except (*SHARD_ERRORS, ValueError) as err:  # webdataset's pipes raise ValueError when they cannot start
        yield BadSample("unreadable_shard", f"{url}: {type(err).__name__}: {err}")
        return
    count = 0
    try:
        with stream:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Header)
            sample: dict | None = None
            for member in tar:
                key, ext = base_plus_ext(member.name) if member.isreg() else (None, None)
                if key is None:
                    continue
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        count += 1
                        yield _finish(sample)
                    sample = {"__key__": key, "__url__": url}
                ext = ext.lower()
                if ext not in SAMPLE_MEMBERS:
                    continue  # never read: pickles (.pyd/.pth/...) and anything else we do not decode
                if member.size > MAX_MEMBER_BYTES:
                    sample["__bad__"] = ("member_too_large", f"{member.name}: {member.size} bytes > {MAX_MEMBER_BYTES}")
                elif ext in sample:
                    sample["__bad__"] = ("duplicate_member", f"{member.name} appears twice")
                else:
                    sample[ext] = tar.extractfile(member).read()
            end = getattr(tar, "end_of_archive", None)
    except SHARD_ERRORS as err:
        yield BadSample("corrupt_tar", f"{url}: {type(err).__name__}: {err} (after {count} samples)")
        return
    if not isinstance(end, tarfile.EOFHeaderError):  # no zero block: cut off at a header, or garbage
        yield BadSample("corrupt_tar", f"{url}: no end-of-archive marker after {count} samples "
                                       f"({type(end).__name__}: {end}); its last, maybe torn, sample is dropped")
        return
    if sample is not None:
        count += 1
        yield _finish(sample)
    if count == 0:
        yield BadSample("empty_shard", f"{url} holds no sample")


class _Header(tarfile.TarInfo):
    """Remembers why the archive's member list ended. ``tarfile`` ends it silently on a zero block
    (the proper end) but also on a header cut off by truncation or one of garbage bytes; only the
    first is a complete shard."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:  # EOFHeaderError: zero block; Truncated/Empty/InvalidHeaderError: not
            tar.end_of_archive = err
            raise


def _finish(sample: dict) -> dict | BadSample:
    if "__bad__" in sample:
        reason, message = sample["__bad__"]
        return BadSample(reason, f"{sample['__url__']}:{sample['__key__']}: {message}")
    return sample
