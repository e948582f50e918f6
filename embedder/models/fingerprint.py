"""Model fingerprints from content: a digest of a model directory's files, memoised on (path, size, mtime).

A cache keyed by a model's path serves stale vectors when new weights land in
the same directory; keyed by this digest it cannot.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_MEMO: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()
# Hub caches and editors leave these beside the weights; they never change the model.
_IGNORED_PARTS = {".git", ".cache", "__pycache__", ".locks"}


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    with _LOCK:
        _MEMO[key] = digest
    return digest


def model_fingerprint(location: str | os.PathLike[str]) -> str:
    """sha256 over every file of a model directory (relative path and content), or of one file.

    Args:
        location: A model directory (or a single model file).

    Returns:
        A hex digest; the same bytes give the same digest wherever the directory lives.

    Raises:
        FileNotFoundError: The location does not exist.
    """
    root = Path(location)
    if root.is_file():
        return _file_digest(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no model files at {root}")
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or _IGNORED_PARTS & set(rel.parts):
            continue
        h.update(rel.as_posix().encode())
        h.update(b"\0")
        h.update(_file_digest(path).encode())
    return h.hexdigest()
