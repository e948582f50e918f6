"""Checksums of kept files: recorded when a directory is sealed, checked before it is trusted.

Everything under an output dir is derived from the input, so a damaged file
(a disk error, a crash of the machine, a stray process, a restore) should cost a
recomputation, never a wrong answer. Whatever seals a directory (a stage run,
an index build) records a manifest of its files: each file's size and an xxh3
digest of every 1 MiB block. Readers check what they are about to trust:

- ``quick``: every file is present with its size, and a sample of blocks
  matches (each file's first and last block, then random blocks within a read
  budget). Cheap enough for every run and every shard a reader opens; a small
  directory is read whole.
- ``full``: every block of every file (``embed-collections verify``).

Block digests make a sample check possible at all: a whole-file digest can
only be compared after reading the whole file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import xxhash

from embedder.io.atomic import atomic_write_text

CHECKSUMS = "checksums.json"
FORMAT = 1
BLOCK = 1 << 20
# Quick checks read at most this much per directory beyond each file's first and last block.
QUICK_BUDGET = 64 << 20
QUARANTINE = "quarantine"

Depth = Literal["quick", "full"]


@dataclass(frozen=True)
class Damage:
    """One file that failed its check.

    Attributes:
        file: The file (or directory) as it lies now.
        reason: What failed, in words (missing, size, block digest).
    """

    file: str
    reason: str


@dataclass
class CheckReport:
    """What a check of one directory read and found."""

    files_checked: int = 0
    bytes_read: int = 0
    damaged: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing failed."""
        return not self.damaged


def _block_digests(path: Path) -> tuple[int, list[str]]:
    digests = []
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digests.append(xxhash.xxh3_64_hexdigest(block))
            size += len(block)
    return size, digests


def _files(root: Path, exclude: Iterable[str]) -> list[Path]:
    skip = set(exclude) | {CHECKSUMS}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in skip
                  and not p.name.startswith("."))


def manifest_of(root: str | Path, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The checksum manifest of every regular file under ``root`` (names starting with a dot are left out).

    Args:
        exclude: Paths relative to ``root`` that are not part of what is sealed
            (e.g. the seal itself, written after the manifest).
    """
    base = Path(root)
    files = {}
    for path in _files(base, exclude):
        size, blocks = _block_digests(path)
        files[path.relative_to(base).as_posix()] = {"size": size, "xxh3": blocks}
    return {"format": FORMAT, "algorithm": "xxh3_64", "block": BLOCK, "files": files,
            "sealed_at": time.time()}


def write_checksums(root: str | Path, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Record ``root``'s manifest in ``root/checksums.json`` (atomically) and return it."""
    manifest = manifest_of(root, exclude=exclude)
    atomic_write_text(Path(root) / CHECKSUMS, json.dumps(manifest, separators=(",", ":")))
    return manifest


def read_checksums(root: str | Path) -> dict[str, Any] | None:
    """The manifest a directory was sealed with; None when it has none (sealed by an earlier version).

    Raises:
        ValueError: The manifest itself is damaged (not JSON, or not a manifest).
    """
    try:
        raw = (Path(root) / CHECKSUMS).read_bytes()
    except FileNotFoundError:
        return None
    data = json.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict) or data.get("block") != BLOCK:
        raise ValueError("not a checksum manifest")
    return data


def check(root: str | Path, manifest: Mapping[str, Any], depth: Depth = "quick", *,
          budget: int = QUICK_BUDGET, rng: random.Random | None = None) -> CheckReport:
    """Check the files under ``root`` against ``manifest``.

    Files the manifest does not name are not looked at (they were not sealed).

    Args:
        depth: ``quick`` (sizes, first and last blocks, random blocks within ``budget``) or ``full``.
        rng: Where the sample's randomness comes from (tests pass a seeded one).
    """
    base = Path(root)
    report = CheckReport()
    todo: list[tuple[Path, str, int, str]] = []  # (path, name, block index, expected digest)
    rest: list[tuple[Path, str, int, str]] = []
    for name, entry in sorted(manifest["files"].items()):
        path = base / name
        report.files_checked += 1
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            report.damaged.append(Damage(str(path), "missing"))
            continue
        except PermissionError:
            raise  # not damage: this process may not read it (the caller says so)
        except OSError as exc:
            report.damaged.append(Damage(str(path), f"unreadable: {exc.strerror or exc}"))
            continue
        if size != entry["size"]:
            report.damaged.append(Damage(str(path), f"size {size} bytes, sealed with {entry['size']}"))
            continue
        blocks = list(enumerate(entry["xxh3"]))
        for i, (index, digest) in enumerate(blocks):
            item = (path, name, index, digest)
            (todo if depth == "full" or i in (0, len(blocks) - 1) else rest).append(item)
    if depth == "quick":
        (rng or random.Random()).shuffle(rest)
        todo += rest[: max(0, budget // BLOCK)]
    bad: set[str] = set()
    for path, name, index, digest in sorted(todo, key=lambda t: (t[1], t[2])):
        if name in bad:
            continue
        try:
            with open(path, "rb") as fh:
                fh.seek(index * BLOCK)
                block = fh.read(BLOCK)
        except PermissionError:
            raise
        except OSError as exc:
            report.damaged.append(Damage(str(path), f"unreadable: {exc.strerror or exc}"))
            bad.add(name)
            continue
        report.bytes_read += len(block)
        if xxhash.xxh3_64_hexdigest(block) != digest:
            report.damaged.append(Damage(str(path), f"block {index} (bytes {index * BLOCK}..) differs from "
                                                    "its checksum"))
            bad.add(name)
    return report


def check_dir(root: str | Path, depth: Depth = "quick") -> CheckReport | None:
    """Check a directory against its own ``checksums.json``; None when it was sealed without one.

    A damaged or unreadable manifest is damage too: nothing it covers can be trusted.

    Raises:
        PermissionError: This process may not read a file (not damage: the caller says so).
    """
    try:
        manifest = read_checksums(root)
    except PermissionError:
        raise  # not damage: this process may not read it (the caller says so)
    except (OSError, ValueError) as exc:
        return CheckReport(files_checked=1, damaged=[Damage(str(Path(root) / CHECKSUMS),
                                                            f"checksum manifest unreadable: {exc}")])
    return None if manifest is None else check(root, manifest, depth)


def quarantine(path: str | Path, quarantine_root: str | Path, reason: str) -> Path:
    """Move a damaged file or directory under ``quarantine_root``, with ``<name>.reason.txt`` beside it.

    It is kept, not deleted: someone may want to look at what a disk did. The
    caller's next step is to recompute what it held.
    """
    src = Path(path)
    dest_root = Path(quarantine_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / f"{src.name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
    shutil.move(str(src), str(dest))
    atomic_write_text(dest.parent / f"{dest.name}.reason.txt", reason + "\n")
    return dest


def describe(damage: Iterable[Damage], limit: int = 3) -> str:
    """One line naming the damaged files (the first few) and why."""
    items = list(damage)
    text = "; ".join(f"{Path(d.file).name}: {d.reason}" for d in items[:limit])
    return text + (f"; and {len(items) - limit} more" if len(items) > limit else "")
