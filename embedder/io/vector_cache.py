"""Per-chunk vector reuse: a columnar store of vectors keyed by the digest of what produced them.

One directory per *vector space* (a model fingerprint plus the settings and code
that decide its output); inside, Parquet parts of ``(digest, vector)`` rows,
appended by each run (one part per run, a row group per window) and compacted
when they pile up. A re-run embeds only texts whose digest is not there yet.
Never a file per chunk, never pickle.

Streaming stages look vectors up window by window through a :class:`CacheIndex`:
the digests of every part, sorted once in a numpy array (64 bytes per stored
vector), and the parts' row groups read on demand, so a window costs its own
rows and never a scan of the whole store.

Every part is checked as it is read: Parquet's page checksums (CRC-32 of every
page, written with each part), the footer and, for each vector read, that it is
finite (dense: of unit length, as every dense model here stores it). A part that
fails is moved to ``.stages/quarantine/vectors/<space>/`` with the reason beside
it, and its vectors count as missing: the stage embeds them again.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import DamagedStoreError, RunCancelledError
from embedder.io.atomic import atomic_path
from embedder.io.integrity import quarantine
from embedder.procs import owner, owner_dead
from embedder.schemas import SparseVector

_MAX_PARTS = 16
_DIGEST_BYTES = 64  # hex sha256
# What reading a damaged Parquet file raises: a bad footer or magic, a page checksum, a decompression error.
_READ_ERRORS = (OSError, pa.ArrowException, ValueError)
# A stored dense vector is a unit vector (every dense path normalises); a flipped bit in it is not.
_UNIT_NORM_TOLERANCE = 1e-3
# How much of a vector space a run reads in full before it reuses a stage result that stands on it:
# all of a small store, a random choice of parts beyond this (a full scrub is ``verify``'s work).
QUICK_SCRUB_BYTES = 32 * 1024 * 1024
V = TypeVar("V")


def text_digest(text: str) -> str:
    """sha256 of a text's UTF-8 bytes: the reuse key of its vector within a space."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def digest_array(digests: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Hex digests as a fixed-width numpy array (``S64``), for sorting and ``searchsorted``."""
    if isinstance(digests, pa.ChunkedArray):
        digests = digests.combine_chunks()
    arr = digests if isinstance(digests, pa.Array) else pa.array(list(digests), type=pa.string())
    if len(arr) == 0:
        return np.zeros(0, dtype=f"S{_DIGEST_BYTES}")
    try:
        fixed = arr.cast(pa.binary()).cast(pa.binary(_DIGEST_BYTES))
    except pa.ArrowInvalid as exc:
        raise ValueError("vector store keys are hex sha256 digests (64 characters; see text_digest)") from exc
    return np.frombuffer(fixed.buffers()[1], dtype=f"S{_DIGEST_BYTES}", count=len(fixed),
                         offset=fixed.offset * _DIGEST_BYTES).copy()


def _locate(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``keys`` sits in ``sorted_keys`` (sorted, unique), and whether it is there."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
    pos = np.searchsorted(sorted_keys, keys)
    pos[pos >= len(sorted_keys)] = 0
    return pos, sorted_keys[pos] == keys


def sorted_member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Which ``keys`` occur in ``sorted_keys`` (sorted, unique), as a boolean mask."""
    return _locate(sorted_keys, keys)[1]


class _VectorParts(Generic[V]):
    """Parquet parts of ``(digest, vector)`` rows under ``root``; subclasses map rows to and from columns."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Parts this process set aside as damaged: ``{"file": where it went, "reason": why}``.
        self.quarantined: list[dict[str, str]] = []
        self.checked = 0

    def quarantine(self, part: Path, exc: BaseException | str) -> Path:
        """Move a damaged part to ``.stages/quarantine/vectors/<space>/``, with the reason beside it."""
        dest_dir = self.root.parent.parent / "quarantine" / self.root.parent.name / self.root.name
        reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        try:
            dest = quarantine(part, dest_dir, reason)
        except FileNotFoundError:  # another run set it aside first
            kept = sorted(d for d in dest_dir.glob(f"{part.name}.*") if not d.name.endswith(".reason.txt"))
            dest = kept[-1] if kept else dest_dir / part.name
        self.quarantined.append({"file": str(dest), "reason": reason})
        return dest

    def _to_columns(self, values: Sequence[V]) -> dict[str, pa.Array]:
        raise NotImplementedError

    def _from_table(self, table: pa.Table) -> list[V]:
        raise NotImplementedError

    def _parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet")) if self.root.is_dir() else []

    def lookup(self, digests: Iterable[str]) -> dict[str, V]:
        """The stored vector of every digest that has one (for small sets: queries, tests)."""
        wanted = sorted(set(digests))
        if not wanted:
            return {}
        index = self.open_index()
        found = index.fetch_known(index.find(digest_array(wanted)))
        return {d: v for d, v in zip(wanted, found) if v is not None}

    def open_index(self) -> CacheIndex[V]:
        """The digests of every part, sorted, with the parts held open for reading.

        Parts stay open, so a concurrent compaction that unlinks them cannot pull
        rows from under a reader (POSIX keeps an unlinked open file readable).
        """
        sweep_stale_parts(self.root)
        for _attempt in range(3):
            try:
                opened = [self._open_part(p) for p in self._parts()]
            except FileNotFoundError:  # a concurrent compaction replaced the parts: list them again
                continue
            self.checked = len(opened)
            good = [o for o in opened if o is not None]
            return CacheIndex(self, [pf for pf, _keys, _path in good], digests=[k for _pf, k, _path in good],
                              paths=[path for _pf, _keys, path in good])
        raise FileNotFoundError(f"the vector cache at {self.root} kept changing while it was opened")

    def _open_part(self, path: Path) -> tuple[pq.ParquetFile, np.ndarray, Path] | None:
        """A part held open with its digests, or None when it is damaged (it is quarantined then)."""
        try:
            pf = pq.ParquetFile(path, page_checksum_verification=True)
            keys = digest_array(pf.read(columns=["digest"])["digest"])
        except FileNotFoundError:
            raise
        except _READ_ERRORS as exc:
            self.quarantine(path, exc)
            return None
        return pf, keys, path

    def index_with(self, index: CacheIndex[V], part: PartWriter[V] | None) -> CacheIndex[V]:
        """``index`` (parts held open since it was made) plus the parts this process just wrote, newest last."""
        if part is None or not part.published:
            return index
        return CacheIndex(self, [*index.files, *part.published], paths=[*index.paths, *part.published_paths])

    def writer(self, *, roll_after_s: float | None = None) -> PartWriter[V]:
        """A new part, written a row group at a time; it appears atomically on close (or every ``roll_after_s``)."""
        return PartWriter(self, roll_after_s=roll_after_s)

    def append(self, rows: dict[str, V]) -> None:
        """Add vectors (one part file, written atomically)."""
        if not rows:
            return
        with self.writer() as w:
            w.add(list(rows), list(rows.values()))

    def compact(self, keep: np.ndarray) -> int:
        """Merge the parts into one holding only ``keep`` (sorted unique ``S64`` digests) once there are many.

        Streams row group by row group; each digest is kept once. Returns how many
        parts were merged (0 when no compaction was due). The merged part is
        written before the old ones go, so a concurrent reader never misses a
        vector it could have had.
        """
        parts = self._parts()
        if len(parts) <= _MAX_PARTS:
            return 0
        index = self.open_index()
        with self.writer() as out:
            for p, pf in enumerate(index.files):
                base = index.offsets[p]
                row = 0
                for rg in range(pf.num_row_groups):
                    table = pf.read_row_group(rg)
                    keys = digest_array(table["digest"])
                    gids = base + row + np.arange(len(keys))
                    row += len(keys)
                    # Keep a row when its digest is current and this row is the one the index chose.
                    take = sorted_member(keep, keys) & (index.find(keys) == gids)
                    if take.any():
                        kept = table.filter(pa.array(take))
                        out.add(kept["digest"].to_pylist(), self._from_table(kept))
        for part in parts:
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
        return len(parts)


class CacheIndex(Generic[V]):
    """Sorted digests of a vector store's parts, and row-group reads of the vectors they key.

    A global id (gid) is a row's offset across the parts in order.
    """

    def __init__(self, store: _VectorParts[V], files: list[pq.ParquetFile], *,
                 digests: list[np.ndarray] | None = None, paths: list[Path] | None = None) -> None:
        self.store = store
        self.files = files
        self.paths = paths or []
        self.offsets: list[int] = []
        self._groups: list[np.ndarray] = []  # per part: first row of each row group, plus the row count
        keys, gids = [], []
        total = 0
        for p, pf in enumerate(files):
            self.offsets.append(total)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self._groups.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            part_keys = digests[p] if digests is not None else digest_array(pf.read(columns=["digest"])["digest"])
            keys.append(part_keys)
            gids.append(np.arange(total, total + len(part_keys), dtype=np.int64))
            total += len(part_keys)
        all_keys = np.concatenate(keys) if keys else np.zeros(0, dtype=f"S{_DIGEST_BYTES}")
        all_gids = np.concatenate(gids) if gids else np.zeros(0, dtype=np.int64)
        # Stable sort, then the first of equal keys: the oldest copy of a vector wins, deterministically.
        order = np.argsort(all_keys, kind="stable")
        sorted_keys = all_keys[order]
        first = np.ones(len(sorted_keys), dtype=bool)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        self.keys = sorted_keys[first]
        self.gids = all_gids[order][first]
        self._cache: OrderedDict[tuple[int, int], list[V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """The gid of each digest (``S64``), or -1 where the store has no vector for it."""
        out = np.full(len(keys), -1, dtype=np.int64)
        pos, hit = _locate(self.keys, keys)
        out[hit] = self.gids[pos[hit]]
        return out

    def fetch_known(self, gids: np.ndarray) -> list[V | None]:
        """The vector of each gid, None where the gid is -1 (not in the store)."""
        out: list[V | None] = [None] * len(gids)
        hit = np.nonzero(gids >= 0)[0]
        for i, v in zip(hit, self.fetch(gids[hit])):
            out[i] = v
        return out

    def fetch(self, gids: np.ndarray) -> list[V]:
        """The vectors of ``gids`` (all >= 0), in the given order.

        Reads only the row groups they fall in; the last few row groups read are
        kept, since consecutive windows of a re-run mostly hit the same ones.
        """
        out: list[V | None] = [None] * len(gids)
        if len(gids) == 0:
            return []
        part_of = np.searchsorted(np.asarray(self.offsets[1:] + [np.iinfo(np.int64).max]), gids, side="right")
        for p in np.unique(part_of):
            sel = np.nonzero(part_of == p)[0]
            rows = gids[sel] - self.offsets[p]
            group_of = np.searchsorted(self._groups[p], rows, side="right") - 1
            for g in np.unique(group_of):
                in_group = group_of == g
                values = self._row_group(int(p), int(g))
                for i, r in zip(sel[in_group], rows[in_group] - self._groups[p][g]):
                    out[i] = values[r]
        return out  # type: ignore[return-value]

    def _row_group(self, part: int, group: int) -> list[V]:
        key = (part, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            values = self.store._from_table(self.files[part].read_row_group(group))
        except _READ_ERRORS as exc:
            if part >= len(self.paths):
                raise
            where = self.store.quarantine(self.paths[part], exc)
            raise DamagedStoreError(f"vector store part {self.paths[part].name} is damaged ({exc}); it was set "
                                    f"aside in {where.parent} and its vectors will be embedded again",
                                    str(where)) from exc
        self._cache[key] = values
        if len(self._cache) > 4:
            self._cache.popitem(last=False)
        return values


_TMP_SUFFIX = ".tmp"
STALE_TMP_S = 7 * 24 * 3600.0  # a temp part from another host is swept only when this old


def _tmp_owner_tag() -> str:
    me = owner()
    return f"{me['host']}.{me['pid']}.{me['started'] if me['started'] is not None else 'x'}"


def sweep_stale_parts(root: Path, now: float | None = None) -> int:
    """Delete the unpublished parts of writers that are gone (a run killed while it wrote); returns how many.

    A temp part is named ``.<part>.<host>.<pid>.<pid start time>.<random>.tmp``:
    on this host it is stale once that process is gone (a reused pid does not
    count); from another host, or in an older naming, once it is a week old, since
    a live writer there cannot be asked.
    """
    if not root.is_dir():
        return 0
    now = time.time() if now is None else now
    swept = 0
    for tmp in root.glob(".part-*" + _TMP_SUFFIX):
        _part, sep, tag = tmp.name[1:-len(_TMP_SUFFIX)].partition(".parquet.")
        fields = tag.rsplit(".", 3)  # a host name may hold dots
        try:
            old = now - tmp.stat().st_mtime > STALE_TMP_S
            if sep and len(fields) == 4 and fields[1].isdigit():
                host, pid, started, _random = fields
                stale = old if host != socket.gethostname() else owner_dead(
                    {"host": host, "pid": int(pid), "started": int(started) if started.isdigit() else None})
            else:
                stale = old
            if stale:
                tmp.unlink()
                swept += 1
        except FileNotFoundError:  # its writer published or dropped it meanwhile
            continue
    return swept


class PartWriter(Generic[V]):
    """New parts of a vector store, a row group per :meth:`add`; each atomic, and absent when empty.

    With ``roll_after_s``, the part being written is published once it has been
    open that long and a new one begun: a run killed later keeps what it embedded
    until then, and its re-run embeds only the rest. Every published part stays
    open for reading (:attr:`published`).
    """

    def __init__(self, store: _VectorParts[V], *, roll_after_s: float | None = None) -> None:
        self.store = store
        self.count = 0
        self.roll_after_s = roll_after_s
        self.published: list[pq.ParquetFile] = []
        self.published_paths: list[Path] = []
        self._final = Path()
        self._ctx: Any = None
        self._tmp: Path | None = None
        self._writer: pq.ParquetWriter | None = None
        self._opened_at = 0.0

    def add(self, digests: list[str], values: Sequence[V]) -> None:
        """Append vectors with their digests."""
        if not digests:
            return
        table = pa.table({"digest": pa.array(digests, type=pa.string()), **self.store._to_columns(values)})
        if self._writer is None:
            self.store.root.mkdir(parents=True, exist_ok=True)
            # Time-ordered names: parts list oldest first, so the oldest copy of a vector wins, on every host.
            # The writer in the temp name: a killed writer's leftovers can be told from a live one's.
            self._final = self.store.root / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
            self._ctx = atomic_path(self._final, tag=_tmp_owner_tag())
            self._tmp = self._ctx.__enter__()
            # A CRC-32 per page: a flipped bit in a vector is found when the page is read.
            self._writer = pq.ParquetWriter(self._tmp, table.schema, write_page_checksum=True)
            self._opened_at = time.monotonic()
        self._writer.write_table(table)
        self.count += len(digests)
        if self.roll_after_s is not None and time.monotonic() - self._opened_at >= self.roll_after_s:
            self.close()

    def close(self) -> None:
        """Publish the part being written (nothing when no row was added since the last one).

        The handle is taken before the part is published: a concurrent run's
        compaction may merge and unlink it at once, and the run that wrote it
        still reads its vectors through the handle.
        """
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            handle = pq.ParquetFile(self._tmp)
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)  # a failed rename still removes the temp part
            self.published.append(handle)
            self.published_paths.append(self._final)

    def abort(self) -> None:
        """Drop the part being written; parts already published stay (their vectors are sound)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> PartWriter[V]:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # A run stopped on request (Ctrl-C, SIGTERM) keeps what it embedded: every row added was
        # whole and checked, so the re-run embeds only the rest, as after a checkpoint.
        if exc_type is None or isinstance(exc, RunCancelledError):
            self.close()
        else:
            self.abort()


class NonFiniteVectorError(ValueError):
    """A vector with NaN or infinite values was offered to a store."""


def _refuse_non_finite(finite_rows: np.ndarray) -> None:
    # A store serves its vectors to every later run of the space: one NaN stored is a NaN forever.
    if not finite_rows.all():
        bad = int((~finite_rows).sum())
        raise NonFiniteVectorError(f"refusing to store {bad} of {len(finite_rows)} vectors: NaN or infinite values")


class DenseVectorCache(_VectorParts[np.ndarray]):
    """Dense vectors of one vector space (float32, fixed size per space).

    Args:
        unit: The space holds unit vectors (every dense model here normalises): a
            vector of another length is refused when stored, and a part holding
            one is damaged when read.
    """

    def __init__(self, root: Path, *, unit: bool = False) -> None:
        super().__init__(root)
        self.unit = unit

    def _not_unit(self, matrix: np.ndarray) -> np.ndarray:
        if not self.unit or not len(matrix):
            return np.zeros(len(matrix), dtype=bool)
        norms = np.linalg.norm(matrix, axis=1)
        # A zero vector is what normalising a zero embedding gives: allowed.
        off: np.ndarray = (np.abs(norms - 1.0) > _UNIT_NORM_TOLERANCE) & (norms != 0.0)
        return off

    def _to_columns(self, values: Sequence[np.ndarray]) -> dict[str, pa.Array]:
        vectors = np.ascontiguousarray(np.stack(list(values)), dtype=np.float32)
        _refuse_non_finite(np.asarray(np.isfinite(vectors).all(axis=1)))
        if self._not_unit(vectors).any():
            raise ValueError("a vector of this space is not a unit vector; the dense models normalise theirs")
        return {"vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()),
                                                            int(vectors.shape[1]))}

    def _from_table(self, table: pa.Table) -> list[np.ndarray]:
        col = table["vector"].combine_chunks()
        matrix = col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, col.type.list_size)
        # Parts written before page checksums have none: a damaged vector still shows, as non-finite or
        # (in a unit space) by its length.
        bad = ~np.isfinite(matrix).all(axis=1) | self._not_unit(matrix)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} stored vector(s) are not finite unit vectors")
        return list(matrix)


class SparseVectorCache(_VectorParts[SparseVector]):
    """Live sparse vectors of one vector space (fallback vectors are never stored: cheap to redo)."""

    def _to_columns(self, values: Sequence[SparseVector]) -> dict[str, pa.Array]:
        weights = pa.array([list(v.values) for v in values], type=pa.list_(pa.float32()))
        # Checked as stored: a weight past float32's range would be stored as infinite.
        flat = weights.flatten().to_numpy(zero_copy_only=False)
        if not np.isfinite(flat).all():
            # Rare: find which rows, for the message.
            rows = np.repeat(np.arange(len(values)), np.diff(weights.offsets.to_numpy()))
            finite = np.ones(len(values), dtype=bool)
            finite[rows[~np.isfinite(flat)]] = False
            _refuse_non_finite(finite)
        return {"indices": pa.array([list(v.indices) for v in values], type=pa.list_(pa.int64())),
                "values": weights}

    def _from_table(self, table: pa.Table) -> list[SparseVector]:
        weights = table["values"].combine_chunks()
        flat = weights.flatten().to_numpy(zero_copy_only=False) if len(weights) else np.zeros(0, np.float32)
        indices = table["indices"].combine_chunks()
        flat_idx = indices.flatten().to_numpy(zero_copy_only=False) if len(indices) else np.zeros(0, np.int64)
        # Parts written before page checksums have none: a damaged weight or index still shows here.
        if not np.isfinite(flat).all() or (flat_idx < 0).any() or (flat_idx >= 2**32).any():
            raise ValueError("a stored sparse vector has a non-finite weight or an index outside uint32")
        return [SparseVector.model_construct(indices=idx, values=val) for idx, val in zip(
            indices.to_pylist(), weights.to_pylist())]


def scrub_part(path: Path) -> str | None:
    """Read a whole vector-store part as a stage would; return why it is damaged, or None when it is sound.

    Every page checksum, every row group and every vector's values are checked
    (a stage checks a part's footer and digests when it opens it, the rest as it reads it).

    Raises:
        FileNotFoundError: The part is gone (compacted or set aside meanwhile).
    """
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        store: _VectorParts[Any] = (DenseVectorCache(path.parent, unit=True) if "vector" in pf.schema_arrow.names
                                    else SparseVectorCache(path.parent))
        digest_array(pf.read(columns=["digest"])["digest"])
        for group in range(pf.num_row_groups):
            store._from_table(pf.read_row_group(group))
    except FileNotFoundError:
        raise
    except _READ_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def scrub_space(root: Path, budget: int = QUICK_SCRUB_BYTES) -> list[dict[str, str]]:
    """Scrub a vector space's parts (all of them within ``budget`` bytes, a random choice beyond); set the
    damaged ones aside.

    A stage result served from cache reads no vector, so without this a damaged
    part under it would stay until some later run happened to embed through it.

    Returns:
        Each part set aside: ``{"file": where it went, "reason": why}``.
    """
    store: _VectorParts[Any] = _VectorParts(root)
    parts = store._parts()
    random.shuffle(parts)
    spent = 0
    for part in parts:
        try:
            size = part.stat().st_size
            if spent and spent + size > budget:
                break
            spent += size
            problem = scrub_part(part)
        except FileNotFoundError:
            continue
        if problem is not None:
            store.quarantine(part, problem)
    return store.quarantined
