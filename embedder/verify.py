"""A full scrub of what an output dir keeps: every file checked, whatever a run would otherwise trust.

A run checks what it is about to use, quickly (sizes, a sample of blocks, the
footers of the vector-store parts it opens). ``embed-collections verify`` reads
everything in full:

- each sealed stage directory (``.stages/<stage>/<key>/``) against its checksums;
- each vector-store part (``.stages/vectors/<space>/part-*.parquet``): every
  page checksum, every row group, every vector's values;
- the published Edge shard against the checksums it was sealed with;
- the published run set (exports, summary, index manifest) against its checksums.

Repairing means what a run does: set damaged stage directories and parts aside
under ``.stages/quarantine/``, then run the collection again (see
``embed-collections verify --repair``), which recomputes them, rebuilds a
damaged index from the stored vectors and publishes a sound run set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from embedder.io.integrity import QUARANTINE, Depth, check_dir, quarantine
from embedder.io.runset import current_run
from embedder.io.vector_cache import scrub_part
from embedder.stages.common import seal_damage

Kind = Literal["stage directory", "vector part", "index", "run set"]
_STAGES = ("load", "dense", "sparse", "fuse", "rerank")


@dataclass(frozen=True)
class Finding:
    """One damaged thing an output dir keeps."""

    kind: Kind
    path: str
    reason: str


@dataclass
class CollectionReport:
    """What a scrub of one collection checked and found."""

    collection: str
    checked: dict[str, int] = field(default_factory=dict)
    damaged: list[Finding] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (``verify --json``)."""
        return {"collection": self.collection, "checked": self.checked,
                "damaged": [{"kind": f.kind, "path": f.path, "reason": f.reason} for f in self.damaged]}


def collections_in(output_dir: str | Path) -> list[str]:
    """The collections an output dir holds (a stage store or a published run set)."""
    root = Path(output_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and ((p / ".stages").is_dir() or (p / "runs").is_dir())
                  ) if root.is_dir() else []


def verify_collection(output_dir: str | Path, collection: str, depth: Depth = "full") -> CollectionReport:
    """Check everything a collection keeps under ``output_dir``; nothing is changed."""
    from embedder.io.edge_store import EdgeStore

    cdir = Path(output_dir) / collection
    report = CollectionReport(collection)
    stages = cdir / ".stages"
    n = 0
    for stage in _STAGES:
        for path in sorted((stages / stage).iterdir()) if (stages / stage).is_dir() else []:
            if not (path / "result.json").exists() and not (path / "checksums.json").exists():
                continue  # never sealed (a crashed run's leftovers): nothing trusts it
            n += 1
            if (problem := seal_damage(path, depth, require_checksums=False)) is not None:
                report.damaged.append(Finding("stage directory", str(path), problem))
    report.checked["stage directories"] = n
    parts = sorted((stages / "vectors").glob("*/part-*.parquet"))
    for part in parts:
        try:
            problem = scrub_part(part)
        except FileNotFoundError:
            continue  # compacted meanwhile
        if problem is not None:
            report.damaged.append(Finding("vector part", str(part), problem))
    report.checked["vector parts"] = len(parts)
    current = current_run(output_dir, collection)
    manifest_path = (current / "index.json") if current is not None else None
    backend = None
    if manifest_path is not None and manifest_path.is_file():
        try:
            backend = json.loads(manifest_path.read_bytes()).get("backend", "edge")
        except (OSError, ValueError) as exc:
            report.damaged.append(Finding("index", str(manifest_path), f"the index manifest is unreadable: {exc}"))
    if backend == "edge":
        shard = EdgeStore(output_dir).verify(collection, depth)
        report.checked["index files"] = shard.files_checked if shard is not None else 0
        for d in shard.damaged if shard is not None else []:
            report.damaged.append(Finding("index", d.file, d.reason))
    if current is not None:
        sealed = check_dir(current, depth)
        report.checked["run set files"] = sealed.files_checked if sealed is not None else 0
        for d in sealed.damaged if sealed is not None else []:
            report.damaged.append(Finding("run set", d.file, d.reason))
    return report


def set_aside(output_dir: str | Path, report: CollectionReport) -> list[str]:
    """Quarantine the damaged stage directories and vector parts a scrub found; return where each went.

    The index and the run set are not moved: readers may hold them open, and the
    next run replaces them (it checks the index itself and publishes a new set).
    """
    stages = Path(output_dir) / report.collection / ".stages"
    moved = []
    for f in report.damaged:
        path = Path(f.path)
        if f.kind == "stage directory":
            dest = stages / QUARANTINE / path.parent.name
        elif f.kind == "vector part":
            dest = stages / QUARANTINE / "vectors" / path.parent.name
        else:
            continue
        if path.exists():
            moved.append(str(quarantine(path, dest, f"{f.kind} failed verify: {f.reason}")))
    return moved
