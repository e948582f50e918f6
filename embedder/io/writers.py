"""Stage files and exports: Parquet through pyarrow, JSONL, every write atomic."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.io.atomic import atomic_open, atomic_path, file_digest
from embedder.schemas import Chunk, StageRef


def dumps(obj: Any) -> str:
    """Deterministic compact JSON (sorted keys), so identical inputs give byte-identical files."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def write_jsonl(path: Path, records: Iterable[Any]) -> StageRef:
    """Write JSON lines atomically; pydantic models are dumped in JSON mode."""
    count = 0
    with atomic_open(path, "w") as fh:
        for record in records:
            if hasattr(record, "model_dump"):
                record = record.model_dump(mode="json")
            fh.write(dumps(record) + "\n")
            count += 1
    return StageRef(path=str(path), digest=file_digest(path), items=count)


def read_jsonl_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file this package wrote."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


_CHUNK_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("metadata", pa.string())])


class ChunkTableWriter:
    """Streams chunks into a Parquet file in row groups, then renames it into place."""

    def __init__(self, path: Path, rows_per_group: int = 4096) -> None:
        self.path = path
        self.rows_per_group = rows_per_group
        self.count = 0
        self._buffer: list[Chunk] = []
        self._ctx = atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, _CHUNK_SCHEMA)

    def add(self, chunk: Chunk) -> None:
        """Buffer one chunk, flushing a row group when full."""
        self._buffer.append(chunk)
        if len(self._buffer) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.table(
            {
                "id": [c.id for c in self._buffer],
                "text": [c.text for c in self._buffer],
                "metadata": [dumps(c.metadata) for c in self._buffer],
            },
            schema=_CHUNK_SCHEMA,
        )
        self._writer.write_table(table)
        self.count += len(self._buffer)
        self._buffer.clear()

    def close(self) -> StageRef:
        """Finish the file atomically and return its reference."""
        self._flush()
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        return StageRef(path=str(self.path), digest=file_digest(self.path), items=self.count)

    def abort(self) -> None:
        """Drop the partial file (the previous one, if any, stays)."""
        self._writer.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def read_chunks(path: str | Path) -> list[Chunk]:
    """Read the chunk table written by :class:`ChunkTableWriter`."""
    table = pq.read_table(path)
    return [
        Chunk(id=i, text=t, metadata=json.loads(m))
        for i, t, m in zip(table["id"].to_pylist(), table["text"].to_pylist(), table["metadata"].to_pylist())
    ]


def write_dense_parquet(path: Path, ids: list[str], vectors: np.ndarray, model: str) -> StageRef:
    """Write ``dense.parquet`` (id, vector, model) with fixed-size float32 lists."""
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"vectors shape {vectors.shape} does not match {len(ids)} ids")
    dim = int(vectors.shape[1])
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "id": pa.array(ids, type=pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            "model": pa.array([model] * len(ids), type=pa.string()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return StageRef(path=str(path), digest=file_digest(path), items=len(ids))


def read_dense_parquet(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read ids and a float32 matrix back from ``dense.parquet``."""
    table = pq.read_table(path)
    ids = table["id"].to_pylist()
    col = table["vector"].combine_chunks()
    dim = col.type.list_size
    vectors = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return ids, vectors
