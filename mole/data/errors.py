"""Why a sample was skipped: one exception type whose reason becomes a counter name.

How a bad sample travels: code that handles one sample raises :class:`BadSample`. The one
exception is the shard reader (:func:`mole.data.shards.read_shard`), a generator that must go on
past damage and so yields a ``BadSample`` *value* in place of a sample it could not read;
:class:`~mole.data.sample.SampleProcessor` raises such a value as it would its own, so every
consumer of samples (the training stream, :func:`mole.data.examples.shard_examples`) catches bad
samples in one ``except BadSample`` and counts them by ``reason``.
"""

from __future__ import annotations


class DataError(RuntimeError):
    """Data a run cannot go on with (a domain whose samples are all unusable): the run stops, naming it."""


class BadSample(Exception):
    """A sample that cannot be trained on. ``reason`` is a short stable name (``invalid_json``,
    ``broken_image``, ...) used as the skip counter's key; the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason, self.detail = reason, message
