"""The peer of bench/peers.py: LlamaIndex's IngestionPipeline on the same corpus, as a user would write it.

Run by bench/peers.py with the peer's own Python (bench/peers-requirements.txt), one process per step:

- ``ingest``: a docstore-backed ``IngestionPipeline`` (``DocstoreStrategy.UPSERTS_AND_DELETE``)
  whose transformations are a node parser (one node per abstract) and the dense embedding
  (all-MiniLM-L6-v2 from its wheel, through sentence-transformers), writing into Qdrant (qdrant-client,
  on disk) with hybrid dense + fastembed BM25 vectors (the same local BM25 directory and stopwords as
  the project, IDF on). The pipeline's docstore is persisted between runs, so a re-run embeds only new
  and changed documents and deletes the ones that are gone.
- ``search``: hybrid queries; prints the ids found per query.

It prints one JSON line: what it computed and where its time went.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

T0 = time.perf_counter()


def _sparse_fns(bm25_dir: str):  # noqa: ANN202 - LlamaIndex's SparseEncoderCallable pair
    from fastembed import SparseTextEmbedding

    model = SparseTextEmbedding("Qdrant/bm25", specific_model_path=bm25_dir, local_files_only=True)

    def docs(texts: list[str]) -> tuple[list[list[int]], list[list[float]]]:
        out = list(model.embed(texts, batch_size=256))
        return [e.indices.tolist() for e in out], [e.values.tolist() for e in out]

    def queries(texts: list[str]) -> tuple[list[list[int]], list[list[float]]]:
        out = list(model.query_embed(texts))
        return [e.indices.tolist() for e in out], [e.values.tolist() for e in out]

    return docs, queries


def _store(args: argparse.Namespace):  # noqa: ANN202
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    docs, queries = _sparse_fns(args.bm25)
    client = QdrantClient(path=str(args.store / "qdrant"))
    return client, QdrantVectorStore(collection_name="scifact", client=client, enable_hybrid=True,
                                     fastembed_sparse_model="Qdrant/bm25", sparse_doc_fn=docs,
                                     sparse_query_fn=queries, batch_size=64)


def ingest(args: argparse.Namespace) -> dict[str, object]:
    """One nightly run: read the corpus, let the pipeline's docstore decide what to embed, write Qdrant."""
    imported = time.perf_counter()
    from llama_index.core import Document
    from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.storage.docstore import SimpleDocumentStore
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    class CountingEmbedding(HuggingFaceEmbedding):
        """Counts the texts it embeds (the figure bench/peers.py compares)."""

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            counter["embedded"] += len(texts)
            return super()._get_text_embeddings(texts)

    counter = {"embedded": 0}
    imports_s = time.perf_counter() - imported
    t = time.perf_counter()
    embed = CountingEmbedding(model_name=args.model, device="cpu", embed_batch_size=32)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    client, store = _store(args)
    state = args.store / "pipeline"
    # One node per abstract (they are chunk-sized), as a node parser makes it: the node names its document,
    # which is how UPSERTS_AND_DELETE finds the points of a deleted or edited document. Token counts by
    # whitespace: LlamaIndex's default tokenizer downloads its vocabulary, which an offline host cannot.
    splitter = SentenceSplitter(chunk_size=100_000, chunk_overlap=0, tokenizer=str.split)
    pipeline = IngestionPipeline(transformations=[splitter, embed], vector_store=store, docstore=SimpleDocumentStore(),
                                 docstore_strategy=DocstoreStrategy.UPSERTS_AND_DELETE)
    if state.exists():
        pipeline.load(str(state))
    open_s = time.perf_counter() - t
    # Qdrant takes UUIDs or integers as point ids, and LlamaIndex uses the document id: a stable UUID per id.
    docs = [Document(text=row["text"], id_=str(uuid.uuid5(uuid.NAMESPACE_URL, f"scifact:{row['id']}")),
                     metadata={"chunk_id": row["id"]},
                     excluded_embed_metadata_keys=["chunk_id"], excluded_llm_metadata_keys=["chunk_id"])
            for row in map(json.loads, args.corpus.read_text(encoding="utf-8").splitlines())]
    t = time.perf_counter()
    pipeline.run(documents=docs)
    pipeline.persist(str(state))
    run_s = time.perf_counter() - t
    points = client.count("scifact", exact=True).count
    client.close()
    return {"embedded": counter["embedded"], "points": points, "imports_s": round(imports_s, 3),
            "model_load_s": round(load_s, 3), "store_open_s": round(open_s, 3), "pipeline_s": round(run_s, 3),
            "process_s": round(time.perf_counter() - T0, 3)}


def search(args: argparse.Namespace) -> dict[str, object]:
    """Hybrid top-10 ids for each query of ``--queries`` (a JSON list of strings)."""
    from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(args.model, device="cpu")
    client, store = _store(args)
    hits = {}
    for query in json.loads(args.queries):
        vector = model.encode(query, normalize_embeddings=True).tolist()
        result = store.query(VectorStoreQuery(query_str=query, query_embedding=vector, similarity_top_k=10,
                                              sparse_top_k=10, hybrid_top_k=10, mode=VectorStoreQueryMode.HYBRID))
        hits[query] = [n.metadata.get("chunk_id") for n in result.nodes]
    # How many points hold each id (an edited document must be there once).
    from qdrant_client import models

    ids = json.loads(args.count_ids or "[]")
    counts = {i: client.count("scifact", exact=True, count_filter=models.Filter(must=[models.FieldCondition(
        key="chunk_id", match=models.MatchValue(value=i))])).count for i in ids}
    client.close()
    return {"hits": hits, "counts": counts}


def main() -> None:
    """Parse the step and run it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=["ingest", "search"])
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--bm25", required=True)
    parser.add_argument("--queries")
    parser.add_argument("--count-ids")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = ingest(args) if args.step == "ingest" else search(args)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
