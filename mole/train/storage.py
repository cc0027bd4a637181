"""Writes the storage refuses (a full disk, a quota, an I/O error): recognising them, saying what they
are in one line (the cause, the path, the free space), and making every rank agree that a collective
save failed.

torch.save's zip writer reports a write cut short by a full disk as a ``RuntimeError`` with no errno
(``unexpected pos 316800 vs 316688``), safetensors as an I/O error naming ``os error 28``; Python's own
writes raise ``OSError(ENOSPC)``. All of them are taken here for what they are.
"""

from __future__ import annotations

import errno
import os
import re
import shutil

import torch.distributed as dist

_SHORT_WRITE = re.compile(r"unexpected pos \d+ vs \d+|file write failed|I/O error|os error \d+")
DISK_FULL_BELOW = 64 << 20
"""With this little free space left, a write that failed without an errno (torch.save's zip writer) is
taken for a full disk."""


def write_failed(err: BaseException) -> bool:
    """Whether ``err`` is a write that the storage refused: an ``OSError`` (in ``err`` or what caused it),
    torch.save's zip writer cut short (a ``RuntimeError`` with no errno: ``unexpected pos``), or
    safetensors' I/O error."""
    return _errno(err) is not None or any(isinstance(e, OSError) for e in _chain(err)) or bool(
        _SHORT_WRITE.search(str(err)))


def failure_on_any_rank(failure: BaseException | None, what: str, path: str) -> str | None:
    """Every rank calls this (one collective) after its part of a save to ``path``, ``failure`` its own
    failed write if any: the first failing rank's :func:`describe_write_failure`, the same on every rank,
    or ``None`` when every rank's writes succeeded. Every rank then fails, or none, so no rank goes on
    to a collective the others never reach."""
    message = None if failure is None else describe_write_failure(failure, what, path)
    if not dist.is_initialized():
        return message
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    return f"{failed[0][1]} (on rank {failed[0][0]})" if failed else None


def describe_write_failure(err: BaseException, what: str, path: str) -> str:
    """``err``, a failed write under ``path``, in one line: the cause (``no space left on device
    (ENOSPC)`` for a full disk), the path and the free space on its filesystem."""
    code, free = _errno(err), _free_space(path)
    if code == errno.EDQUOT:
        cause = "disk quota exceeded (EDQUOT)"
    elif code == errno.ENOSPC or (code is None and free is not None and free < DISK_FULL_BELOW):
        cause = "no space left on device (ENOSPC)"
    elif code is not None:
        cause = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    else:
        cause = "a write failed"
    room = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
    return f"{what} {path} failed: {cause}; {room} free on its filesystem ({type(err).__name__}: {err})"


def _chain(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _errno(err: BaseException) -> int | None:
    for cause in _chain(err):
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause.errno
        if match := re.search(r"os error (\d+)", str(cause)):  # safetensors reports the errno in its message
            return int(match.group(1))
    return None


def _free_space(path: str) -> int | None:
    """Bytes free for writing on the filesystem of ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
