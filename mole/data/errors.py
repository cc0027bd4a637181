"""Why a sample was skipped: one exception type whose reason becomes a counter name."""

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
