import ir_measures
import pytest
from ir_measures import R, nDCG

from embedder.quality import evaluate, ndcg_at_k, recall_at_k


def test_ndcg_and_recall_hand_computed():
    assert ndcg_at_k(["d2", "d1"], {"d1": 1}, 10) == pytest.approx(1 / 1.5849625007211563)
    assert recall_at_k(["d1", "x"], {"d1": 1, "d2": 1}, 100) == 0.5


def test_metrics_agree_with_trec_eval_via_ir_measures():
    qrels = {"q1": {"d1": 2, "d3": 1, "d9": 1}, "q2": {"d4": 1}, "q3": {"d7": 1}}
    run = {"q1": ["d3", "d2", "d1", "d5"], "q2": ["d8", "d6", "d4"], "q3": ["d1", "d2"]}
    ours = evaluate(run, qrels)
    qrels_list = [ir_measures.Qrel(q, d, r) for q, docs in qrels.items() for d, r in docs.items()]
    run_list = [ir_measures.ScoredDoc(q, d, float(100 - i)) for q, docs in run.items() for i, d in enumerate(docs)]
    ref = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], qrels_list, run_list)
    assert ours["ndcg@10"] == pytest.approx(ref[nDCG @ 10], abs=1e-9)
    assert ours["recall@100"] == pytest.approx(ref[R @ 100], abs=1e-9)
