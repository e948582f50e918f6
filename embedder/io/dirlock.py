"""The one-writer rule on the output dir itself: an exclusive lock file per collection.

The Prefect lease (``tasks.lease.collection_lease``) queues runs that share a
Prefect server. Runs that do not (two ``PREFECT_HOME``s with their own
temporary servers, a cron job beside a deployment) never see each other's
leases; they meet here, on ``<output_dir>/<collection>/.writer.lock``, an
``flock`` the kernel drops when the holder exits, however it exits. Linux NFS
clients map ``flock`` to NFS byte-range locks, so hosts sharing a mount queue too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from embedder.cancel import raise_if_stopped
from embedder.errors import StageError
from embedder.procs import owner

LOCK_NAME = ".writer.lock"
_POLL_S = 0.5


@contextlib.contextmanager
def hold_collection(output_dir: str | Path, collection: str, *, timeout_s: float) -> Iterator[float]:
    """Hold the collection of an output dir for writing; yield the seconds spent waiting for it.

    Raises:
        StageError: The output dir cannot be written (naming the fix), or another
            writer held the collection for ``timeout_s``.
        RunCancelledError: A stop was requested while waiting.
    """
    path = Path(output_dir) / collection / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StageError(f"cannot write to {path.parent} ({exc.strerror}); a run needs write access to its "
                             "output dir: mount it read-write, fix its permissions, or pass another --output-dir"
                             ) from None
        raise
    t0 = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - t0
                if waited >= timeout_s:
                    raise StageError(f"collection {collection!r} of {output_dir} is being written by another run "
                                     f"({_holder(path)}) and stayed so for {waited:.0f} s") from None
                raise_if_stopped()
                time.sleep(_POLL_S)
        waited = time.monotonic() - t0
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**owner(), "since": time.time()}).encode(), 0)
        yield waited
    finally:
        os.close(fd)  # closing the last descriptor drops the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}" if info else "holder unknown"
