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

import os
import shutil
import uuid
from pathlib import Path

RUNS = "runs"
CURRENT = "current"
SET_FILES = ("dense.parquet", "sparse.jsonl", "qdrant.jsonl", "rerank.jsonl", "rejects.jsonl",
             "processing_summary.json", "index.json")
_KEEP = 2  # the published set and the one before it, for readers that opened it just before a switch
_KEEP_FAILED = 3  # the newest unpublished sets: failed runs to inspect, or a concurrent run still writing


def run_dir(output_dir: str | Path, collection: str, run_id: str) -> Path:
    """``<output_dir>/<collection>/runs/<run_id>``, created if missing."""
    path = Path(output_dir) / collection / RUNS / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


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
        if not (link.is_symlink() and os.readlink(link) == f"{CURRENT}/{name}"):
            # Also replaces a plain file an earlier version wrote there.
            _replace_symlink(link, f"{CURRENT}/{name}")
    collect_runs(output_dir, collection)
    return previous


def collect_runs(output_dir: str | Path, collection: str, *, keep: int = _KEEP) -> list[str]:
    """Delete replaced run sets beyond the newest ``keep``, and unpublished sets beyond the newest three.

    A set counts as published once it holds a ``.published`` marker, written when
    it is switched in. Unpublished sets are failed runs (their summary says why)
    or runs still writing.
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
    unpublished = sorted((p for p in sets if not (p / ".published").exists()), key=lambda p: p.stat().st_mtime)
    removed = []
    for old in published[:-keep] + unpublished[:-_KEEP_FAILED]:
        if cur is not None and old.resolve() == cur:
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old.name)
    return removed
