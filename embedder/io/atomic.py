"""Atomic file writes (a temp file in the same directory, fsync, then rename) and a hole-keeping copy."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
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


_SPARSE_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(_SPARSE_BLOCK)


def copy_sparse(src: str | Path, dst: str | Path) -> str:
    """Copy a file keeping its holes, and turning runs of zero bytes into holes (``cp --sparse=always``).

    Qdrant Edge sizes its mmap files generously (32 MiB for the first chunk of
    vectors of a 50-point shard) and writes only what it uses, so on disk a
    shard is a fraction of its apparent size. ``shutil.copy2`` writes every
    byte: copying a 0.25 MB shard to update it took 100 MB. Holes are found
    with ``SEEK_DATA``/``SEEK_HOLE`` where the filesystem has them, and zero
    blocks are skipped either way. Metadata is copied as ``shutil.copy2`` does.

    Returns:
        ``dst``, as a ``shutil.copytree`` copy function returns it.
    """
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fd = fin.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                end = os.lseek(fd, start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole is left
                    break
                start, end = pos, size  # the filesystem cannot say where its holes are: read it all
            fin.seek(start)
            while start < end:
                block = fin.read(min(_SPARSE_BLOCK, end - start))
                if not block:
                    break
                if block != _ZERO_BLOCK[:len(block)]:
                    fout.seek(start)
                    fout.write(block)
                start += len(block)
            pos = end
        fout.truncate(size)  # the trailing hole, and the file's full length
    shutil.copystat(src, dst)
    return str(dst)
