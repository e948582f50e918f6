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
from tests.helpers.homes import cli_env


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
        env=cli_env(env_home),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    for key in ("dense", "sparse:qdrant-bm25", "fused_rrf", "fused_dbsf", "reranked"):
        assert 0.0 <= report[key]["ndcg@10"] <= 1.0 and 0.0 <= report[key]["recall@100"] <= 1.0
    assert report["dense"]["ndcg@10"] > 0.7  # the paraphrase-style sample queries are easy for MiniLM
    assert report["queries"] == 5 and report["documents"] == 50
    assert report["models"]["dense"] == "all-minilm-l6-v2"
    summary = json.loads((tmp_path / "out" / "beir-sample-beir-test" / "processing_summary.json").read_text())
    assert summary["quality"]["dense"]["ndcg@10"] == pytest.approx(report["dense"]["ndcg@10"], abs=1e-4)


def _eval(beir_dir, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "eval", "--beir-dir", str(beir_dir), "--output-dir",
         str(tmp_path / "out"), "--json", "--local-files-only", "--disable-rerank", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=cli_env(tmp_path / "home"))


@pytest.mark.slow
def test_eval_fuses_every_list_tunes_on_train_only_and_reads_the_tuned_file(beir_dir, tmp_path):
    (beir_dir / "qrels" / "train.tsv").write_text(SAMPLE_QRELS.read_text())
    tuned = tmp_path / "fusion.toml"
    r = _eval(beir_dir, tmp_path, "--split", "train", "--sparse-models", "qdrant-bm25,splade-tiny",
              "--tune", str(tuned))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    # Every single list and every fusion of two or more lists, each under its one key: the run's summary
    # and eval's fusions name a list alike, so no list is reported twice.
    assert "sparse" not in report
    for key in ("dense", "sparse:qdrant-bm25", "sparse:splade-tiny", "rrf:dense+qdrant-bm25",
                "dbsf:qdrant-bm25+splade-tiny", "rrf:dense+qdrant-bm25+splade-tiny", "fused_rrf", "fused_dbsf"):
        assert 0.0 <= report[key]["ndcg@10"] <= 1.0, key
    # Unweighted fusion over all three lists is what the run's own fusion stage computed.
    assert report["fused_rrf"] == report["rrf:dense+qdrant-bm25+splade-tiny"]
    assert report["recommended"]["fitted_on"]["split"] == "train"
    # The recommendation blends E5 into the dense list. This run's dense list is MiniLM's alone, so the
    # recommendation is not scored on it (that figure would be of other lists) and says what it needs.
    assert "ndcg@10" not in report["recommended"]
    assert "multilingual-e5-small-q4" in report["recommended"]["reason"]
    fit = report["tuned"]
    assert fit["file"] == str(tuned) and tuned.is_file()
    assert fit["train_ndcg@10"] >= max(report[f"{m}:dense+qdrant-bm25+splade-tiny"]["ndcg@10"]
                                       for m in ("rrf", "dbsf")) - 1e-4

    # The tuned file drives a run: its fusion stage applies the fitted weights and k.
    r2 = _eval(beir_dir, tmp_path, "--split", "train", "--config", str(tuned))
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.loads(r2.stdout)
    method = fit["settings"]["fuse"]["method"]
    assert again[f"fused_{method}"]["ndcg@10"] == pytest.approx(fit["train_ndcg@10"], abs=1e-4)
    summary = json.loads((tmp_path / "out" / "beir-sample-beir-train" / "processing_summary.json").read_text())
    assert summary["fusion_run"]["weights"] == fit["settings"]["fuse"]["weights"]

    # Fitting on a split that is not for training is refused before anything runs.
    r3 = _eval(beir_dir, tmp_path / "refused", "--split", "test", "--tune", str(tmp_path / "never.toml"))
    assert r3.returncode == 2 and "training split only" in " ".join(r3.stderr.split())
    assert not (tmp_path / "never.toml").exists() and not (tmp_path / "refused" / "out").exists()
