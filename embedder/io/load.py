"""The load stage: read a collection, validate it, write the chunk table and rejects.jsonl."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from embedder.io.readers import RecordValidator, read_collection
from embedder.io.writers import ChunkTableWriter, write_jsonl
from embedder.schemas import Chunk, Reject, StageRef


class LoadResult(BaseModel):
    """What the load stage produced."""

    chunks: StageRef
    rejects: StageRef
    chunk_count: int
    reject_count: int
    truncated_count: int
    reject_reasons: dict[str, int] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split("(")[0].strip().split(" '")[0]


def load_collection(
    input_path: str | Path,
    chunks_path: Path,
    rejects_path: Path,
    *,
    max_chunk_chars: int = 32_768,
) -> LoadResult:
    """Stream a collection into a validated chunk table plus ``rejects.jsonl``.

    Args:
        input_path: JSONL, Parquet or rag_clean chunk directory.
        chunks_path: Where to write the chunk Parquet table.
        rejects_path: Where to write the rejects (written even when empty).
        max_chunk_chars: Longer chunks are truncated and counted.

    Returns:
        References to both files, counts and warnings.
    """
    validator = RecordValidator(max_chunk_chars=max_chunk_chars)
    writer = ChunkTableWriter(chunks_path)
    rejects: list[Reject] = []
    try:
        for item in read_collection(input_path, validator):
            if isinstance(item, Chunk):
                writer.add(item)
            else:
                rejects.append(item)
        chunks_ref = writer.close()
    except BaseException:
        writer.abort()
        raise
    rejects_ref = write_jsonl(rejects_path, rejects)
    reasons: dict[str, int] = {}
    for r in rejects:
        kind = _reason_kind(r.reason)
        reasons[kind] = reasons.get(kind, 0) + 1
    warnings: list[str] = []
    if rejects:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        warnings.append(f"{len(rejects)} record(s) rejected ({detail}); each is in rejects.jsonl with its reason")
    if validator.truncated:
        warnings.append(
            f"{validator.truncated} chunk(s) longer than {max_chunk_chars} characters were truncated"
        )
    if chunks_ref.items == 0:
        warnings.append("the collection holds no valid chunks")
    return LoadResult(
        chunks=chunks_ref,
        rejects=rejects_ref,
        chunk_count=chunks_ref.items,
        reject_count=len(rejects),
        truncated_count=validator.truncated,
        reject_reasons=reasons,
        warnings=warnings,
    )
