"""BEIR-layout datasets: validation and conversion into pipeline inputs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedder.errors import InputFormatError
from embedder.io.atomic import atomic_open
from embedder.io.readers import read_qrels


@dataclass(frozen=True)
class BeirInputs:
    """Pipeline inputs derived from a BEIR dataset."""

    corpus_jsonl: Path
    queries_jsonl: Path
    qrels_tsv: Path
    documents: int
    queries: int


def _records(path: Path, kind: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line, or an error naming the line."""
    with open(path, "rb") as src:
        for lineno, raw in enumerate(src, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputFormatError(f"{path}:{lineno}: not a BEIR {kind} record ({exc})") from exc


def prepare_beir(beir_dir: str | Path, split: str, work_dir: str | Path) -> BeirInputs:
    """Check the BEIR layout and write the pipeline's inputs into ``work_dir``.

    The corpus becomes ``{id, text, metadata}`` JSONL with ``text = title + " " + text``;
    the queries are those judged in ``qrels/<split>.tsv``.

    Raises:
        InputFormatError: Naming the missing file or the bad line.
    """
    root = Path(beir_dir)
    corpus, queries, qrels_path = root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"
    for path in (corpus, queries, qrels_path):
        if not path.is_file():
            raise InputFormatError(f"BEIR layout: missing {path}")
    qrels = read_qrels(qrels_path)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    docs = 0
    with atomic_open(work / "corpus.jsonl") as dst:
        for lineno, rec in _records(corpus, "corpus"):
            try:
                doc_id, title, text = str(rec["_id"]), rec.get("title") or "", rec.get("text") or ""
            except (KeyError, TypeError, AttributeError) as exc:
                raise InputFormatError(f"{corpus}:{lineno}: not a BEIR corpus record ({exc!r})") from exc
            dst.write(json.dumps({"id": doc_id, "text": f"{title} {text}".strip(),
                                  "metadata": {"title": title}}, ensure_ascii=False) + "\n")
            docs += 1
    kept = 0
    with atomic_open(work / "queries.jsonl") as dst:
        for lineno, rec in _records(queries, "query"):
            try:
                qid, text = str(rec["_id"]), rec["text"]
            except (KeyError, TypeError) as exc:
                raise InputFormatError(f"{queries}:{lineno}: not a BEIR query record ({exc!r})") from exc
            if qid in qrels:
                dst.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
                kept += 1
    if kept == 0:
        raise InputFormatError(f"no query in {queries} is judged in {qrels_path}")
    return BeirInputs(work / "corpus.jsonl", work / "queries.jsonl", qrels_path, docs, kept)
