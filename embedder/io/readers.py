"""Streaming readers for JSONL, Parquet and rag_clean chunk directories.

Every reader yields :class:`~embedder.schemas.Chunk` or
:class:`~embedder.schemas.Reject` items one at a time, so memory stays flat on
large files. Nothing is dropped silently: each bad record becomes a Reject with
its source, position and reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from embedder.errors import InputFormatError
from embedder.schemas import Chunk, Query, Reject
from embedder.settings import validate_collection_name

# rag_clean metadata keys whose type we rely on downstream.
_METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "chunk_id": (str, int),
    "document_id": (str, int),
    "source_file": (str,),
    "chunk_index": (int,),
    "token_count": (int,),
    "section_path": (list, str),
    "heading_text": (str,),
    "chunk_hash": (str,),
    "content_digest": (str,),
    "sparse_features": (dict,),
}

ReadItem = Chunk | Reject


def _excerpt(raw: Any) -> str:
    text = raw if isinstance(raw, str) else repr(raw)
    return text[:200]


@dataclass
class RecordValidator:
    """Validates raw records and tracks ids across one collection.

    Ids are remembered as 16-byte digests so that a 200k-record collection costs
    a few MB, not a copy of every id string.
    """

    max_chunk_chars: int = 32_768
    truncated: int = 0
    _seen: set[bytes] = field(default_factory=set)

    def validate(self, raw: Any, *, source: str, line: int, default_id: str | None) -> ReadItem:
        """Turn one raw record into a Chunk, or a Reject naming the reason."""

        def reject(reason: str, rid: str | None = None) -> Reject:
            return Reject(source=source, line=line, id=rid, reason=reason, excerpt=_excerpt(raw))

        if not isinstance(raw, dict):
            return reject(f"record must be a JSON object, got {type(raw).__name__}")
        metadata = raw.get("metadata")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            return reject(f"metadata must be an object, got {type(metadata).__name__}")
        for key, types in _METADATA_TYPES.items():
            value = metadata.get(key)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
                wanted = " or ".join(t.__name__ for t in types)
                return reject(f"metadata.{key} must be {wanted}, got {type(value).__name__}")
        rid = metadata.get("chunk_id", raw.get("id", default_id))
        if rid is None:
            return reject("missing id (no 'id' field and no metadata.chunk_id)")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            return reject(f"id must be a string or integer, got {type(rid).__name__}")
        rid = str(rid)
        if not rid.strip():
            return reject("empty id")
        if "text" not in raw:
            return reject("missing text", rid)
        text = raw["text"]
        if not isinstance(text, str):
            return reject(f"text must be a string, got {type(text).__name__}", rid)
        if not text:
            return reject("empty text", rid)
        if not text.strip():
            return reject("whitespace-only text", rid)
        id_key = hashlib.blake2b(rid.encode("utf-8"), digest_size=16).digest()
        if id_key in self._seen:
            return reject(f"duplicate id {rid!r}", rid)
        self._seen.add(id_key)
        if len(text) > self.max_chunk_chars:
            self.truncated += 1
            metadata = {**metadata, "truncated_from_chars": len(text)}
            text = text[: self.max_chunk_chars]
        return Chunk(id=rid, text=text, metadata=metadata)


def read_jsonl(path: Path, validator: RecordValidator) -> Iterator[ReadItem]:
    """Stream a JSONL file of ``{id, text, metadata}`` records."""
    source = str(path)
    with open(path, "rb") as fh:
        for lineno, raw_line in enumerate(fh, start=1):
            if not raw_line.strip():
                continue
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Reject(source=source, line=lineno, reason=f"undecodable bytes (not UTF-8): {exc.reason} "
                             f"at byte {exc.start}", excerpt=raw_line[:200].decode("utf-8", "replace"))
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Reject(source=source, line=lineno, reason=f"malformed JSON: {exc.msg} at column {exc.colno}",
                             excerpt=line[:200])
                continue
            yield validator.validate(raw, source=source, line=lineno, default_id=None)


def _metadata_from_arrow(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # the validator rejects it as a non-object
    if isinstance(value, list) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return dict(value)  # a Parquet MAP column arrives as (key, value) pairs
    return value


def read_parquet(path: Path, validator: RecordValidator, batch_rows: int = 2048) -> Iterator[ReadItem]:
    """Stream a Parquet file with ``id``, ``text`` and optional ``metadata`` columns, batch by batch."""
    source = str(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = set(pf.schema_arrow.names)
    if "text" not in names:
        raise InputFormatError(f"{path}: Parquet input needs a 'text' column; found {sorted(names)}")
    columns = [c for c in ("id", "text", "metadata") if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        for record in batch.to_pylist():
            if "metadata" in record:
                record["metadata"] = _metadata_from_arrow(record["metadata"])
            if isinstance(record.get("text"), bytes):
                try:
                    record["text"] = record["text"].decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield Reject(source=source, line=row, reason=f"undecodable bytes (not UTF-8): {exc.reason}")
                    row += 1
                    continue
            yield validator.validate(record, source=source, line=row, default_id=None)
            row += 1


def chunk_files(directory: Path) -> list[Path]:
    """The rag_clean chunk files directly in ``directory``, sorted, summaries excluded."""
    return sorted(
        p for p in directory.glob("*chunks*.json")
        if p.is_file() and not p.name.endswith("_processing_summary.json")
    )


def read_rag_clean_dir(directory: Path, validator: RecordValidator) -> Iterator[ReadItem]:
    """Read a directory of ``*chunks*.json`` files, each a list of ``{text, metadata}``."""
    files = chunk_files(directory)
    if not files:
        raise InputFormatError(f"{directory}: no *chunks*.json files found")
    for path in files:
        source = str(path)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield Reject(source=source, line=None, reason=f"undecodable bytes (not UTF-8) in file: {exc.reason}")
            continue
        except json.JSONDecodeError as exc:
            yield Reject(source=source, line=exc.lineno, reason=f"malformed JSON file: {exc.msg}")
            continue
        if not isinstance(data, list):
            yield Reject(source=source, line=None, reason="a chunks file must hold a JSON list of chunks")
            continue
        for index, raw in enumerate(data):
            yield validator.validate(raw, source=source, line=index, default_id=f"{path.stem}-{index}")


def read_collection(path: str | Path, validator: RecordValidator | None = None) -> Iterator[ReadItem]:
    """Stream one collection from a JSONL file, a Parquet file or a rag_clean chunk directory.

    Raises:
        InputFormatError: If the path does not exist or has an unsupported format.
    """
    p = Path(path)
    v = validator or RecordValidator()
    if p.is_dir():
        return read_rag_clean_dir(p, v)
    if not p.exists():
        raise InputFormatError(f"input {str(p)!r} does not exist")
    if p.suffix in (".jsonl", ".ndjson"):
        return read_jsonl(p, v)
    if p.suffix in (".parquet", ".pq"):
        return read_parquet(p, v)
    raise InputFormatError(
        f"input {str(p)!r}: unsupported format; use .jsonl, .parquet or a directory of *chunks*.json files"
    )


def discover_collections(path: str | Path, name: str | None = None) -> list[tuple[str, Path]]:
    """Map an ``--input`` path to ``(collection name, path)`` pairs.

    A file or a directory holding chunk files is one collection, named after it
    unless ``name`` is given. A directory whose sub-directories hold chunk files
    is one collection per sub-directory.

    Raises:
        InputFormatError: If nothing usable is found.
        UnsafeNameError: If a derived name is unsafe.
    """
    p = Path(path)
    if not p.exists():
        raise InputFormatError(f"input {str(p)!r} does not exist")
    if p.is_file() or chunk_files(p):
        derived = name or (p.stem if p.is_file() else p.resolve().name)
        return [(validate_collection_name(derived), p)]
    subdirs = sorted(d for d in p.iterdir() if d.is_dir() and chunk_files(d))
    if not subdirs:
        raise InputFormatError(f"{p}: no *chunks*.json files in it or in its sub-directories")
    if name:
        raise InputFormatError(f"{p} holds {len(subdirs)} collections; --collection names only one")
    return [(validate_collection_name(d.name), d) for d in subdirs]


def read_queries(path: str | Path) -> list[Query]:
    """Read a JSONL query set of ``{_id, text}`` (``id`` is accepted too).

    Raises:
        InputFormatError: Naming the bad line.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFormatError(f"queries file {str(p)!r} does not exist")
    queries: list[Query] = []
    seen: set[str] = set()
    with open(p, "rb") as fh:
        for lineno, raw_line in enumerate(fh, start=1):
            if not raw_line.strip():
                continue
            try:
                obj = json.loads(raw_line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputFormatError(f"{p}:{lineno}: not a JSON object line ({exc})") from exc
            qid = obj.get("_id", obj.get("id")) if isinstance(obj, dict) else None
            text = obj.get("text") if isinstance(obj, dict) else None
            if qid is None or not isinstance(text, str) or not text.strip():
                raise InputFormatError(f"{p}:{lineno}: a query needs '_id' and a non-empty 'text'")
            qid = str(qid)
            if qid in seen:
                raise InputFormatError(f"{p}:{lineno}: duplicate query id {qid!r}")
            seen.add(qid)
            queries.append(Query(id=qid, text=text))
    if not queries:
        raise InputFormatError(f"queries file {str(p)!r} holds no queries")
    return queries


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV with a header (query-id, corpus-id, score).

    Raises:
        InputFormatError: Naming the bad line.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFormatError(f"qrels file {str(p)!r} does not exist")
    qrels: dict[str, dict[str, int]] = {}
    with open(p, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if len(header) < 3 or header[0].strip() != "query-id":
            raise InputFormatError(f"{p}:1: expected the header 'query-id<TAB>corpus-id<TAB>score'")
        for lineno, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            try:
                qid, did, score = parts[0], parts[1], int(parts[2])
            except (IndexError, ValueError) as exc:
                raise InputFormatError(f"{p}:{lineno}: expected query-id, corpus-id and an integer score") from exc
            qrels.setdefault(qid, {})[did] = score
    return qrels
