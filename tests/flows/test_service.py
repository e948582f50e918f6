"""The FastAPI search service over a real run's local-mode Qdrant."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def served(sample_config, tiny_cross_encoder):
    from embedder.service import create_app
    from flows.embed_collections import embed_collections

    cfg = sample_config.model_copy(update={"rerank_model": str(tiny_cross_encoder)})
    [summary] = embed_collections(cfg)
    return TestClient(create_app(cfg.output_dir)), summary


def test_healthz_lists_collections(served):
    client, _ = served
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["collections"] == ["sample"]


def test_search_hybrid_then_rerank(served):
    client, _ = served
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


def test_bad_input_is_422_naming_the_field(served):
    client, _ = served
    r = client.post("/search", json={"collection": "sample", "query": "x", "top_k": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "top_k"
    r = client.post("/search", json={"collection": "../etc", "query": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "collection"


def test_unknown_collection_is_404(served):
    client, _ = served
    r = client.post("/search", json={"collection": "nope", "query": "anything"})
    assert r.status_code == 404 and "unknown collection" in r.json()["detail"]


def test_run_summary_by_run_id(served):
    client, summary = served
    r = client.get(f"/runs/{summary.run_id}/summary")
    assert r.status_code == 200
    [s] = r.json()["summaries"]
    assert s["schema_version"] == "v4.1" and s["collection"] == "sample"
    assert client.get("/runs/00000000-0000-0000-0000-000000000000/summary").status_code == 404
    assert client.get("/runs/not-a-uuid/summary").status_code == 422
