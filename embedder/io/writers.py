"""Stage files and exports: Parquet through pyarrow, JSONL, every write atomic."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.io.atomic import atomic_open, atomic_path, file_digest
from embedder.schemas import Chunk, StageRef


def dumps(obj: Any) -> str:
    """Deterministic compact JSON (sorted keys), so identical inputs give byte-identical files."""
    return _dumps_bytes(obj).decode("utf-8")


def _dumps_bytes(obj: Any) -> bytes:
    # orjson writes the same bytes as json.dumps(sort_keys, ensure_ascii=False, compact) for what
    # we export (shortest round-trip floats, UTF-8 text) at ~10x the speed: the vector files
    # are mostly floats. It refuses what json would write anyway (ints past 64 bits, non-str
    # keys), and writes non-finite floats as null where json writes invalid NaN literals.
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")


# 19+ digits may be an integer past 64 bits, which orjson reads as a float without a word.
_LONG_DIGITS = re.compile(r"\d{19}")
_LONG_DIGITS_BYTES = re.compile(rb"\d{19}")


def _loads(text: str | bytes) -> Any:
    """One JSON document this package wrote: orjson's speed, json's exactness where they differ."""
    # orjson reads what _dumps_bytes wrote at a few times json's speed; json reads what orjson
    # would change (long integers) or refuses.
    if _LONG_DIGITS_BYTES.search(text) if isinstance(text, bytes) else _LONG_DIGITS.search(text):
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def write_jsonl(path: Path, records: Iterable[Any]) -> StageRef:
    """Write JSON lines atomically; pydantic models are dumped in JSON mode."""
    count = 0
    with atomic_open(path, "wb") as fh:
        for record in records:
            if hasattr(record, "model_dump"):
                record = record.model_dump(mode="json")
            fh.write(_dumps_bytes(record) + b"\n")
            count += 1
    return StageRef(path=str(path), digest=file_digest(path), items=count)


def read_jsonl_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file this package wrote (small files; stream big ones with :func:`iter_jsonl_records`)."""
    return list(iter_jsonl_records(path))


def iter_jsonl_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file this package wrote, one at a time."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield _loads(line)


def iter_jsonl_windows(path: str | Path, size: int) -> Iterator[list[dict[str, Any]]]:
    """The records of a JSONL file in lists of ``size`` (the last may be shorter)."""
    window: list[dict[str, Any]] = []
    for record in iter_jsonl_records(path):
        window.append(record)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


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
    """Read the whole chunk table written by :class:`ChunkTableWriter` (stages stream it with
    :func:`iter_chunk_windows` instead)."""
    return [c for window in iter_chunk_windows(path, 65_536) for c in window]


def iter_table_windows(path: str | Path, size: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """A Parquet file in tables of exactly ``size`` rows (the last may be shorter), read a batch at a time.

    Parquet batches end at row-group boundaries; re-slicing them to a fixed size
    lets stages walk several files in lockstep (chunks, dense vectors, sparse vectors).
    """
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=size, columns=columns):
        pending.append(batch)
        held += batch.num_rows
        while held >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending = rest.to_batches()
            held = rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def iter_chunk_windows(path: str | Path, size: int) -> Iterator[list[Chunk]]:
    """The chunk table in windows of ``size`` chunks, in table order."""
    for table in iter_table_windows(path, size):
        yield [Chunk.model_construct(id=i, text=t, metadata=_loads(m)) for i, t, m in zip(
            table["id"].to_pylist(), table["text"].to_pylist(), table["metadata"].to_pylist())]


def iter_chunk_texts(path: str | Path, size: int) -> Iterator[list[str]]:
    """Only the texts of the chunk table, in windows of ``size``."""
    for table in iter_table_windows(path, size, columns=["text"]):
        yield table["text"].to_pylist()


def chunk_count(path: str | Path) -> int:
    """Rows in a Parquet file, from its footer."""
    return int(pq.ParquetFile(path).metadata.num_rows)


def write_dense_parquet(path: Path, ids: list[str], vectors: np.ndarray, model: str) -> StageRef:
    """Write ``dense.parquet`` (id, vector, model) with fixed-size float32 lists."""
    table = _dense_table(ids, vectors, model)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return StageRef(path=str(path), digest=file_digest(path), items=len(ids))


def _dense_table(ids: list[str], vectors: np.ndarray, model: str) -> pa.Table:
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"vectors shape {vectors.shape} does not match {len(ids)} ids")
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.table({"id": pa.array(ids, type=pa.string()),
                     "vector": pa.FixedSizeListArray.from_arrays(flat, int(vectors.shape[1])),
                     "model": pa.array([model] * len(ids), type=pa.string())})


def vectors_of(table: pa.Table, column: str = "vector") -> np.ndarray:
    """A fixed-size-list float column as a float32 matrix."""
    col = table[column].combine_chunks()
    dim = col.type.list_size
    matrix: np.ndarray = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return matrix.reshape(-1, dim)


class DenseParquetWriter:
    """Streams ``dense.parquet`` a window at a time; the file appears atomically on :meth:`close`."""

    def __init__(self, path: Path, model: str) -> None:
        self.path = path
        self.model = model
        self.count = 0
        self.dim: int | None = None
        self._ctx = atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self._writer: pq.ParquetWriter | None = None

    def write(self, ids: list[str], vectors: np.ndarray) -> None:
        """Append rows (one row group per call)."""
        if not ids:
            return
        table = _dense_table(ids, vectors, self.model)
        if self._writer is None:
            self.dim = int(vectors.shape[1])
            self._writer = pq.ParquetWriter(self._tmp, table.schema)
        self._writer.write_table(table)
        self.count += len(ids)

    def close(self, dim: int = 0) -> StageRef:
        """Finish the file (an empty one when nothing was written) and return its reference."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, _dense_table([], np.zeros((0, max(dim, 1)), np.float32),
                                                                    self.model).schema)
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        return StageRef(path=str(self.path), digest=file_digest(self.path), items=self.count)

    def abort(self) -> None:
        """Drop the partial file."""
        if self._writer is not None:
            self._writer.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def read_dense_parquet(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read ids and a float32 matrix back from ``dense.parquet`` (stages stream it with :func:`iter_dense_windows`)."""
    table = pq.read_table(path)
    return table["id"].to_pylist(), vectors_of(table)


def iter_dense_windows(path: str | Path, size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """``dense.parquet`` in windows of ``size`` rows: ids and their float32 matrix."""
    for table in iter_table_windows(path, size, columns=["id", "vector"]):
        yield table["id"].to_pylist(), vectors_of(table)
