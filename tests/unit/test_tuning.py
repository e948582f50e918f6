"""Fusion over every list and fitting its weights on a training split (embedder.tuning)."""

from __future__ import annotations

import random

import pytest

from embedder.errors import ConfigError
from embedder.schemas import ScoredCandidate
from embedder.settings import RunConfig, load_config_file, resolve_run_config
from embedder.tuning import QueryLists, every_fusion, fit_fusion, fit_to_toml, fuse, score_settings


def _synthetic(n_queries: int = 60, seed: int = 0) -> tuple[list[QueryLists], dict[str, dict[str, int]]]:
    """Three lists per query: 'dense' finds the relevant doc near the top, 'bm25' often, 'noise' never."""
    rng = random.Random(seed)
    queries, qrels = [], {}
    for qi in range(n_queries):
        rel = f"q{qi}-rel"
        qrels[f"q{qi}"] = {rel: 1}
        pool = [f"q{qi}-d{j}" for j in range(30)]

        def ranked(rel_rank: int | None, pool: list[str] = pool, rel: str = rel) -> list[ScoredCandidate]:
            ids = rng.sample(pool, len(pool))
            if rel_rank is not None:
                ids.insert(rel_rank, rel)
            return [ScoredCandidate(id=d, score=float(len(ids) - i)) for i, d in enumerate(ids)]

        queries.append(QueryLists(f"q{qi}", {"dense": ranked(rng.randint(0, 3)),
                                             "qdrant-bm25": ranked(rng.choice([0, 1, 8, None])),
                                             "splade-tiny": ranked(None)}))
    return queries, qrels


def test_every_list_and_every_combination_is_reported():
    queries, qrels = _synthetic()
    report = every_fusion(queries, qrels)
    assert {"dense", "sparse:qdrant-bm25", "sparse:splade-tiny"} <= set(report)
    combos = {k for k in report if ":" in k and not k.startswith("sparse:")}
    # 3 pairs + 1 triple, each by RRF and DBSF.
    assert len(combos) == 8 and "rrf:dense+qdrant-bm25+splade-tiny" in combos
    assert report["sparse:splade-tiny"]["ndcg@10"] == 0.0
    assert report["dense"]["ndcg@10"] > report["rrf:dense+qdrant-bm25+splade-tiny"]["ndcg@10"]


def test_fit_weights_the_useful_lists_and_cross_validates():
    queries, qrels = _synthetic()
    fit = fit_fusion(queries, qrels, "train", folds=3)
    plain = every_fusion(queries, qrels)
    best_plain = max(plain[f"{m}:dense+qdrant-bm25+splade-tiny"]["ndcg@10"] for m in ("rrf", "dbsf"))
    assert fit.train_ndcg >= best_plain
    assert fit.weights["splade-tiny"] < fit.weights["dense"]  # the list that never finds anything
    assert fit.cv_ndcg is not None and 0 < fit.cv_ndcg <= 1 and fit.folds == 3
    # The fitted settings reproduce the fitted score.
    scored = score_settings(queries, qrels, fit.settings())
    assert scored["ndcg@10"] == pytest.approx(fit.train_ndcg)


def test_fit_refuses_a_split_that_is_not_for_training():
    queries, qrels = _synthetic()
    with pytest.raises(ValueError, match="training split only"):
        fit_fusion(queries, qrels, "test")


def test_a_fit_file_round_trips_into_a_run_config(tmp_path):
    queries, qrels = _synthetic(30)
    fit = fit_fusion(queries, qrels, "train", folds=0)
    path = tmp_path / "fusion.toml"
    path.write_text(fit_to_toml(fit, {"dataset": "synthetic", "split": "train"}))
    settings = load_config_file(path)
    assert settings == fit.settings()
    config = resolve_run_config(path, read_env=False)
    assert config.fuse.method == fit.method and config.fuse.weights == fit.weights
    assert config.sources["fuse.weights"] == "file" and config.flat_names == []


def test_weights_must_name_lists_of_the_run():
    with pytest.raises(ValueError, match="not lists of this run"):
        RunConfig(fuse={"weights": {"splade-tiny": 1.0}})
    with pytest.raises(ValueError, match="non-negative"):
        RunConfig(fuse={"weights": {"dense": -1.0}})
    with pytest.raises(ConfigError):
        resolve_run_config(None, {"fuse.weights": {"nope": 1.0}}, read_env=False)


def test_the_packaged_recommendation_loads_and_says_where_it_was_fitted():
    import tomllib

    from embedder.settings import RECOMMENDED_CONFIG

    config = resolve_run_config("recommended", read_env=False)
    meta = tomllib.loads(RECOMMENDED_CONFIG.read_text())["tuning"]
    assert meta["split"] == "train" and meta["dataset"] == "scifact"
    assert set(config.fuse.weights) == {"dense", *config.sparse.models}
    assert config.dense.blend == {"multilingual-e5-small-q4": 0.9}


def test_settings_of_another_dense_list_are_not_scored_on_this_one():
    queries, qrels = _synthetic(5)
    settings = {"dense_blend": {"multilingual-e5-small-q4": 0.9}, "sparse_models": ["qdrant-bm25", "splade-tiny"]}
    reason = score_settings(queries, qrels, settings, dense_model="all-minilm-l6-v2")
    assert isinstance(reason, str) and "--dense-blend multilingual-e5-small-q4=0.9" in reason
    scored = score_settings(queries, qrels, settings, dense_model="all-minilm-l6-v2*0.1+multilingual-e5-small-q4*0.9")
    plain = score_settings(queries, qrels, {"sparse_models": settings["sparse_models"]})
    assert isinstance(scored, dict) and scored == plain


def test_a_fit_on_a_blended_dense_list_writes_the_blend_into_its_file(tmp_path):
    import tomllib

    queries, qrels = _synthetic(12)
    fit = fit_fusion(queries, qrels, "train", folds=0)
    text = fit_to_toml(fit, {"dataset": "synthetic", "split": "train"},
                       {"dense_model": "all-minilm-l6-v2", "dense_blend": {"multilingual-e5-small-q4": 0.9}})
    (tmp_path / "tuned.toml").write_text(text)
    loaded = load_config_file(tmp_path / "tuned.toml")
    assert loaded["dense"] == {"model": "all-minilm-l6-v2", "blend": {"multilingual-e5-small-q4": 0.9}}
    assert tomllib.loads(text)["embedder"]["fuse"]["weights"] == fit.settings()["fuse"]["weights"]
    # The run's recorded config, as a summary of this release writes it (sectioned) or an earlier one (flat).
    for recorded in ({"dense": {"model": "all-minilm-l6-v2", "blend": {}}},
                     {"dense_model": "all-minilm-l6-v2", "dense_blend": {}}):
        assert "blend" not in fit_to_toml(fit, {"split": "train"}, recorded)


def test_scoring_settings_that_need_a_missing_list_says_so():
    queries, qrels = _synthetic(5)
    two = [QueryLists(q.query_id, {k: v for k, v in q.lists.items() if k != "splade-tiny"}) for q in queries]
    reason = score_settings(two, qrels, {"sparse_models": ["qdrant-bm25", "splade-tiny"]})
    assert isinstance(reason, str) and "splade-tiny" in reason
    assert fuse(queries[0], ["dense"], "rrf")[0] == queries[0].lists["dense"][0].id
