"""The FastAPI search service over a real run's Qdrant Edge index: in-process, then as real server processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from tests.conftest import REPO, SAMPLE_DIR, SAMPLE_QRELS, SAMPLE_QUERIES, free_port

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def run_output(tmp_path_factory: pytest.TempPathFactory, _tiny_ce_master: Path, prefect_harness):
    """One real run of the sample collection (with the tiny trained CrossEncoder) shared by the module."""
    from embedder.settings import CollectionInput, RunConfig
    from flows.embed_collections import embed_collections

    cfg = RunConfig(collections=[CollectionInput(name="sample", path=str(SAMPLE_DIR))],
                    queries_path=str(SAMPLE_QUERIES), qrels_path=str(SAMPLE_QRELS),
                    output_dir=str(tmp_path_factory.mktemp("service") / "out"), local_files_only=True,
                    rerank={"model": str(_tiny_ce_master)})
    [summary] = embed_collections(cfg)
    return cfg, summary


@pytest.fixture
def client(run_output) -> Iterator[TestClient]:
    from embedder.service import create_app

    cfg, _ = run_output
    with TestClient(create_app(cfg.output_dir)) as c:  # `with` runs the lifespan: one store per app
        yield c


def test_healthz_lists_collections(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["collections"] == ["sample"]


def test_search_hybrid_then_rerank(client):
    r = client.post("/search", json={"collection": "sample", "query": "what makes sourdough taste sour",
                                     "top_k": 3, "rerank": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fusion"] == "rrf" and not body["reranked"]
    assert body["hits"][0]["id"].startswith("sourdough-")
    assert "lactic" in body["hits"][0]["text_preview"]
    r = client.post("/search", json={"collection": "sample", "query": "sourdough sour taste", "top_k": 5})
    body = r.json()
    assert r.status_code == 200 and body["reranked"] and len(body["hits"]) == 5
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_search_ranks_as_the_runs_fusion_stage_at_any_top_k(client, run_output):
    """Fusion depends on how deep each list goes: search fuses lists as deep as the run's fusion stage did,
    so its top k is the stage's top k, whatever k the caller asks for."""
    import json

    cfg, summary = run_output
    queries = {r["_id"]: r["text"] for r in map(json.loads, Path(cfg.queries_path).open())}
    rows = [json.loads(line) for line in Path(summary.fusion_run.candidates_path).open()]
    assert len(rows) == len(queries) >= 5
    for row in rows:
        for k in (1, 3):
            r = client.post("/search", json={"collection": "sample", "query": queries[row["query_id"]],
                                             "top_k": k, "rerank": False})
            assert r.status_code == 200, r.text
            hits = r.json()["hits"]
            assert [h["id"] for h in hits] == [c["id"] for c in row["rrf"][:k]], (row["query_id"], k)
            assert [h["score"] for h in hits] == pytest.approx([c["score"] for c in row["rrf"][:k]], rel=1e-4)


def test_bad_input_is_422_naming_the_field(client):
    r = client.post("/search", json={"collection": "sample", "query": "x", "top_k": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "top_k"
    for name in ("../etc", "a..b"):
        r = client.post("/search", json={"collection": name, "query": "x"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "collection", name


def test_unknown_collection_is_404(client):
    r = client.post("/search", json={"collection": "nope", "query": "anything"})
    assert r.status_code == 404 and "unknown collection" in r.json()["detail"]


def test_no_published_index_is_503_with_the_reason(run_output, tmp_path):
    from embedder.service import create_app

    cfg, _ = run_output
    copy = tmp_path / "out"
    shutil.copytree(cfg.output_dir, copy)
    shutil.rmtree(copy / "sample" / "index")
    with TestClient(create_app(copy)) as c:
        r = c.post("/search", json={"collection": "sample", "query": "bees"})
        assert r.status_code == 503 and "which is missing from" in r.json()["detail"]
        (copy / "sample" / "current" / "index.json").unlink()
        r = c.post("/search", json={"collection": "sample", "query": "bees"})
        assert r.status_code == 503 and "no index has been published" in r.json()["detail"]
        (copy / "sample" / "qdrant").mkdir()  # an output dir written by the local-mode version
        r = c.post("/search", json={"collection": "sample", "query": "bees"})
        assert r.status_code == 503 and "written by an earlier version" in r.json()["detail"]


def test_run_summary_by_run_id(client, run_output):
    _, summary = run_output
    r = client.get(f"/runs/{summary.run_id}/summary")
    assert r.status_code == 200
    [s] = r.json()["summaries"]
    assert s["schema_version"] == "v4.1" and s["collection"] == "sample"
    assert client.get("/runs/00000000-0000-0000-0000-000000000000/summary").status_code == 404
    assert client.get("/runs/not-a-uuid/summary").status_code == 422


def test_openapi_declares_every_status_the_routes_return(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/search"]["post"]["responses"]) == {"200", "404", "409", "422", "503"}
    assert set(paths["/runs/{run_id}/summary"]["get"]["responses"]) == {"200", "404", "422"}


# --- real server processes ---------------------------------------------------------------------


def _start_service(output_dir: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "EMBEDDER_OUTPUT_DIR": output_dir, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "embedder.service:app", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"service did not start: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def two_services(run_output, tmp_path_factory) -> Iterator[list[str]]:
    """Two uvicorn processes serving the same output dir."""
    cfg, _ = run_output
    logs = tmp_path_factory.mktemp("service-logs")
    procs = []
    try:
        for i in range(2):
            procs.append(_start_service(cfg.output_dir, logs / f"service-{i}.log"))
        yield [url for _, url in procs]
    finally:
        for proc, _ in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


QUERIES = ["sourdough sour taste", "how do bees make honey", "volcano eruption", "espresso extraction",
           "photosynthesis light reactions", "chess openings", "GPU memory", "tides and the moon"]


def _search(url: str, i: int) -> int:
    r = httpx.post(f"{url}/search", json={"collection": "sample", "query": QUERIES[i % len(QUERIES)],
                                          "top_k": 5, "rerank": i % 2 == 0}, timeout=120)
    return r.status_code


@pytest.mark.slow
def test_fifty_concurrent_searches_on_two_processes_all_succeed(two_services):
    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(lambda i: _search(two_services[i % 2], i), range(50)))
    assert codes == [200] * 50


@pytest.mark.slow
def test_searches_succeed_while_a_second_run_reindexes(two_services, run_output, tmp_path):
    import json

    from embedder.io.edge_store import EdgeStore
    from embedder.settings import CollectionInput
    from flows.embed_collections import embed_collections

    cfg, _ = run_output
    # The same collection with one chunk edited, so the re-run has something to index.
    changed = tmp_path / "sample"
    shutil.copytree(SAMPLE_DIR, changed)
    chunks = json.loads((changed / "tides_chunks.json").read_text())
    chunks[0]["text"] += " Spring tides follow the new and the full moon."
    (changed / "tides_chunks.json").write_text(json.dumps(chunks))
    rerun_cfg = cfg.model_copy(update={"collections": [CollectionInput(name="sample", path=str(changed))]})
    before = EdgeStore(cfg.output_dir).status("sample").build_id
    with ThreadPoolExecutor(9) as pool:
        rerun = pool.submit(embed_collections, rerun_cfg)
        codes: list[int] = []
        i = 0
        while not rerun.done() or i < 40:
            codes.extend(pool.map(lambda j: _search(two_services[j % 2], j), range(i, i + 8)))
            i += 8
        [summary] = rerun.result()
    after = EdgeStore(cfg.output_dir).status("sample").build_id
    assert summary.index_run.action == "incremental" and summary.index_run.upserted == 1
    assert after != before  # a new shard was published
    assert codes == [200] * len(codes) and len(codes) >= 40
    assert _search(two_services[0], 1) == 200 and _search(two_services[1], 1) == 200  # both follow the switch


@pytest.mark.slow
def test_the_service_conforms_to_its_openapi_document(two_services):
    """Schemathesis against the running service: every response's status and body must match the spec.

    Driven through the programmatic API (its pytest plugin does not load under pytest 9).
    """
    schema = schemathesis.openapi.from_url(f"{two_services[0]}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /search", "GET /runs/{run_id}/summary",
                                                                       "GET /healthz"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            case.call_and_validate()

        check()


# Requests as a fuzzer or a broken client sends them, raw: each must be a 4xx naming what is wrong, never a 500,
# and the answer must not echo what was sent.
HOSTILE: list[tuple[bytes, str | None]] = [  # (body, the field the answer must name; None: the body as a whole)
    (b'{"collection": "sample", "query": "bees\\u0000 \\ud83d\\udc1d"}', "query"),  # NUL beside an emoji
    (b'{"collection": "sample", "query": "bees \\ud800 honey"}', "query"),  # a lone surrogate
    (b'{"collection": "sample", "query": "bees", "top_k": NaN}', "top_k"),
    (b'{"collection": "sample", "query": "bees", "top_k": Infinity}', "top_k"),
    (b'{"collection": "sample", "query": "bees", "top_k": -Infinity}', "top_k"),
    (b'{"collection": "sample", "query": "bees", "top_k": 1e400}', "top_k"),
    (b'{"collection": "sample", "query": "bees", "top_k": 1' + b"0" * 400 + b"}", "top_k"),
    (b'{"collection": "sample", "query": "bees", "rerank": "perhaps"}', "rerank"),
    (b'{"collection": "../sample", "query": "bees"}', "collection"),
    (b'{"collection": "sam\\u0000ple", "query": "bees"}', "collection"),
    (b'{"collection": "sample", "query": "' + b"x" * 5_000_000 + b'"}', "query"),
    (b'{"collection": "sample", "query": "   "}', "query"),
    (b'{"collection": "sample", "query": "bees"', None),
    (b"[" * 100_000 + b"]" * 100_000, None),
    (b"\xff\xfe\x00garbage", None),
    (b"", None),
]


@pytest.mark.slow
def test_hostile_requests_get_a_4xx_naming_the_field_never_a_500(two_services):
    for body, field in HOSTILE:
        r = httpx.post(f"{two_services[0]}/search", content=body, headers={"content-type": "application/json"},
                       timeout=60)
        assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:500])
        assert len(r.content) < 4096, (body[:80], len(r.content))
        if field is not None:
            assert r.status_code == 422 and [e["loc"][-1] for e in r.json()["detail"]] == [field], (body[:80], r.text)
    assert _search(two_services[0], 0) == 200 and _search(two_services[1], 1) == 200  # both still serve


@pytest.mark.slow
def test_a_dense_model_switch_under_load_never_pairs_one_runs_query_model_with_the_others_index(
        two_services, run_output, tiny_dense_model):
    """MiniLM (384) to a 64-dim model and back, while two service processes answer concurrent searches."""
    from embedder.io.edge_store import EdgeStore
    from flows.embed_collections import embed_collections

    cfg, _ = run_output
    dims = []
    with ThreadPoolExecutor(9) as pool:
        codes: list[int] = []
        for model in (str(tiny_dense_model), cfg.dense.model):
            switch = pool.submit(embed_collections, cfg.model_copy(update={"dense_model": model}))
            i = 0
            while not switch.done() or i < 24:
                codes.extend(pool.map(lambda j: _search(two_services[j % 2], j), range(i, i + 8)))
                i += 8
            [summary] = switch.result()
            assert summary.status == "completed" and summary.index_run.action == "rebuilt"
            dims.append(EdgeStore(cfg.output_dir).status("sample").layout.dense_dim)
    assert dims == [64, 384]
    assert codes == [200] * len(codes) and len(codes) >= 48
