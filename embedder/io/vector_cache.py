"""Per-chunk vector reuse: a columnar store of vectors keyed by the digest of what produced them.

One directory per *vector space* (a model fingerprint plus the settings and code
that decide its output); inside, Parquet parts of ``(digest, vector)`` rows,
appended by each run and compacted when they pile up. A re-run embeds only
texts whose digest is not there yet. Never a file per chunk, never pickle.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedder.io.atomic import atomic_path
from embedder.schemas import SparseVector

_MAX_PARTS = 16
V = TypeVar("V")


def text_digest(text: str) -> str:
    """sha256 of a text's UTF-8 bytes: the reuse key of its vector within a space."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _VectorParts(Generic[V]):
    """Parquet parts of ``(digest, vector)`` rows under ``root``; subclasses map rows to and from columns."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _to_columns(self, digests: list[str], rows: dict[str, V]) -> dict[str, pa.Array]:
        raise NotImplementedError

    def _from_table(self, table: pa.Table) -> dict[str, V]:
        raise NotImplementedError

    def _parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet")) if self.root.is_dir() else []

    def lookup(self, digests: Iterable[str]) -> dict[str, V]:
        """The stored vector of every digest that has one."""
        wanted = pa.array(sorted(set(digests)), type=pa.string())
        found: dict[str, V] = {}
        if len(wanted) == 0:
            return found
        for _attempt in range(3):
            try:
                for part in self._parts():
                    table = pq.read_table(part)
                    table = table.filter(pc.is_in(table["digest"], value_set=wanted))
                    if table.num_rows:
                        found.update(self._from_table(table))
                return found
            except FileNotFoundError:  # a concurrent compaction replaced the parts: list them again
                found.clear()
        raise FileNotFoundError(f"the vector cache at {self.root} kept changing while it was read")

    def append(self, rows: dict[str, V]) -> None:
        """Add vectors (one part file, written atomically)."""
        if not rows:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        digests = list(rows)
        table = pa.table({"digest": pa.array(digests, type=pa.string()), **self._to_columns(digests, rows)})
        with atomic_path(self.root / f"part-{uuid.uuid4().hex}.parquet") as tmp:
            pq.write_table(table, tmp)

    def compact(self, keep: set[str]) -> int:
        """Merge the parts into one holding only ``keep`` (the current chunks) once there are many.

        Returns how many parts were merged (0 when no compaction was due). The merged
        part is written before the old ones go, so a concurrent reader never misses
        a vector it could have had (at worst it lists the parts again).
        """
        parts = self._parts()
        if len(parts) <= _MAX_PARTS:
            return 0
        self.append(self.lookup(keep))
        for part in parts:
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
        return len(parts)


class DenseVectorCache(_VectorParts[np.ndarray]):
    """Dense vectors of one vector space (float32, fixed size per space)."""

    def _to_columns(self, digests: list[str], rows: dict[str, np.ndarray]) -> dict[str, pa.Array]:
        vectors = np.ascontiguousarray(np.stack([rows[d] for d in digests]), dtype=np.float32)
        return {"vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()),
                                                            int(vectors.shape[1]))}

    def _from_table(self, table: pa.Table) -> dict[str, np.ndarray]:
        col = table["vector"].combine_chunks()
        vecs = col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, col.type.list_size)
        return dict(zip(table["digest"].to_pylist(), vecs))


class SparseVectorCache(_VectorParts[SparseVector]):
    """Live sparse vectors of one vector space (fallback vectors are never stored: cheap to redo)."""

    def _to_columns(self, digests: list[str], rows: dict[str, SparseVector]) -> dict[str, pa.Array]:
        return {"indices": pa.array([list(rows[d].indices) for d in digests], type=pa.list_(pa.int64())),
                "values": pa.array([list(rows[d].values) for d in digests], type=pa.list_(pa.float32()))}

    def _from_table(self, table: pa.Table) -> dict[str, SparseVector]:
        return {d: SparseVector(indices=idx, values=val) for d, idx, val in zip(
            table["digest"].to_pylist(), table["indices"].to_pylist(), table["values"].to_pylist())}
