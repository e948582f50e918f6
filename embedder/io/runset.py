"""Run sets: a run's exports, summary and index manifest in one directory, published by one atomic switch.

Per collection::

    <output_dir>/<collection>/runs/<run-id>/   dense.parquet, sparse.jsonl, qdrant.jsonl, rerank.jsonl,
                                              rejects.jsonl, processing_summary.json, index.json
    <output_dir>/<collection>/current  ->  runs/<run-id>          (a symlink, replaced atomically)
    <output_dir>/<collection>/<export> ->  current/<export>       (stable names for users and scripts)

A run writes its set into a fresh directory and publishes it by replacing the
``current`` symlink, so a reader never sees a summary of one run beside the
exports (or the index) of another, and a run that fails publishes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from embedder.io.atomic import atomic_write_text
from embedder.procs import owner, owner_dead

RUNS = "runs"
CURRENT = "current"
SET_FILES = ("chunks.parquet", "dense.parquet", "sparse.jsonl", "qdrant.jsonl", "rerank.jsonl", "rejects.jsonl",
             "processing_summary.json", "index.json", "exports_summary.json")
# In a failed run's set: the summary of the run whose exports and index it carries (what search reads).
EXPORTS_SUMMARY = "exports_summary.json"
RUN_INFO = "run.json"  # who wrote the set and when it started
ACTIVE = ".active"  # present while the run that owns the set is still writing it
_KEEP = 2  # the published set and the one before it, for readers that opened it just before a switch
_KEEP_FAILED = 3  # the newest unpublished sets: failed runs to inspect, or a concurrent run still writing


def run_dir(output_dir: str | Path, collection: str, run_id: str) -> Path:
    """``<output_dir>/<collection>/runs/<run_id>``, created if missing."""
    path = Path(output_dir) / collection / RUNS / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_run(output_dir: str | Path, collection: str, name: str) -> Path:
    """Create a run set owned by this process, marked active until :func:`close_run`."""
    path = run_dir(output_dir, collection, name)
    atomic_write_text(path / RUN_INFO, json.dumps({**owner(), "started_at": time.time()}))
    (path / ACTIVE).touch()
    return path


def close_run(run_path: str | Path) -> None:
    """The owning run has finished with the set (published or not)."""
    Path(run_path, ACTIVE).unlink(missing_ok=True)


def _run_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads((path / RUN_INFO).read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _live(path: Path) -> bool:
    """Whether a run still writes this set: it is active and its owner is not provably dead."""
    return (path / ACTIVE).exists() and not owner_dead(_run_info(path))


def _started(path: Path) -> float:
    info = _run_info(path)
    try:
        return float(info["started_at"])
    except (KeyError, TypeError, ValueError):
        return path.stat().st_mtime


def retention_cutoff(output_dir: str | Path, collection: str) -> float:
    """The start of the oldest run whose stage results must stay reusable.

    That is the oldest retained published set (a re-run of its input must stay
    cheap) or a run still writing (it may be about to read what it looked up).
    """
    runs = Path(output_dir) / collection / RUNS
    starts = [time.time()]
    for path in runs.iterdir() if runs.is_dir() else []:
        if path.is_dir() and ((path / ".published").exists() or _live(path)):
            try:
                starts.append(_started(path))
            except FileNotFoundError:  # pruned meanwhile
                continue
    return min(starts)


def current_run(output_dir: str | Path, collection: str) -> Path | None:
    """The published run set's directory, or None."""
    link = Path(output_dir) / collection / CURRENT
    try:
        target = os.readlink(link)
    except (FileNotFoundError, OSError):
        return None
    path = (link.parent / target).resolve()
    return path if path.is_dir() else None


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.parent / f".{link.name}.{uuid.uuid4().hex}.tmp"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)  # atomic: readers see the old target or the new one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_run(output_dir: str | Path, collection: str, run_path: Path) -> Path | None:
    """Make ``run_path`` the collection's published set; return the previously published one.

    Raises:
        ValueError: ``run_path`` is not a run set of this collection.
    """
    cdir = Path(output_dir) / collection
    if run_path.parent.resolve() != (cdir / RUNS).resolve():
        raise ValueError(f"{run_path} is not a run set of {cdir}")
    previous = current_run(output_dir, collection)
    _replace_symlink(cdir / CURRENT, f"{RUNS}/{run_path.name}")
    for name in SET_FILES:
        link = cdir / name
        if not (run_path / name).exists():
            # A stage that did not run this time (rerank without queries): no stable name,
            # rather than a dangling link or a file an earlier run or version left there.
            if link.is_symlink() or link.is_file():
                link.unlink(missing_ok=True)
        elif not (link.is_symlink() and os.readlink(link) == f"{CURRENT}/{name}"):
            # Also replaces a plain file an earlier version wrote there.
            _replace_symlink(link, f"{CURRENT}/{name}")
    collect_runs(output_dir, collection)
    return previous


def collect_runs(output_dir: str | Path, collection: str, *, keep: int = _KEEP) -> list[str]:
    """Delete replaced run sets beyond the newest ``keep``, and unpublished sets beyond the newest three.

    A set counts as published once it holds a ``.published`` marker, written when
    it is switched in. Unpublished sets are failed runs (their summary says why)
    or runs still writing; a set whose run is still writing is never removed.
    """
    cdir = Path(output_dir) / collection
    cur = current_run(output_dir, collection)
    if cur is not None:
        (cur / ".published").touch()
    runs = cdir / RUNS
    sets = [p for p in runs.iterdir() if p.is_dir()] if runs.is_dir() else []
    published = sorted((p for p in sets if (p / ".published").exists()),
                       key=lambda p: (p / ".published").stat().st_mtime)
    # Unpublished sets are failed runs (kept for inspection) or runs still writing: the newest stay.
    unpublished = sorted((p for p in sets if not (p / ".published").exists() and not _live(p)),
                         key=lambda p: p.stat().st_mtime)
    removed = []
    for old in published[:-keep] + unpublished[:-_KEEP_FAILED]:
        if cur is not None and old.resolve() == cur:
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old.name)
    return removed
