"""Fusion over every list of a run, and fitting its weights and RRF k on a training split.

The fusion stage keeps each query's candidate lists (dense, then each sparse
model, with their scores). From those, this module fuses every combination of
two or more lists (RRF and DBSF) and fits per-list weights and RRF's k by
coordinate ascent on mean nDCG@10. The fit is honest about what it saw: it
reports the training fit and a k-fold cross-validated figure (each fold scored
with parameters fitted on the other folds), and :func:`fit_fusion` refuses a
split that is not a training split.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from embedder.fusion import fuse_dbsf, fuse_rrf
from embedder.quality import evaluate, ndcg_at_k
from embedder.schemas import ScoredCandidate

Method = Literal["rrf", "dbsf"]
WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
K_GRID = (5, 10, 20, 40, 60, 100)
PASSES = 3


@dataclass(frozen=True)
class QueryLists:
    """One query's candidate lists, by list name (``dense``, then each sparse model), best first."""

    query_id: str
    lists: dict[str, list[ScoredCandidate]]
    fused: dict[str, list[ScoredCandidate]] = field(default_factory=dict)
    """The fusion stage's own fused lists (``rrf``, ``dbsf``, with the run's weights), best first."""


def list_label(name: str) -> str:
    """A single list's name in quality reports: ``dense``, or ``sparse:<model>`` for each sparse model."""
    return name if name == "dense" else f"sparse:{name}"


def query_lists(rows: Iterable[Mapping[str, Any]]) -> list[QueryLists]:
    """The fusion stage's ``candidates.jsonl`` rows as :class:`QueryLists`: the one reader of that file."""
    out = []
    for row in rows:
        lists = {"dense": [ScoredCandidate(**c) for c in row["dense"]]}
        for model, lst in row["sparse"].items():
            lists[model] = [ScoredCandidate(**c) for c in lst]
        fused = {method: [ScoredCandidate(**c) for c in row[method]] for method in ("rrf", "dbsf") if method in row}
        out.append(QueryLists(str(row["query_id"]), lists, fused))
    return out


def fuse(q: QueryLists, names: Sequence[str], method: Method, k: int = 60,
         weights: Mapping[str, float] | None = None, limit: int = 100) -> list[str]:
    """One query's fused ranking over the lists ``names`` (ids, best first)."""
    w = [float((weights or {}).get(n, 1.0)) for n in names]
    lists = [q.lists.get(n, []) for n in names]
    fused = (fuse_rrf([[c.id for c in lst] for lst in lists], k=k, weights=w) if method == "rrf"
             else fuse_dbsf(lists, weights=w))
    return [c.id for c in fused[:limit]]


def every_fusion(queries: Sequence[QueryLists], qrels: Mapping[str, Mapping[str, int]], k: int = 60
                 ) -> dict[str, dict[str, float]]:
    """nDCG@10 and Recall@100 of every single list and of RRF and DBSF over every combination of lists.

    Keys: ``dense`` and ``sparse:<model>`` for the single lists; ``rrf:<a>+<b>``
    and ``dbsf:<a>+<b>`` (unweighted, RRF with ``k``) for each combination of two
    or more lists.
    """
    if not queries:
        return {}
    names = list(queries[0].lists)
    out = {list_label(n): evaluate({q.query_id: [c.id for c in q.lists.get(n, [])]
                                                             for q in queries}, qrels) for n in names}
    for size in range(2, len(names) + 1):
        for combo in itertools.combinations(names, size):
            for method in ("rrf", "dbsf"):
                run = {q.query_id: fuse(q, combo, method, k) for q in queries}
                out[f"{method}:{'+'.join(combo)}"] = evaluate(run, qrels)
    return out


def _mean_ndcg(queries: Sequence[QueryLists], qrels: Mapping[str, Mapping[str, int]], names: Sequence[str],
               method: Method, k: int, weights: Mapping[str, float]) -> float:
    judged = [q for q in queries if qrels.get(q.query_id)]
    if not judged:
        return 0.0
    return sum(ndcg_at_k(fuse(q, names, method, k, weights, limit=10), qrels[q.query_id]) for q in judged) / len(judged)


@dataclass
class FusionFit:
    """The fitted configuration and what it scores."""

    method: Method
    k: int
    weights: dict[str, float]
    lists: list[str]
    train_ndcg: float
    cv_ndcg: float | None = None
    folds: int = 0
    queries: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """The run settings this fit stands for (what ``--config`` reads)."""
        sparse = [n for n in self.lists if n != "dense"]
        return {"sparse": {"models": sparse},
                "fuse": {"method": self.method, "rrf_k": self.k,
                         "weights": {n: self.weights[n] for n in self.lists}}}


def _fit_one(queries: Sequence[QueryLists], qrels: Mapping[str, Mapping[str, int]], names: Sequence[str],
             method: Method) -> tuple[int, dict[str, float], float]:
    weights = dict.fromkeys(names, 1.0)
    k = 60
    best = _mean_ndcg(queries, qrels, names, method, k, weights)
    for _ in range(PASSES):
        improved = False
        # DBSF has no k; RRF's k is fitted beside the weights.
        for target in ([*names, "k"] if method == "rrf" else list(names)):
            for value in (K_GRID if target == "k" else WEIGHT_GRID):
                trial_k, trial_w = (value, weights) if target == "k" else (k, {**weights, target: value})
                if not any(trial_w.values()):
                    continue
                score = _mean_ndcg(queries, qrels, names, method, int(trial_k), trial_w)
                if score > best + 1e-9:
                    best, k, weights, improved = score, int(trial_k), trial_w, True
        if not improved:
            break
    return k, weights, best


def check_tuning_split(split: str) -> None:
    """Refuse to fit on a split that is not for training (callers check before any work is done).

    Raises:
        ValueError: If ``split`` is not a training split.
    """
    if not split.lower().startswith("train"):
        raise ValueError(f"fusion is fitted on a training split only, not {split!r}: a figure reported on the "
                         "split it was fitted on says nothing about new queries")


def fit_fusion(queries: Sequence[QueryLists], qrels: Mapping[str, Mapping[str, int]], split: str, *,
               methods: Sequence[Method] = ("rrf", "dbsf"), folds: int = 5, seed: int = 0) -> FusionFit:
    """Fit the fusion method, per-list weights and RRF k on a training split; cross-validate the fit.

    Args:
        queries: Every query's candidate lists (from the fusion stage).
        qrels: Relevance judgements of ``split``.
        split: The split's name; only a training split may be fitted on.
        folds: Folds for the cross-validated figure (0 or 1: none).

    Raises:
        ValueError: If ``split`` is not a training split, or nothing is judged.
    """
    check_tuning_split(split)
    judged = [q for q in queries if qrels.get(q.query_id)]
    if not judged:
        raise ValueError("no query of the split has relevance judgements")
    names = list(judged[0].lists)
    history = []
    best: tuple[float, Method, int, dict[str, float]] | None = None
    for method in methods:
        k, weights, score = _fit_one(judged, qrels, names, method)
        history.append({"method": method, "k": k, "weights": weights, "train_ndcg@10": round(score, 4)})
        if best is None or score > best[0]:
            best = (score, method, k, weights)
    assert best is not None
    score, method, k, weights = best
    cv = None
    if folds > 1 and len(judged) >= folds:
        order = list(judged)
        random.Random(seed).shuffle(order)
        held_scores = []
        for f in range(folds):
            held = order[f::folds]
            fit_on = [q for i, q in enumerate(order) if i % folds != f]
            fk, fw, _ = _fit_one(fit_on, qrels, names, method)
            held_scores.append(_mean_ndcg(held, qrels, names, method, fk, fw) * len(held))
        cv = sum(held_scores) / len(order)
    return FusionFit(method=method, k=k, weights=weights, lists=names, train_ndcg=score, cv_ndcg=cv,
                     folds=folds if cv is not None else 0, queries=len(judged), history=history)


def score_settings(queries: Sequence[QueryLists], qrels: Mapping[str, Mapping[str, int]],
                   settings: Mapping[str, Any], dense_model: str | None = None) -> dict[str, float] | str:
    """nDCG@10 and Recall@100 of a fusion configuration on these lists, or why it cannot be scored here.

    Args:
        dense_model: The run's dense vector model (``dense_run.model_name``); a configuration that
            names another dense model or blend is not scored on this run's dense list.
    """
    from embedder.settings import RunConfig

    # What the file leaves out is what a run would use: the defaults of the one definition.
    config = RunConfig.from_recorded(settings)
    if dense_model is not None and (config.is_set("dense.model") or config.is_set("dense.blend")):
        wanted = config.dense.name()
        if wanted != dense_model:
            blend = ",".join(f"{k}={v:g}" for k, v in config.dense.blend.items())
            return (f"needs the dense list of {wanted!r}, and this run's is {dense_model!r} "
                    f"(run with --config of this file, or --dense-blend {blend})")
    names = ["dense", *config.sparse.models]
    have = set(queries[0].lists) if queries else set()
    missing = [n for n in names if n not in have]
    if missing:
        return (f"needs the list(s) {missing}, which this run did not produce "
                f"(run with --sparse-models {','.join(config.sparse.models)})")
    fuse_settings = config.fuse
    run = {q.query_id: fuse(q, names, fuse_settings.method, fuse_settings.rrf_k, fuse_settings.weights)
           for q in queries}
    return evaluate(run, qrels)


def fit_to_toml(fit: FusionFit, meta: Mapping[str, Any], dense: Mapping[str, Any] | None = None) -> str:
    """A config file holding the fit: ``[embedder.*]`` settings (what ``--config`` reads) and ``[tuning]`` provenance.

    Args:
        dense: The run's recorded config (or its ``dense`` section); its dense model and blend are written
            when a blend made the dense list, since the weights were fitted on that list and mean little
            on another.
    """
    import json

    from embedder.settings import RunConfig

    settings = fit.settings()
    weights = ", ".join(f"{json.dumps(n)} = {w}" for n, w in settings["fuse"]["weights"].items())
    lines = ["# Fusion fitted by `embed-collections eval --tune` on a training split; read with --config."]
    run_dense = RunConfig.from_recorded(dense or {}).dense
    if run_dense.blend:
        blend = ", ".join(f"{json.dumps(n)} = {w}" for n, w in run_dense.blend.items())
        lines += ["[embedder.dense]", f"model = {json.dumps(run_dense.model)}", f"blend = {{ {blend} }}", ""]
    lines += ["[embedder.sparse]", f"models = {json.dumps(settings['sparse']['models'])}", "",
              "[embedder.fuse]", f"method = {json.dumps(settings['fuse']['method'])}",
              f"rrf_k = {settings['fuse']['rrf_k']}", f"weights = {{ {weights} }}", "", "[tuning]"]
    provenance = {**meta, "queries": fit.queries, "train_ndcg@10": round(fit.train_ndcg, 4),
                  "cv_ndcg@10": round(fit.cv_ndcg, 4) if fit.cv_ndcg is not None else None, "cv_folds": fit.folds}
    lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in provenance.items() if v is not None]
    return "\n".join(lines) + "\n"
