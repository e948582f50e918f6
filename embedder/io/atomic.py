"""Atomic file writes: a temp file in the same directory, fsync, then rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path, tag: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path``.

    Readers see either the old file or the new one, never a half-written file,
    because ``os.replace`` is atomic within one filesystem. ``tag`` goes into the
    temp name (``.<name>.<tag>.<random>.tmp``), e.g. to say who writes it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{tag}." if tag else f".{path.name}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); a kept file gets the mode any new file would (a search
    # service running as another user, on a shared read-only mount, must be able to read it).
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file for writing that replaces ``path`` atomically on close."""
    with atomic_path(path) as tmp:
        text = "b" not in mode
        with open(tmp, mode, encoding="utf-8" if text else None, newline="\n" if text else None) as fh:
            yield fh


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return path


def file_digest(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
