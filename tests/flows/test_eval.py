"""`embed-collections eval` on a BEIR-layout dataset built from the sample collection."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from embedder.errors import InputFormatError
from embedder.io.beir import prepare_beir
from embedder.io.readers import read_collection
from tests.conftest import REPO, SAMPLE_DIR, SAMPLE_QRELS, SAMPLE_QUERIES


@pytest.fixture
def beir_dir(tmp_path):
    root = tmp_path / "sample-beir"
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as fh:
        for chunk in read_collection(SAMPLE_DIR):
            fh.write(json.dumps({"_id": chunk.id, "title": chunk.metadata["heading_text"], "text": chunk.text}) + "\n")
    (root / "queries.jsonl").write_text(SAMPLE_QUERIES.read_text())
    (root / "qrels" / "test.tsv").write_text(SAMPLE_QRELS.read_text())
    return root


def test_layout_errors_name_the_missing_file_or_line(beir_dir, tmp_path):
    (beir_dir / "qrels" / "test.tsv").unlink()
    with pytest.raises(InputFormatError, match=r"missing .*qrels/test\.tsv"):
        prepare_beir(beir_dir, "test", tmp_path / "w")
    (beir_dir / "qrels" / "test.tsv").write_text(SAMPLE_QRELS.read_text())
    with open(beir_dir / "corpus.jsonl", "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(InputFormatError, match=r"corpus\.jsonl:51"):
        prepare_beir(beir_dir, "test", tmp_path / "w")


@pytest.mark.slow
def test_eval_json_reports_every_stage(beir_dir, tmp_path, tiny_cross_encoder):
    env_home = tmp_path / "home"
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "eval", "--beir-dir", str(beir_dir), "--split", "test", "--output-dir",
         str(tmp_path / "out"), "--json", "--local-files-only", "--rerank-model", str(tiny_cross_encoder)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "PREFECT_HOME": str(env_home)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    for key in ("dense", "sparse", "fused_rrf", "fused_dbsf", "reranked"):
        assert 0.0 <= report[key]["ndcg@10"] <= 1.0 and 0.0 <= report[key]["recall@100"] <= 1.0
    assert report["dense"]["ndcg@10"] > 0.7  # the paraphrase-style sample queries are easy for MiniLM
    assert report["queries"] == 5 and report["documents"] == 50
    assert report["models"]["dense"] == "all-minilm-l6-v2"
    summary = json.loads((tmp_path / "out" / "beir-sample-beir-test" / "processing_summary.json").read_text())
    assert summary["quality"]["dense"]["ndcg@10"] == pytest.approx(report["dense"]["ndcg@10"], abs=1e-4)
