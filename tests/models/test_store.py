"""The VectorStore protocol on real points: Qdrant Edge against qdrant-client (the oracle) and embedder.fusion.

The sample collection is embedded once per module with the real MiniLM and
BM25 models; every test then builds indexes from those stage outputs.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from embedder import stages as st
from embedder.errors import IndexNotFoundError, VectorIndexError
from embedder.fusion import DenseIndex, SparseIndex, fuse_dbsf, fuse_rrf
from embedder.io.edge_store import MANIFEST, SHARDS, EdgeIndexWriter, EdgeStore, index_root
from embedder.io.store import HybridQuery, hybrid_search
from embedder.io.stores import open_store
from embedder.io.writers import read_dense_parquet, read_jsonl_records
from embedder.schemas import ScoredCandidate, SparseVector
from embedder.settings import CollectionInput, RunConfig
from tests.conftest import SAMPLE_DIR, SAMPLE_QUERIES

# qdrant-client's local mode is always exact and says so when asked for exact search.
pytestmark = pytest.mark.filterwarnings("ignore:Local mode performs exact")


@pytest.fixture(scope="module")
def stage_outputs(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("store")
    cfg = RunConfig(collections=[CollectionInput(name="sample", path=str(SAMPLE_DIR))],
                    queries_path=str(SAMPLE_QUERIES), output_dir=str(out / "run"), local_files_only=True)
    col = cfg.collections[0]
    load = st.load_stage(cfg, col, st.load_key(cfg, col))
    dense = st.dense_stage(cfg, col.name, load.chunks, st.dense_key(cfg, col.name, load.chunks))
    sparse = st.sparse_stage(cfg, col.name, load.chunks, st.sparse_key(cfg, col.name, load.chunks))
    return cfg, load, dense, sparse


def _subset(stage_outputs, keep, tmp: Path, tag: str):
    """Stage outputs restricted to the chunks ``keep`` accepts: a collection with deleted chunks."""
    from embedder.io.writers import ChunkTableWriter, read_chunks, write_dense_parquet, write_jsonl

    _, load, dense, sparse = stage_outputs
    chunks = [c for c in read_chunks(load.chunks.path) if keep(c.id)]
    wanted = {c.id for c in chunks}
    writer = ChunkTableWriter(tmp / f"chunks-{tag}.parquet")
    for c in chunks:
        writer.add(c)
    chunks_ref = writer.close()
    ids, vecs = read_dense_parquet(dense.vectors.path)
    rows = [i for i, x in enumerate(ids) if x in wanted]
    dense_ref = write_dense_parquet(tmp / f"dense-{tag}.parquet", [ids[i] for i in rows], vecs[rows], "m")
    outs = []
    for o in sparse.outputs:
        recs = [r for r in read_jsonl_records(o.vectors.path) if r["id"] in wanted]
        outs.append(o.model_copy(update={"vectors": write_jsonl(tmp / f"{o.vector_name}-{tag}.jsonl", recs)}))
    return (chunks_ref, dense.model_copy(update={"vectors": dense_ref}),
            sparse.model_copy(update={"outputs": outs}))


def _config_in(cfg: RunConfig, path: Path, **updates) -> RunConfig:
    return cfg.model_copy(update={"output_dir": str(path), **updates})


def _queries(dense, sparse) -> list[tuple[np.ndarray, SparseVector]]:
    """The 5 real queries plus 20 chunks used as queries: (dense vector, BM25 vector) each."""
    ids, vecs = read_dense_parquet(dense.vectors.path)
    qids, qvecs = read_dense_parquet(dense.query_vectors.path)
    out = sparse.outputs[0]
    squeries = {r["id"]: SparseVector(**r["sparse_vector"]) for r in read_jsonl_records(out.query_vectors.path)}
    docs = [SparseVector(**r["sparse_vector"]) for r in read_jsonl_records(out.vectors.path)]
    return ([(qvecs[i], squeries[q]) for i, q in enumerate(qids)]
            + [(vecs[i], docs[i]) for i in range(0, len(ids), max(1, len(ids) // 20))][:20])


def _untied(dense, sparse, queries, n: int) -> list[tuple[np.ndarray, SparseVector]]:
    """Queries whose dense and sparse top-(n+1) hold no tied scores.

    RRF works on ranks, and two engines may order equal scores differently, so
    fused scores are comparable only where the input lists have one order.
    """
    ids, vecs = read_dense_parquet(dense.vectors.path)
    svecs = [SparseVector(**r["sparse_vector"]) for r in read_jsonl_records(sparse.outputs[0].vectors.path)]
    d_index, s_index = DenseIndex(ids, vecs), SparseIndex(ids, svecs, use_idf=True)
    out = []
    for dq, sq in queries:
        lists = [d_index.search(dq, n + 1), s_index.search(sq, n + 1)]
        if all(len({round(c.score, 5) for c in lst}) == len(lst) for lst in lists):
            out.append((dq, sq))
    return out


def _same_ranking(ours: list[ScoredCandidate], theirs: list[ScoredCandidate], n: int = 10) -> None:
    """Identical top-n ids and scores; ids tied on score at the cut-off may differ in which made it in."""
    assert len(ours) == len(theirs)
    assert [round(c.score, 4) for c in ours[:n]] == pytest.approx([round(c.score, 4) for c in theirs[:n]], abs=2e-4)
    cutoff = round(ours[min(n, len(ours)) - 1].score, 4) if ours else None
    strict = lambda lst: {c.id for c in lst[:n] if round(c.score, 4) != cutoff}  # noqa: E731
    assert strict(ours) == strict(theirs)


@pytest.fixture(scope="module")
def both_stores(stage_outputs, tmp_path_factory: pytest.TempPathFactory):
    """The same points indexed by Qdrant Edge and by qdrant-client's local mode (the test oracle)."""
    from qdrant_client import QdrantClient

    cfg, load, dense, sparse = stage_outputs
    edge_cfg = _config_in(cfg, tmp_path_factory.mktemp("edge"))
    edge = open_store(edge_cfg.output_dir)
    st.index_stage(edge_cfg, "sample", load.chunks, dense, sparse, edge)
    oracle = open_store(cfg.output_dir, client=QdrantClient(location=":memory:"))
    st.index_stage(cfg, "sample", load.chunks, dense, sparse, oracle)
    yield edge, oracle
    edge.close()
    oracle.close()


@pytest.mark.parametrize("kind", ["dense", "sparse-idf", "rrf", "dbsf"])
def test_edge_and_qdrant_client_return_the_same_top10(both_stores, stage_outputs, kind):
    edge, oracle = both_stores
    _, _, dense, sparse = stage_outputs
    name = sparse.outputs[0].vector_name
    queries = _queries(dense, sparse)
    if kind in ("rrf", "dbsf"):
        queries = _untied(dense, sparse, queries, 20)
        assert len(queries) >= 5
    for dq, sq in queries:
        q = HybridQuery(
            dense=None if kind == "sparse-idf" else dq,
            sparse={} if kind == "dense" else {name: sq},
            fusion="dbsf" if kind == "dbsf" else "rrf", k=60, prefetch_limit=20, limit=10, exact=True,
        )
        _same_ranking(edge.query("sample", q), oracle.query("sample", q))


def _stores_score_as(ours: list[ScoredCandidate], q: HybridQuery, *stores, search=None) -> None:
    """Each store's fused candidates are ours, with our scores (``search``: how to ask; default the engine)."""
    expected = {c.id: c.score for c in ours}
    for store in stores:
        got = search(store, "sample", q) if search else store.query("sample", q)
        assert {c.id for c in got} == set(expected)
        for c in got:
            assert c.score == pytest.approx(expected[c.id], rel=1e-4, abs=1e-6), c.id


@pytest.mark.parametrize("method", ["rrf", "dbsf"])
def test_embedder_fusion_agrees_with_both_stores(both_stores, stage_outputs, method):
    edge, oracle = both_stores
    _, _, dense, sparse = stage_outputs
    out = sparse.outputs[0]
    ids, vecs = read_dense_parquet(dense.vectors.path)
    svecs = [SparseVector(**r["sparse_vector"]) for r in read_jsonl_records(out.vectors.path)]
    dense_index, sparse_index = DenseIndex(ids, vecs), SparseIndex(ids, svecs, use_idf=True)
    n = 20
    queries = _untied(dense, sparse, _queries(dense, sparse), n)
    assert len(queries) >= 5
    for dq, sq in queries:
        d_list, s_list = dense_index.search(dq, n), sparse_index.search(sq, n)
        ours = (fuse_rrf([[c.id for c in d_list], [c.id for c in s_list]], k=60) if method == "rrf"
                else fuse_dbsf([d_list, s_list]))
        q = HybridQuery(dense=dq, sparse={out.vector_name: sq}, fusion=method, k=60, prefetch_limit=n,
                        limit=len(ours), exact=True)
        _stores_score_as(ours, q, edge, oracle)


def test_reruns_write_only_what_changed_and_keep_current_and_previous_shards(stage_outputs, tmp_path):
    cfg, load, dense, sparse = stage_outputs
    cfg = _config_in(cfg, tmp_path)
    store = EdgeStore(tmp_path)
    first = st.index_stage(cfg, "sample", load.chunks, dense, sparse, store)
    assert (first.action, first.upserted, first.points_count) == ("rebuilt", 50, 50)
    same = st.index_stage(cfg, "sample", load.chunks, dense, sparse, store)
    assert (same.action, same.upserted, same.deleted, same.unchanged) == ("unchanged", 0, 0, 50)
    assert same.build_id == first.build_id  # nothing was rebuilt or published

    gone = {"coffee-0001", "chess-0002", "tides-0003"}
    fewer = st.index_stage(cfg, "sample", *_subset(stage_outputs, lambda i: i not in gone, tmp_path, "fewer"), store)
    assert (fewer.action, fewer.upserted, fewer.deleted, fewer.unchanged, fewer.points_count) == (
        "incremental", 0, 3, 47, 47)
    qvec = read_dense_parquet(dense.vectors.path)[1]
    hits = {c.id for v in qvec for c in store.query("sample", HybridQuery(dense=v, limit=50))}
    assert hits and not hits & gone
    back = st.index_stage(cfg, "sample", load.chunks, dense, sparse, store)
    assert (back.action, back.upserted, back.deleted, back.points_count) == ("incremental", 3, 0, 50)

    manifest = json.loads((tmp_path / "sample" / "current" / MANIFEST).read_text())
    assert manifest["shard"] == back.build_id and manifest["previous"] == fewer.build_id
    left = sorted(p.name for p in (index_root(tmp_path, "sample") / SHARDS).iterdir())
    assert left == sorted([fewer.build_id, back.build_id])
    assert back.search_mode == "exact" and back.hnsw_build_s == 0.0
    # On disk an update costs what changed: Edge's mmap files are mostly holes (32 MiB apparent for 50
    # points), and the copy a rebuild starts from keeps them so (a byte-for-byte copy took ~100 MB).
    shards = index_root(tmp_path, "sample") / SHARDS
    assert _allocated(shards / back.build_id) < 2 * _allocated(shards / fewer.build_id) + (1 << 20)
    assert _allocated(shards / back.build_id) < _apparent(shards / back.build_id) / 10


def _allocated(root: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def _apparent(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_a_new_layout_builds_a_new_index_and_switches_only_when_complete(stage_outputs, tmp_path):
    cfg, load, dense, sparse = stage_outputs
    cfg = _config_in(cfg, tmp_path)
    store = EdgeStore(tmp_path)
    st.index_stage(cfg, "sample", load.chunks, dense, sparse, store)
    # Another dense model of another dimension: same chunks, 128-dim vectors.
    ids, vecs = read_dense_parquet(dense.vectors.path)
    small = np.ascontiguousarray(vecs[:, :128]) / np.linalg.norm(vecs[:, :128], axis=1, keepdims=True)
    from embedder.io.writers import write_dense_parquet

    dense128 = dense.model_copy(update={"dim": 128, "vectors": write_dense_parquet(
        tmp_path / "dense128.parquet", ids, small.astype(np.float32), "other")})
    result = st.index_stage(cfg, "sample", load.chunks, dense128, sparse, store)
    assert (result.action, result.upserted, result.points_count) == ("rebuilt", 50, 50)
    assert store.status("sample").layout.dense_dim == 128
    assert len(store.query("sample", HybridQuery(dense=small[0], limit=5))) == 5


def test_hnsw_is_built_at_the_threshold_and_search_still_agrees(stage_outputs, tmp_path):
    cfg, load, dense, sparse = stage_outputs
    exact_store, hnsw_store = EdgeStore(tmp_path / "exact"), EdgeStore(tmp_path / "hnsw", hnsw_min_points=50)
    st.index_stage(_config_in(cfg, tmp_path / "exact"), "sample", load.chunks, dense, sparse, exact_store)
    built = st.index_stage(_config_in(cfg, tmp_path / "hnsw"), "sample", load.chunks, dense, sparse, hnsw_store)
    assert built.search_mode == "hnsw" and built.hnsw_build_s > 0
    for dq, _ in _queries(dense, sparse):
        q = HybridQuery(dense=dq, limit=10)
        # 50 points: the HNSW graph is exact at this size.
        assert [c.id for c in hnsw_store.query("sample", q)] == [c.id for c in exact_store.query("sample", q)]


def _tie_groups(cands: list[ScoredCandidate]) -> list[tuple[float, frozenset[str]]]:
    groups: dict[float, set[str]] = {}
    for c in cands:
        groups.setdefault(float(f"{c.score:.5g}"), set()).add(c.id)  # segments sum in another order
    return sorted(((s, frozenset(ids)) for s, ids in groups.items()), reverse=True)


def test_a_large_shard_is_built_a_segment_at_a_time_and_searches_as_one(stage_outputs, tmp_path):
    """Past hnsw_min_points the graph is built per segment while writing (memory bounded by the segment)."""
    cfg, load, dense, sparse = stage_outputs
    exact_store = EdgeStore(tmp_path / "exact")
    segmented = EdgeStore(tmp_path / "seg", hnsw_min_points=20, segment_points=16)
    st.index_stage(_config_in(cfg, tmp_path / "exact"), "sample", load.chunks, dense, sparse, exact_store)
    built = st.index_stage(_config_in(cfg, tmp_path / "seg", index_batch_size=8), "sample", load.chunks, dense,
                           sparse, segmented)
    assert (built.search_mode, built.points_count) == ("hnsw", 50)
    # 50 points in segments of 16: three sealed while writing, the rest at publish.
    assert built.segments is not None and built.segments >= 4
    for dq, sq in _untied(dense, sparse, _queries(dense, sparse), 10):
        for q in (HybridQuery(dense=dq, limit=10), HybridQuery(sparse={"sparse-qdrant-bm25": sq}, limit=10),
                  HybridQuery(dense=dq, sparse={"sparse-qdrant-bm25": sq}, limit=10, fusion="rrf")):
            got, want = segmented.query("sample", q), exact_store.query("sample", q)
            # Equal scores (RRF ranks (1, 3) and (3, 1)) may come in either order; compare tie groups.
            assert _tie_groups(got) == _tie_groups(want)
    # An incremental re-run on the segmented shard: delete 10 chunks, the count and search stay exact.
    keep = _subset(stage_outputs, lambda i: not i.startswith("gpus"), tmp_path, "seg-subset")
    again = st.index_stage(_config_in(cfg, tmp_path / "seg", index_batch_size=8), "sample", *keep, segmented)
    assert again.action == "incremental" and again.points_count == again.unchanged + again.upserted
    assert again.points_count == segmented.status("sample").points_count < 50


def test_a_failed_build_leaves_the_published_index_and_no_debris(stage_outputs, tmp_path, monkeypatch):
    cfg, load, dense, sparse = stage_outputs
    cfg = _config_in(cfg, tmp_path, index_batch_size=16)
    store = EdgeStore(tmp_path)
    first = st.index_stage(cfg, "sample", *_subset(stage_outputs, lambda i: not i.startswith("gpus"), tmp_path, "a"),
                           store)
    calls = {"n": 0}
    real = EdgeIndexWriter.upsert

    def failing(self, batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise VectorIndexError("injected: disk full")
        return real(self, batch)

    monkeypatch.setattr(EdgeIndexWriter, "upsert", failing)
    with pytest.raises(VectorIndexError, match="injected"):
        st.index_stage(cfg, "sample", load.chunks, dense, sparse, store)
    assert store.status("sample").build_id == first.build_id
    assert store.status("sample").points_count == first.points_count == 45
    assert [p.name for p in (index_root(tmp_path, "sample") / SHARDS).iterdir()] == [first.build_id]
    vec = read_dense_parquet(dense.vectors.path)[1][0]
    assert len(store.query("sample", HybridQuery(dense=vec, limit=50))) == 45


def test_cleanup_never_removes_a_shard_another_live_process_is_building(stage_outputs, tmp_path):
    cfg, load, dense, sparse = stage_outputs
    cfg = _config_in(cfg, tmp_path)
    store = EdgeStore(tmp_path)
    in_progress = store.writer("sample", st.index_layout(dense, sparse))  # this live process "builds" it
    published = set()
    for tag in ("1", "2", "3"):
        r = st.index_stage(cfg, "sample", *_subset(stage_outputs, lambda i, t=tag: not i.endswith(t), tmp_path, tag),
                           store)
        published.add(r.build_id)
    assert len(published) == 3  # three publishes, each followed by a clean-up
    assert in_progress.path.is_dir() and in_progress.marker.is_file()
    in_progress.abort()
    assert not in_progress.path.exists() and not in_progress.marker.exists()


def test_a_dead_builders_leftover_shard_is_removed(stage_outputs, tmp_path):
    cfg, load, dense, sparse = stage_outputs
    cfg = _config_in(cfg, tmp_path)
    store = EdgeStore(tmp_path)
    orphan = store.writer("sample", st.index_layout(dense, sparse))
    info = json.loads(orphan.marker.read_text())
    orphan.marker.write_text(json.dumps({**info, "pid": 2**22 + 12345}))  # no such pid: a crashed builder
    st.index_stage(cfg, "sample", load.chunks, dense, sparse, store)
    assert not orphan.path.exists() and not orphan.marker.exists()


def test_status_and_query_without_an_index_say_why(tmp_path):
    store = EdgeStore(tmp_path)
    assert not store.status("nothing").exists
    with pytest.raises(IndexNotFoundError, match="no index has been published"):
        store.query("nothing", HybridQuery(dense=np.ones(4, dtype=np.float32)))


def test_an_index_from_an_earlier_version_is_reported(stage_outputs, tmp_path):
    cfg, load, dense, sparse = stage_outputs
    cfg = _config_in(cfg, tmp_path)
    (tmp_path / "sample" / "qdrant" / "collection").mkdir(parents=True)
    store = EdgeStore(tmp_path)
    with pytest.raises(IndexNotFoundError, match="written by an earlier version"):
        store.query("sample", HybridQuery(dense=np.ones(384, dtype=np.float32)))
    result = st.index_stage(cfg, "sample", load.chunks, dense, sparse, store)
    assert result.points_count == 50
    assert any("local-mode index written by an earlier version" in w and "re-indexes" in w for w in result.warnings)


def test_threads_share_one_handle_while_a_writer_publishes(stage_outputs, tmp_path):
    cfg, load, dense, sparse = stage_outputs
    cfg = _config_in(cfg, tmp_path)
    writer_store, reader = EdgeStore(tmp_path), EdgeStore(tmp_path)
    st.index_stage(cfg, "sample", load.chunks, dense, sparse, writer_store)
    queries = _queries(dense, sparse)
    name = sparse.outputs[0].vector_name
    stop = threading.Event()

    variants = [_subset(stage_outputs, lambda i, k=k: not i.endswith(str(k)), tmp_path, f"v{k}") for k in range(5)]

    def republish() -> int:
        n = 0
        while not stop.is_set() and n < 5:
            st.index_stage(cfg, "sample", *variants[n], writer_store)
            n += 1
        return n

    def one(i: int) -> int:
        dq, sq = queries[i % len(queries)]
        return len(reader.query("sample", HybridQuery(dense=dq, sparse={name: sq}, limit=10)))

    with ThreadPoolExecutor(17) as pool:
        publishes = pool.submit(republish)
        results = list(pool.map(one, range(400)))
        stop.set()
        assert publishes.result() >= 1
    assert all(n == 10 for n in results) and len(results) == 400
    # The reader follows the newest publish.
    reader.query("sample", HybridQuery(dense=queries[0][0], limit=1))
    assert str(reader.shard_dir("sample")) in reader._handles  # keyed by the shard current names
    reader.close()


def _query_in_child(output_dir: str, vec: list[float], conn) -> None:
    store = EdgeStore(output_dir)
    conn.send([c.id for c in store.query("sample", HybridQuery(dense=np.asarray(vec, np.float32), limit=5))])


def test_several_processes_open_the_published_shard_at_once(stage_outputs, tmp_path):
    cfg, load, dense, sparse = stage_outputs
    st.index_stage(_config_in(cfg, tmp_path), "sample", load.chunks, dense, sparse, EdgeStore(tmp_path))
    here = EdgeStore(tmp_path)
    vec = read_dense_parquet(dense.query_vectors.path)[1][0]
    expected = [c.id for c in here.query("sample", HybridQuery(dense=vec, limit=5))]  # held open meanwhile
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(3):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_query_in_child, args=(str(tmp_path), vec.tolist(), child))
        p.start()
        pipes.append(parent)
        procs.append(p)
    got = [pipe.recv() if pipe.poll(120) else None for pipe in pipes]
    for p in procs:
        p.join(30)
    assert got == [expected] * 3
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert os.getpid()  # this process kept its handle throughout
    here.close()


def test_the_server_backend_keeps_the_collection_in_sync_and_switches_models_blue_green(
        stage_outputs, tmp_path, monkeypatch):
    """The server path through qdrant-client (its local mode standing in for a server: same client API)."""
    from qdrant_client import QdrantClient

    from embedder.io import server_store
    from embedder.io.writers import write_dense_parquet

    cfg, load, dense, sparse = stage_outputs
    cfg = _config_in(cfg, tmp_path)
    client = QdrantClient(location=":memory:")
    store = open_store(tmp_path, client=client)
    assert store.backend == "server"
    first = st.index_stage(cfg, "sample", load.chunks, dense, sparse, store)
    assert (first.action, first.upserted, first.points_count, first.search_mode) == ("rebuilt", 50, 50, "server")
    assert store.physical("sample") == first.build_id != "sample"  # "sample" is an alias
    same = st.index_stage(cfg, "sample", load.chunks, dense, sparse, store)
    assert (same.action, same.upserted) == ("unchanged", 0)
    gone = {"coffee-0001", "bicycles-0002"}
    fewer = st.index_stage(cfg, "sample", *_subset(stage_outputs, lambda i: i not in gone, tmp_path, "s"), store)
    assert (fewer.action, fewer.upserted, fewer.deleted, fewer.points_count) == ("incremental", 0, 2, 48)
    vec = read_dense_parquet(dense.vectors.path)[1][0]
    assert not {c.id for c in store.query("sample", HybridQuery(dense=vec, limit=50))} & gone

    # Another model of another dimension: built beside the old collection, switched only when complete.
    ids, vecs = read_dense_parquet(dense.vectors.path)
    small = np.ascontiguousarray(vecs[:, :64]) / np.linalg.norm(vecs[:, :64], axis=1, keepdims=True)
    dense64 = dense.model_copy(update={"dim": 64, "vectors": write_dense_parquet(
        tmp_path / "d64.parquet", ids, small.astype(np.float32), "other")})
    real = server_store.ServerIndexWriter.upsert

    def failing(self, batch):
        raise VectorIndexError("injected: connection reset")

    monkeypatch.setattr(server_store.ServerIndexWriter, "upsert", failing)
    with pytest.raises(VectorIndexError, match="injected"):
        st.index_stage(cfg, "sample", load.chunks, dense64, sparse, store)
    assert store.physical("sample") == first.build_id and store.count("sample") == 48  # the old index serves
    assert [c.name for c in client.get_collections().collections] == [first.build_id]  # the half-built one is gone
    monkeypatch.setattr(server_store.ServerIndexWriter, "upsert", real)
    switched = st.index_stage(cfg, "sample", load.chunks, dense64, sparse, store)
    assert (switched.action, switched.points_count) == ("rebuilt", 50)
    assert store.status("sample").layout.dense_dim == 64
    assert [c.name for c in client.get_collections().collections] == [switched.build_id]
    assert len(store.query("sample", HybridQuery(dense=small[0], limit=5))) == 5
    store.close()


@pytest.fixture(scope="module")
def three_lists(tmp_path_factory: pytest.TempPathFactory):
    """Dense, BM25 and SPLADE-tiny over the sample, indexed by Edge and by the qdrant-client oracle."""
    from qdrant_client import QdrantClient

    out = tmp_path_factory.mktemp("three")
    cfg = RunConfig(collections=[CollectionInput(name="sample", path=str(SAMPLE_DIR))],
                    queries_path=str(SAMPLE_QUERIES), output_dir=str(out / "run"), local_files_only=True,
                    sparse={"models": ["qdrant-bm25", "splade-tiny"]}, force_cpu=True)
    col = cfg.collections[0]
    load = st.load_stage(cfg, col, st.load_key(cfg, col))
    dense = st.dense_stage(cfg, col.name, load.chunks, st.dense_key(cfg, col.name, load.chunks))
    sparse = st.sparse_stage(cfg, col.name, load.chunks, st.sparse_key(cfg, col.name, load.chunks))
    edge = open_store(str(out / "edge"))
    st.index_stage(_config_in(cfg, out / "edge"), "sample", load.chunks, dense, sparse, edge)
    oracle = open_store(cfg.output_dir, client=QdrantClient(location=":memory:"))
    st.index_stage(cfg, "sample", load.chunks, dense, sparse, oracle)
    yield dense, sparse, edge, oracle
    edge.close()
    oracle.close()


@pytest.mark.parametrize("method", ["rrf", "dbsf"])
def test_weighted_fusion_over_three_lists_agrees_with_both_stores(three_lists, method):
    """embedder.fusion's weighted fusion over dense + BM25 + SPLADE equals what search gets from each store.

    RRF: the engine's nested prefetch fusion. DBSF: the engine has no weights, so
    ``hybrid_search`` fuses each store's own lists.
    """
    from embedder.models.registry import get_spec

    dense, sparse, edge, oracle = three_lists
    ids, vecs = read_dense_parquet(dense.vectors.path)
    qids, qvecs = read_dense_parquet(dense.query_vectors.path)
    indexes = [DenseIndex(ids, vecs)]
    squeries = []
    # The 5 real queries, then 20 chunks used as queries (their own vectors in each space).
    as_queries = list(range(0, len(ids), max(1, len(ids) // 20)))[:20]
    qvecs = np.concatenate([qvecs, vecs[as_queries]])
    for o in sparse.outputs:
        docs = [SparseVector(**r["sparse_vector"]) for r in read_jsonl_records(o.vectors.path)]
        indexes.append(SparseIndex(ids, docs, use_idf=get_spec(o.model_name, "sparse").requires_idf))
        by_id = {r["id"]: SparseVector(**r["sparse_vector"]) for r in read_jsonl_records(o.query_vectors.path)}
        squeries.append([by_id[q] for q in qids] + [docs[i] for i in as_queries])
    assert [o.model_name for o in sparse.outputs] == ["qdrant-bm25", "splade-tiny"]
    weights = {"dense": 0.5, "sparse-qdrant-bm25": 1.5, "sparse-splade-tiny": 1.0}
    n, checked = 20, 0
    for qi in range(len(qvecs)):
        queries = [qvecs[qi], *(sq[qi] for sq in squeries)]
        lists = [index.search(q, n) for index, q in zip(indexes, queries)]
        if not all(len({round(c.score, 5) for c in lst}) == len(lst) for lst in lists):
            continue  # RRF is over ranks: tied scores may come in either order from two engines
        ours = (fuse_rrf([[c.id for c in lst] for lst in lists], k=60, weights=list(weights.values()))
                if method == "rrf" else fuse_dbsf(lists, weights=list(weights.values())))
        q = HybridQuery(dense=qvecs[qi], sparse={o.vector_name: sq[qi] for o, sq in zip(sparse.outputs, squeries)},
                        fusion=method, k=60, weights=weights, prefetch_limit=n, limit=len(ours), exact=True)
        _stores_score_as(ours, q, edge, oracle, search=hybrid_search)
        checked += 1
    assert checked >= 5
    # Unweighted and weighted fusion really differ on these lists (the weights reach the result).
    sq0 = {o.vector_name: sq[0] for o, sq in zip(sparse.outputs, squeries)}
    plain = hybrid_search(edge, "sample", HybridQuery(dense=qvecs[0], sparse=sq0, fusion=method, k=60,
                                                      prefetch_limit=n, limit=10, exact=True))
    weighted = hybrid_search(edge, "sample", HybridQuery(dense=qvecs[0], sparse=sq0, fusion=method, k=60,
                                                         weights=weights, prefetch_limit=n, limit=10, exact=True))
    assert [c.score for c in plain] != [c.score for c in weighted]
