"""Qdrant local mode: idempotent upserts and the Query API cross-checked against embedder.fusion."""

from __future__ import annotations

import pytest

from embedder import stages as st
from embedder.fusion import DenseIndex, SparseIndex, fuse_dbsf, fuse_rrf
from embedder.io.qdrant import hybrid_query, open_client, point_id
from embedder.io.writers import read_dense_parquet, read_jsonl_records
from embedder.schemas import SparseVector


@pytest.fixture
def indexed(sample_config):
    cfg = sample_config
    col = cfg.collections[0]
    load = st.load_stage(cfg, col, st.load_key(cfg, col))
    dense = st.dense_stage(cfg, col.name, load.chunks, st.dense_key(cfg, load.chunks))
    sparse = st.sparse_stage(cfg, col.name, load.chunks, st.sparse_key(cfg, load.chunks))
    return cfg, col.name, load, dense, sparse


def test_reindexing_leaves_point_count_unchanged(indexed):
    cfg, name, load, dense, sparse = indexed
    first = st.index_stage(cfg, name, load.chunks, dense, sparse)
    second = st.index_stage(cfg, name, load.chunks, dense, sparse)
    assert first.points_count == second.points_count == 50
    assert point_id(name, "coffee-0000") == point_id(name, "coffee-0000") != point_id("other", "coffee-0000")


@pytest.mark.parametrize("method", ["rrf", "dbsf"])
def test_query_api_fusion_matches_embedder_fusion(indexed, method):
    cfg, name, load, dense, sparse = indexed
    st.index_stage(cfg, name, load.chunks, dense, sparse)
    ids, vecs = read_dense_parquet(dense.vectors.path)
    qids, qvecs = read_dense_parquet(dense.query_vectors.path)
    out = sparse.outputs[0]
    svecs = [SparseVector(**r["sparse_vector"]) for r in read_jsonl_records(out.vectors.path)]
    squeries = {r["id"]: SparseVector(**r["sparse_vector"]) for r in read_jsonl_records(out.query_vectors.path)}
    dense_index, sparse_index = DenseIndex(ids, vecs), SparseIndex(ids, svecs)
    location = st.qdrant_location(cfg, name, None)
    with open_client(path=location) as client:
        for qi, qid in enumerate(qids):
            n = 20
            d_list = dense_index.search(qvecs[qi], n)
            s_list = sparse_index.search(squeries[qid], n)
            ours = (fuse_rrf([[c.id for c in d_list], [c.id for c in s_list]], k=60) if method == "rrf"
                    else fuse_dbsf([d_list, s_list]))
            theirs = hybrid_query(client, name, qvecs[qi], {out.vector_name: squeries[qid]}, fusion=method, k=60,
                                  prefetch_limit=n, limit=len(ours))
            ours_scores = {c.id: c.score for c in ours}
            assert {c.id for c in theirs} == set(ours_scores), qid
            for c in theirs:
                assert c.score == pytest.approx(ours_scores[c.id], rel=1e-4, abs=1e-6), (qid, c.id)
