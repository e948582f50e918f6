"""Stage keys are derived from what each stage reads, and a stage served from its key is what a fresh run gives.

A re-run serves a stage's stored result when its key matches. A setting that
changes a stage's output but does not move its key would serve a stale result
silently, so every setting either moves the keys of the stages that read it
(``SETTINGS_READ``) or says why it moves none (``NOT_IN_KEYS``). The property
test changes every setting, one at a time, on a collection that ran before:
the stages that read it run again, the others are served from their keys
(as the flow's task cache serves them), and every stage's result equals the
result of a fresh run with the changed settings in another output dir.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from embedder import stages as st
from embedder.settings import (
    NOT_IN_KEYS,
    SETTING_PATHS,
    SETTINGS_READ,
    CollectionInput,
    RunConfig,
    stage_settings,
)
from tests.conftest import SAMPLE_DIR, SAMPLE_QRELS, SAMPLE_QUERIES

STAGES = ("load", "dense", "sparse", "fuse", "rerank")
# What each stage's key takes from the stages before it.
UPSTREAM = {"load": (), "dense": ("load",), "sparse": ("load",), "fuse": ("dense", "sparse"),
            "rerank": ("load", "fuse")}
# How a stage's run went, not what it computed: left out when results are compared.
_HOW_IT_WENT = {"path", "latency_ms", "telemetry", "computed", "reused", "lease_event", "integrity", "run_id",
                "components", "warnings", "device", "batch_size", "batches", "backoffs", "token_budget",
                "padding_ratio", "gpu_work_s", "tokenise_s"}


def _changes(tiny_dense_model: Path, other_queries: Path) -> dict[str, Any]:
    """A different, valid value for every setting a user may change."""
    return {
        "queries_path": str(other_queries),
        "qrels_path": str(SAMPLE_QRELS),
        "dense.model": "all-minilm-l6-v2",
        "dense.backend": "onnx",
        "dense.blend": {"all-minilm-l6-v2": 0.25},
        "sparse.models": ["qdrant-bm25", "splade-tiny"],
        "rerank.model": "BAAI/bge-reranker-base",  # not on this disk: the stage reports it unavailable
        "sparse.enabled": False,
        "rerank.enabled": False,
        "rerank.top_k_candidates": 7,
        "rerank.top_k": 3,
        "rerank.latency_budget_ms": 600_000.0,
        "fuse.method": "dbsf",
        "fuse.rrf_k": 10,
        "fuse.weights": {"dense": 2.0},
        "fuse.retrieval_top_n": 9,
        "gpu.memory_ceiling_gb": 6.0,
        "gpu.concurrency_limit_name": "gpu-other",
        "gpu.lease_timeout_s": 60.0,
        "gpu.lease_duration_s": 120.0,
        "query_policy": {"mode": "hash"},
        "local_files_only": False,
        "force_cpu": True,
        "max_chunk_chars": 200,
        "index.batch_size": 7,
        "index.hnsw_min_points": 10,
        "orchestration.collection_fanout": "subflows",
        "orchestration.collection_deployment": "other/collection",
        "orchestration.collection_lock_timeout_s": 60.0,
        "sparse.overlap": False,
        "stream.window": 7,
        "stream.vector_checkpoint_s": 0.0,
        "stream.vector_retention_days": None,
        "dense.precision": "fp32",
        "sparse.precision": "fp32",
        "rerank.precision": "fp32",
        "gpu.batch_policy": "tokens",
        "gpu.cpu_batch_items": 3,
    }


# Settings that name the run itself: another collection or output dir is another store, keyed apart.
_OWNER = {"collections", "output_dir"}


def _pipeline(cfg: RunConfig, cache: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """Every keyed stage's result, each served from ``cache`` when its key is there, as the task cache does."""
    col = cfg.collections[0]
    served: set[str] = set()

    def step(stage: str, key: str, compute: Callable[[str], Any]) -> Any:
        if key in cache:
            served.add(stage)
            return cache[key]
        cache[key] = result = compute(key)
        return result

    load = step("load", st.load_key(cfg, col), lambda k: st.load_stage(cfg, col, k))
    dense = step("dense", st.dense_key(cfg, col.name, load.chunks),
                 lambda k: st.dense_stage(cfg, col.name, load.chunks, k))
    sparse = step("sparse", st.sparse_key(cfg, col.name, load.chunks),
                  lambda k: st.sparse_stage(cfg, col.name, load.chunks, k))
    fusion = step("fuse", st.fuse_key(cfg, col.name, dense, sparse),
                  lambda k: st.fuse_stage(cfg, col.name, dense, sparse, k))
    rerank = step("rerank", st.rerank_key(cfg, col.name, load.chunks, fusion),
                  lambda k: st.rerank_stage(cfg, col.name, load.chunks, fusion, k))
    return {"load": load, "dense": dense, "sparse": sparse, "fuse": fusion, "rerank": rerank}, served


def _what_it_computed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _what_it_computed(v) for k, v in value.items() if k not in _HOW_IT_WENT}
    if isinstance(value, list):
        return [_what_it_computed(v) for v in value]
    return value


def _results(results: dict[str, Any]) -> dict[str, Any]:
    """What each stage computed, its files by digest: what the keys of the stages after it take."""
    return {stage: _what_it_computed(r.model_dump(mode="json")) for stage, r in results.items()}


def _file_content(path: str) -> Any:
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()] if path.endswith(".jsonl") \
        else json.loads(text)


def _contents(value: Any) -> Any:
    """What a stage computed, its files read: two runs' vectors agree to float rounding, not to the bit
    (another batch cut pads differently)."""
    if isinstance(value, dict):
        if "digest" in value and "path" in value:
            return _file_content(value["path"])
        return {k: _contents(v) for k, v in value.items() if k not in _HOW_IT_WENT}
    if isinstance(value, list):
        return [_contents(v) for v in value]
    return value


def _agree(a: Any, b: Any, where: str = "") -> str | None:
    """Where ``a`` and ``b`` part (floats within 1e-5), or None."""
    if isinstance(a, float) and isinstance(b, (int, float)) or isinstance(b, float) and isinstance(a, int):
        return None if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) else f"{where}: {a} != {b}"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a.keys() ^ b.keys())}"
        return next((d for k in a if (d := _agree(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} != {len(b)} items"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _agree(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def other_queries(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample queries with one query's text edited (its id kept)."""
    rows = [json.loads(line) for line in SAMPLE_QUERIES.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows[0]["text"] = rows[0]["text"] + " and what follows from it"
    path = tmp_path_factory.mktemp("queries") / "queries.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# Half the sample: the five documents the sample queries are about (25 chunks), still more than every
# window, batch and top-n the changes below set, so each change still moves what it moves.
_SUBSET = ("photosynthesis", "gpus", "volcanoes", "vector_search", "sourdough")


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the sample collection's files about the sample queries."""
    root = tmp_path_factory.mktemp("subset")
    for name in _SUBSET:
        shutil.copyfile(SAMPLE_DIR / f"{name}_chunks.json", root / f"{name}_chunks.json")
    return root


def _config(out: Path, tiny_cross_encoder: Path, tiny_dense_model: Path, collection: Path = SAMPLE_DIR,
            **changes: Any) -> RunConfig:
    """The base config, with ``changes`` (by setting path) applied.

    The tiny models keep the property test's forty-odd runs cheap; the default dense model is one of the
    changes, so a switch to a real model is among the settings tried."""
    base = RunConfig(collections=[CollectionInput(name="sample", path=str(collection))],
                     queries_path=str(SAMPLE_QUERIES), output_dir=str(out), local_files_only=True,
                     dense={"model": str(tiny_dense_model)}, rerank={"model": str(tiny_cross_encoder)})
    return base.model_copy(update=changes) if changes else base


def test_every_setting_moves_the_keys_of_the_stages_that_read_it_or_says_why_not(tiny_dense_model, other_queries):
    fields = set(SETTING_PATHS)
    assert set(SETTINGS_READ) == set(STAGES)
    read = set().union(*SETTINGS_READ.values())
    assert read <= fields and set(NOT_IN_KEYS) <= fields
    assert not read & set(NOT_IN_KEYS), "a setting is both read by a stage and said to move no key"
    assert read | set(NOT_IN_KEYS) == fields, f"undeclared: {sorted(fields - read - set(NOT_IN_KEYS))}"
    assert all(len(reason) > 20 for reason in NOT_IN_KEYS.values())
    # Every setting a user may change has a test value here, so a new setting cannot skip the property test.
    assert set(_changes(tiny_dense_model, other_queries)) | _OWNER == fields


def test_a_stage_key_holds_its_settings_and_nothing_else(tmp_path, tiny_cross_encoder, tiny_dense_model,
                                                          other_queries):
    base = _config(tmp_path / "out", tiny_cross_encoder, tiny_dense_model)
    for name, value in _changes(tiny_dense_model, other_queries).items():
        changed = base.model_copy(update={name: value})
        assert changed.setting(name) != base.setting(name), name
        for stage in STAGES:
            moved = stage_settings(changed, stage) != stage_settings(base, stage)
            assert moved == (name in SETTINGS_READ[stage]), (name, stage)


@pytest.mark.slow
def test_each_setting_changed_alone_recomputes_exactly_its_readers_and_matches_a_fresh_run(
        tmp_path, tiny_cross_encoder, tiny_dense_model, other_queries, collection):
    base_cfg = _config(tmp_path / "kept", tiny_cross_encoder, tiny_dense_model, collection)
    cache: dict[str, Any] = {}
    base, served = _pipeline(base_cfg, cache)
    assert not served and base["rerank"].status == "executed" and base["fuse"].status == "executed"
    base_results = _results(base)
    # Another output dir computes the same results: what the comparison below relies on.
    fresh_base = _config(tmp_path / "fresh-base", tiny_cross_encoder, tiny_dense_model, collection)
    assert _results(_pipeline(fresh_base, {})[0]) == base_results

    for name, value in _changes(tiny_dense_model, other_queries).items():
        kept_cache = dict(cache)  # every change starts from the base run's stored results
        results, served = _pipeline(_config(tmp_path / "kept", tiny_cross_encoder, tiny_dense_model, collection,
                                                    **{name: value}),
                                    kept_cache)
        fresh, _ = _pipeline(_config(tmp_path / f"fresh-{name}", tiny_cross_encoder, tiny_dense_model, collection,
                                       **{name: value}),
                             {})
        got = _results(results)
        for stage in STAGES:
            differs = _agree(_contents(results[stage].model_dump(mode="json")),
                             _contents(fresh[stage].model_dump(mode="json")), stage)
            assert differs is None, f"{name}: {stage} gave what a fresh run does not: {differs}"
            reads = name in SETTINGS_READ[stage]
            inputs_same = all(got[up] == base_results[up] for up in UPSTREAM[stage])
            assert (stage in served) == (not reads and inputs_same), (name, stage, sorted(served))
