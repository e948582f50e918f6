"""Rebuild examples/sample_collection/ from examples/sample_docs/*.md.

Writes rag_clean-style ``<doc>_chunks.json`` files: one chunk per paragraph,
with the metadata fields rag_clean emits (``sparse_features`` included), so the
sample exercises the same reader and metadata fallback as real exports.

Usage: python examples/build_sample.py
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
STOPWORDS = set((HERE.parent / "embedder/models/data/bm25/english.txt").read_text().split())


def sparse_features(text: str) -> dict:
    """rag_clean's term statistics: raw lower-cased terms with tf and tf-normalised weight."""
    terms = [t for t in re.findall(r"[a-z0-9]+", text.lower()) if t not in STOPWORDS]
    counts = Counter(terms)
    total = len(terms)
    weights = [
        {"term": term, "tf": tf, "weight": round(tf / total, 6)}
        for term, tf in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return {
        "term_weights": weights,
        "top_terms": [w["term"] for w in weights[:10]],
        "unique_terms": len(counts),
        "total_terms": total,
        "weighting": "tf",
    }


def main() -> None:
    out_dir = HERE / "sample_collection"
    out_dir.mkdir(exist_ok=True)
    for doc in sorted((HERE / "sample_docs").glob("*.md")):
        lines = doc.read_text(encoding="utf-8").split("\n\n")
        heading = lines[0].lstrip("# ").strip()
        chunks = []
        for index, para in enumerate(p.strip() for p in lines[1:] if p.strip()):
            digest = hashlib.sha256(para.encode()).hexdigest()
            chunks.append(
                {
                    "text": para,
                    "metadata": {
                        "chunk_id": f"{doc.stem}-{index:04d}",
                        "document_id": doc.stem,
                        "source_file": f"sample_docs/{doc.name}",
                        "chunk_index": index,
                        "token_count": len(para.split()),
                        "section_path": [heading],
                        "heading_text": heading,
                        "chunk_hash": digest[:16],
                        "content_digest": digest,
                        "sparse_features": sparse_features(para),
                    },
                }
            )
        path = out_dir / f"{doc.stem}_chunks.json"
        path.write_text(json.dumps(chunks, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{path.relative_to(HERE.parent)}: {len(chunks)} chunks")


if __name__ == "__main__":
    main()
