import numpy as np
import pytest

from embedder.fusion import DenseIndex, SparseIndex, fuse_dbsf, fuse_rrf, retrieve_candidates
from embedder.schemas import ScoredCandidate, SparseVector


def test_rrf_hand_computed():
    # k=60: a = 1/61 + 1/62, b = 1/62 + 1/61, c = 1/63, d = 1/63
    fused = fuse_rrf([["a", "b", "c"], ["b", "a", "d"]], k=60)
    scores = {c.id: c.score for c in fused}
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert scores["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert scores["c"] == pytest.approx(1 / 63)
    assert scores["d"] == pytest.approx(1 / 63)
    assert [c.id for c in fused] == ["a", "b", "c", "d"]  # ties break by first appearance


def test_rrf_small_k_and_duplicates_count_once():
    fused = fuse_rrf([["x", "x", "y"]], k=1)
    assert [(c.id, c.score) for c in fused] == [("x", 0.5), ("y", pytest.approx(1 / 4))]


def test_dbsf_hand_computed():
    # list 1: scores 3, 2, 1 -> mean 2, sample sd 1 -> range [-1, 5] -> (s + 1) / 6
    # list 2: single item -> 0.5
    l1 = [ScoredCandidate(id="a", score=3), ScoredCandidate(id="b", score=2), ScoredCandidate(id="c", score=1)]
    l2 = [ScoredCandidate(id="c", score=100.0)]
    fused = {c.id: c.score for c in fuse_dbsf([l1, l2])}
    assert fused["a"] == pytest.approx(4 / 6)
    assert fused["b"] == pytest.approx(3 / 6)
    assert fused["c"] == pytest.approx(2 / 6 + 0.5)


def test_dbsf_zero_variance_and_empty():
    same = [ScoredCandidate(id=i, score=1.0) for i in "ab"]
    assert [c.score for c in fuse_dbsf([same, []])] == [0.5, 0.5]


def test_in_memory_retrieval_orders_by_score():
    vecs = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    dense = DenseIndex(["a", "b", "c"], vecs)
    sparse = SparseIndex(["a", "b", "c"], [SparseVector(indices=[1], values=[1.0]),
                                           SparseVector(indices=[2], values=[1.0]), None])
    lists = retrieve_candidates((np.array([1, 0], dtype=np.float32), [SparseVector(indices=[2], values=[1.0])]),
                                dense, [sparse], top_n=2)
    assert [c.id for c in lists[0]] == ["a", "b"]
    assert [c.id for c in lists[1]] == ["b"]
    # BM25-style IDF over the 2 documents that have vectors: ln(1 + (2 - 1 + 0.5) / 1.5)
    assert lists[1][0].score == pytest.approx(np.log(2.0))


def test_weighted_rrf_and_dbsf_hand_computed():
    from embedder.fusion import fuse_dbsf, fuse_rrf
    from embedder.schemas import ScoredCandidate

    # Qdrant's weighted RRF: a weight divides the rank, 1 / (k + rank / w); weight 0 drops the list.
    rrf = {c.id: c.score for c in fuse_rrf([["a", "b"], ["b", "c"], ["c"]], k=1, weights=[2.0, 1.0, 0.0])}
    assert rrf == pytest.approx({"a": 1 / (1 + 1 / 2), "b": 1 / (1 + 2 / 2) + 1 / (1 + 1), "c": 1 / (1 + 2)})
    lists = [[ScoredCandidate(id="a", score=3.0), ScoredCandidate(id="b", score=1.0)],
             [ScoredCandidate(id="b", score=5.0), ScoredCandidate(id="c", score=1.0)]]
    # A two-score list maps to 0.5 +- 1 / (6 sqrt 2): each is one sample sd from the mean, of +-3 sd.
    hi, lo = 0.5 + 1 / (6 * 2 ** 0.5), 0.5 - 1 / (6 * 2 ** 0.5)
    weighted = {c.id: c.score for c in fuse_dbsf(lists, weights=[0.5, 2.0])}
    assert weighted == pytest.approx({"a": 0.5 * hi, "b": 0.5 * lo + 2.0 * hi, "c": 2.0 * lo})
    with pytest.raises(ValueError, match="weights"):
        fuse_rrf([["a"], ["b"]], weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        fuse_dbsf(lists, weights=[1.0, -1.0])
