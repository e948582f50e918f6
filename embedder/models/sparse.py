"""Live sparse inference (fastembed BM25, SPLADE) with a per-chunk metadata fallback.

The fallback builds a chunk's vector from ``metadata.sparse_features.term_weights``
in the same index space as the live model: for BM25 it applies fastembed's own
pipeline (lower-casing, punctuation and stopword removal, the Snowball stemmer,
``abs(mmh3.hash(token))`` ids and the BM25 term-frequency saturation), so a BM25
query vector scores fallback documents exactly as it scores live ones.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
import time
import unicodedata
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embedder.cancel import raise_if_stopped
from embedder.errors import ModelUnavailableError
from embedder.models.loading import loaded
from embedder.models.registry import ModelSpec, ResolvedModel
from embedder.schemas import Chunk, Query, SparseInferenceRun, SparseVector, StageTelemetry

log = logging.getLogger(__name__)

STOPWORDS_FILE = "english.txt"

# fastembed's Bm25 defaults; changing them changes the index space.
BM25_K = 1.2
BM25_B = 0.75
BM25_AVG_LEN = 256.0
BM25_TOKEN_MAX_LENGTH = 40
# How much a metadata-fallback vector is credited for the terms its metadata dropped; chosen on the
# odd SciFact train queries (bench/fallback.py), where 0.5 beat 0.25 and 1.0.
FALLBACK_SHARE_EXPONENT = 0.5


class SparseModel(Protocol):
    """What the sparse stage needs from a model."""

    name: str

    def embed(self, texts: Sequence[str]) -> list[SparseVector]:
        """Document vectors."""
        ...

    def query_embed(self, texts: Sequence[str]) -> list[SparseVector]:
        """Query vectors."""
        ...


def _to_sparse(indices: Any, values: Any) -> SparseVector:
    idx = np.fromiter((int(i) for i in indices), dtype=np.int64) if not isinstance(indices, np.ndarray) else indices
    val = np.fromiter((float(v) for v in values), dtype=np.float64) if not isinstance(values, np.ndarray) else values
    if idx.shape != val.shape:
        raise ValueError(f"sparse vector has {idx.size} indices but {val.size} values")
    order = np.argsort(idx, kind="stable")
    # Values are float32, as the index and the reuse cache store them: a vector computed now and the
    # same vector reused from the cache must be the same numbers, or an unchanged chunk's exported
    # vector would change on the run that reuses it. model_construct skips pydantic's per-element
    # checks (validated above) on the hot path.
    return SparseVector.model_construct(indices=idx[order].tolist(), values=val[order].astype(np.float32).tolist())


def check_stopwords(model_dir: str | Path) -> Path:
    """Fail loudly when the BM25 stopword list is missing: fastembed would silently use none.

    Raises:
        ModelUnavailableError: If ``english.txt`` is missing or empty.
    """
    path = Path(model_dir) / STOPWORDS_FILE
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        raise ModelUnavailableError(
            f"BM25 stopword list {path} is missing or empty; fastembed would silently use no stopwords. "
            "Reinstall embedder (the file ships in embedder/models/data/bm25/)"
        )
    return path


# Non-word, non-space characters: fastembed's remove_non_alphanumeric replaces them with a space.
_NOT_WORD_OR_SPACE = re.compile(r"[^\w\s]", flags=re.UNICODE)
_WORD = re.compile(r"\w+")


@lru_cache(maxsize=4)
def _stopwords(path: str) -> frozenset[str]:
    return frozenset(Path(path).read_text(encoding="utf-8").splitlines())


class Bm25Terms:
    """fastembed's BM25 pipeline, in one place: documents, queries and the metadata fallback.

    The steps are fastembed's ``Bm25`` (``remove_non_alphanumeric``,
    ``SimpleTokenizer``, ``_stem``, ``compute_token_id``, ``_term_frequency``,
    ``query_embed``) over the same stopword list, Snowball stemmer and
    ``abs(mmh3.hash)`` ids, so its vectors are fastembed's numbers. What differs
    is the cost: a distinct token is stemmed and hashed once (memoised) and a
    batch's occurrences are counted in numpy, where fastembed runs the stemmer
    and the hash once per occurrence, in Python. :func:`bm25_checked` compares
    it with fastembed's own loop before a model trusts it.

    ``\\w+`` over the cleaned, lower-cased text splits exactly where fastembed's
    ``SimpleTokenizer`` does: that replaces every non-word character with a
    space and splits on whitespace, and no word character is whitespace.

    Args:
        model_dir: The BM25 model directory holding the ``english.txt`` stopword list.
    """

    # Distinct tokens remembered; past it the memo starts again (a million chunks can hold millions).
    MEMO_LIMIT = 1_000_000

    def __init__(self, model_dir: str | Path) -> None:
        from py_rust_stemmers import SnowballStemmer

        self.stopwords = _stopwords(str(check_stopwords(model_dir)))
        self._stemmer = SnowballStemmer("english")
        # One instance serves every thread of a process; a batch's stem numbers must outlive its own lookups.
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._token: dict[str, int] = {}  # token -> its stem's number, -1 where fastembed drops it
        self._stem: dict[str, int] = {}  # stem -> its number
        self._ids: list[int] = []  # stem number -> its token id
        self._ids_np = np.zeros(0, dtype=np.int64)  # the ids as an array; the first _filled are set
        self._filled = 0

    @staticmethod
    def token_id(stem: str) -> int:
        """fastembed's ``Bm25.compute_token_id``."""
        import mmh3

        return abs(mmh3.hash(stem))

    @staticmethod
    def tokens(text: str) -> list[str]:
        """``remove_non_alphanumeric`` then ``SimpleTokenizer.tokenize``."""
        return _WORD.findall(_NOT_WORD_OR_SPACE.sub(" ", text).lower())

    def _stem_of(self, token: str) -> str | None:
        """``Bm25._stem`` for one token: None where fastembed drops it."""
        lower = token.lower()
        # fastembed's punctuation set holds single code points of a Unicode "P*" category; "_" is one.
        if len(token) == 1 and unicodedata.category(token).startswith("P"):
            return None
        if lower in self.stopwords or len(token) > BM25_TOKEN_MAX_LENGTH:
            return None
        return self._stemmer.stem_word(lower) or None

    def stems(self, text: str) -> list[str]:
        """The stemmed tokens of a text that fastembed counts, in order."""
        return [s for s in map(self._stem_of, self.tokens(text)) if s is not None]

    @staticmethod
    def tf_vector(counts: dict[str, float], doc_len: float) -> SparseVector:
        """``Bm25._term_frequency`` for counted stems, in first-seen order.

        Two stems with one id keep the later stem's value, as fastembed's dict does.
        """
        values: dict[int, float] = {}
        for stem, count in counts.items():
            value = count * (BM25_K + 1)
            values[Bm25Terms.token_id(stem)] = value / (count + BM25_K * (1 - BM25_B + BM25_B * doc_len
                                                                          / BM25_AVG_LEN))
        return _to_sparse(values.keys(), values.values())

    def document_vector(self, text: str) -> SparseVector:
        """One document's vector, a token at a time (fastembed's loop, for one text)."""
        stems = self.stems(text)
        counts: dict[str, float] = {}
        for stem in stems:
            counts[stem] = counts.get(stem, 0) + 1
        return self.tf_vector(counts, len(stems))

    def query_vector(self, text: str) -> SparseVector:
        """``Bm25.query_embed``: each distinct stem's id, with weight 1."""
        ids = sorted({self.token_id(s) for s in self.stems(text)})
        return SparseVector.model_construct(indices=ids, values=[1.0] * len(ids))

    def _numbers(self, distinct: list[str]) -> np.ndarray:
        """Each token's stem number (-1: dropped), stemming and hashing the tokens not seen before."""
        if len(self._token) + len(distinct) > self.MEMO_LIMIT:
            self._reset()
        memo, numbers = self._token, self._stem
        for token in distinct:
            if token not in memo:
                stem = self._stem_of(token)
                if stem is None:
                    memo[token] = -1
                    continue
                number = numbers.get(stem)
                if number is None:
                    number = numbers[stem] = len(self._ids)
                    self._ids.append(self.token_id(stem))
                memo[token] = number
        filled, total = self._filled, len(self._ids)
        if total > filled:
            if total > len(self._ids_np):
                # Grown by doubling, so a long run copies the ids O(log n) times, not once per batch.
                grown = np.empty(max(total, 2 * len(self._ids_np)), dtype=np.int64)
                grown[:filled] = self._ids_np[:filled]
                self._ids_np = grown
            self._ids_np[filled:total] = self._ids[filled:]
            self._filled = total
        return np.fromiter((memo[t] for t in distinct), dtype=np.int64, count=len(distinct))

    def document_vectors(self, texts: Sequence[str]) -> list[SparseVector]:
        """Document vectors for a batch, indices ascending and values float32 (as :func:`_to_sparse` gives)."""
        if not texts:
            return []
        with self._lock:
            return self._batch(texts)

    def _batch(self, texts: Sequence[str]) -> list[SparseVector]:
        import pyarrow as pa
        import pyarrow.compute as pc

        n = len(texts)
        tokens = [self.tokens(text) for text in texts]
        flat = pa.array(itertools.chain.from_iterable(tokens), type=pa.large_string())
        encoded = pc.dictionary_encode(flat)
        stem = self._numbers(encoded.dictionary.to_pylist())[encoded.indices.to_numpy(zero_copy_only=False)]
        doc = np.repeat(np.arange(n, dtype=np.int64), [len(t) for t in tokens])
        keep = stem >= 0
        doc, stem = doc[keep], stem[keep]
        doc_len = np.bincount(doc, minlength=n)
        # Occurrences per (document, stem), then fastembed's _term_frequency, operation for operation.
        width = max(len(self._ids_np), 1)
        pairs, counts = np.unique(doc * width + stem, return_counts=True)
        pdoc, pstem = np.divmod(pairs, width)
        values = counts * (BM25_K + 1)
        values = values / (counts + BM25_K * (1 - BM25_B + BM25_B * doc_len[pdoc] / BM25_AVG_LEN))
        token_id = self._ids_np[pstem]
        order = np.lexsort((token_id, pdoc))
        pdoc, token_id, values = pdoc[order], token_id[order], values[order]
        clash = np.flatnonzero((pdoc[1:] == pdoc[:-1]) & (token_id[1:] == token_id[:-1]))
        bounds = np.searchsorted(pdoc, np.arange(n + 1))
        ids_list, values_list = token_id.tolist(), values.astype(np.float32).tolist()
        out = [SparseVector.model_construct(indices=ids_list[lo:hi], values=values_list[lo:hi])
               for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
        # Two stems of one document with one id: the later-seen stem's value wins, an order numpy's
        # counting does not keep. Rare (32-bit ids); those documents are redone a token at a time.
        for d in sorted({int(pdoc[i]) for i in clash}):
            out[d] = self.document_vector(texts[d])
        return out

    def from_term_weights(self, term_weights: list[dict[str, Any]], total_terms: int | None, *,
                          share_exponent: float = FALLBACK_SHARE_EXPONENT) -> SparseVector | None:
        """A chunk's vector from rag_clean ``term_weights`` (``tf`` counts; ``weight`` when tf is absent).

        The kept terms get exactly the live model's weights (same tokens, stems,
        ids, and BM25 length normalisation from ``total_terms``). The terms the
        metadata dropped cannot be recovered; a chunk whose kept terms cover a
        share ``s`` of its ``total_terms`` is scaled by ``(1 / s) ** share_exponent``,
        crediting it for the matches it lost (bench/fallback.py measures it).
        """
        counts: dict[str, float] = {}
        for entry in term_weights:
            if not isinstance(entry, dict) or not isinstance(entry.get("term"), str):
                continue
            tf = entry.get("tf")
            if not isinstance(tf, (int, float)) or isinstance(tf, bool) or not tf > 0:
                weight = entry.get("weight")
                if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
                    continue
                tf = weight
            if not math.isfinite(tf):
                continue
            # A rag_clean "term" may hold several tokens; each gets the pipeline live text gets.
            for stem in self.stems(entry["term"]):
                counts[stem] = counts.get(stem, 0.0) + float(tf)
        if not counts:
            return None
        kept = sum(counts.values())
        doc_len = float(total_terms) if isinstance(total_terms, (int, float)) and total_terms > 0 else kept
        vec = self.tf_vector(counts, doc_len)
        if share_exponent and doc_len > kept > 0:
            factor = (doc_len / kept) ** share_exponent
            vec = SparseVector.model_construct(indices=vec.indices, values=[v * factor for v in vec.values])
        return vec


@lru_cache(maxsize=4)
def bm25_terms(model_dir: str) -> Bm25Terms:
    """The process's one :class:`Bm25Terms` for a model directory (its memo is shared)."""
    return Bm25Terms(model_dir)


# Texts where a shortcut would part from fastembed: lower-casing that grows a character, a lone
# connector punctuation, an over-long token, stopwords only, digits, non-Latin scripts, no text.
_BM25_PROBES = ("İstanbul KELVIN \u212a ß straße", "_ __ a_b -x- 'quoted' «guillemets»", "x" * 41 + " " + "y" * 40,
                "the and of to a", "covid-19 2.5mg 10^6 α-synuclein", "Ωμέγα 東京 данные", "", "   ")


def bm25_checked(terms: Bm25Terms, model: Any, texts: Sequence[str]) -> bool:
    """Whether ``terms`` gives fastembed's document and query vectors on ``texts`` and the edge probes.

    Args:
        terms: The pipeline to trust.
        model: fastembed's loaded ``SparseTextEmbedding``.
        texts: The first texts of the run (a few are enough).
    """
    sample = [*texts[:Bm25Model.CHECK_TEXTS], *_BM25_PROBES]
    try:
        docs = [_to_sparse(e.indices, e.values) for e in model.embed(sample, batch_size=256)]
        queries = [_to_sparse(e.indices, e.values) for e in model.query_embed(sample)]
        same = terms.document_vectors(sample) == docs and [terms.query_vector(t) for t in sample] == queries
    except (AttributeError, TypeError, ImportError, ValueError) as exc:  # fastembed's pipeline moved
        log.warning("BM25: fastembed's own loop is used (this pipeline failed beside it: %s)", exc)
        return False
    if not same:
        log.warning("BM25: fastembed's own loop is used (this pipeline gave other vectors than fastembed's)")
    return same


class Bm25Model:
    """fastembed's ``Qdrant/bm25`` loaded offline from the bundled directory.

    Vectors come from :class:`Bm25Terms` once it has given fastembed's own on
    the run's first texts; fastembed's loop otherwise.
    """

    # Texts of the first batch compared with fastembed's loop before the pipeline is trusted.
    CHECK_TEXTS = 32

    def __init__(self, resolved: ResolvedModel) -> None:
        self.name = resolved.spec.name
        self.location = resolved.location
        self._model: Any = None
        self._checked = False
        self._terms: Bm25Terms | None = None  # set by the first embed when it agrees with fastembed

    def load(self) -> Any:
        """Load once; later calls are no-ops."""
        if self._model is None:
            check_stopwords(self.location)
            from fastembed import SparseTextEmbedding

            self._model = loaded(("sparse", self.location, "bm25"), lambda: SparseTextEmbedding(
                "Qdrant/bm25", specific_model_path=self.location, local_files_only=True))
        return self._model

    def _pipeline(self, texts: Sequence[str]) -> Bm25Terms | None:
        model = self.load()
        if not self._checked:
            terms = bm25_terms(str(self.location))
            self._terms = terms if bm25_checked(terms, model, texts) else None
            self._checked = True
        return self._terms

    def embed(self, texts: Sequence[str]) -> list[SparseVector]:
        """BM25 term-frequency vectors (IDF is applied by Qdrant's ``Modifier.IDF``)."""
        terms = self._pipeline(texts)
        if terms is not None:
            return terms.document_vectors(texts)
        return [_to_sparse(e.indices, e.values) for e in self.load().embed(list(texts), batch_size=256)]

    def query_embed(self, texts: Sequence[str]) -> list[SparseVector]:
        """Query vectors: each distinct stemmed token with weight 1."""
        terms = self._pipeline(texts)
        if terms is not None:
            return [terms.query_vector(t) for t in texts]
        return [_to_sparse(e.indices, e.values) for e in self.load().query_embed(list(texts))]


class SpladeModel:
    """A SPLADE model through sentence-transformers ``SparseEncoder`` (local dir or cached hub id).

    It loads on the CPU in its precision; :meth:`placed` puts it on its device
    for the length of a lease. Documents run through the token-budget engine
    (:mod:`embedder.models.engine`): batches sized from the model's shape, its
    MLM head's vocabulary logits included, and only the non-zero weights copied
    back to the host.
    """

    def __init__(self, resolved: ResolvedModel, device: str = "cpu", *, local_files_only: bool = False,
                 precision: str = "fp32", ceiling_gb: float = 12.0, cpu_items: int = 32,
                 policy: str = "auto") -> None:
        self.name = resolved.spec.name
        self.location = resolved.location
        self.device = device
        self.precision = precision
        self.ceiling_gb = ceiling_gb
        self.cpu_items = cpu_items
        self.policy = policy
        self.local_files_only = local_files_only or resolved.is_local
        self._model: Any = None
        self._engine: Any = None

    def load(self) -> Any:
        """Load once, on the CPU, cast to the model's precision; later calls are no-ops."""
        if self._model is None:
            from sentence_transformers import SparseEncoder

            from embedder.models.engine import cast_model

            self._model = loaded(("sparse", self.location, "splade", self.precision), lambda: cast_model(
                SparseEncoder(self.location, device="cpu", local_files_only=self.local_files_only), self.precision))
        return self._model

    def placed(self) -> Any:
        """A context manager holding the model on its device (call it inside the GPU lease).

        Each placement plans its batch budget afresh: free memory and the
        ceiling may differ from the last stage's, and its figures start at zero.
        """
        from embedder.gpu import exclusive_device

        self._engine = None
        return exclusive_device(self.load(), self.device)

    def engine(self) -> Any:
        """The token-budget engine, planned on first use (on the device, inside the lease)."""
        if self._engine is None:
            from embedder.models.engine import Engine, ModelShape, plan_on_device, splade_forward, splade_preprocess

            model = self.load()
            shape = ModelShape.of(model, max_length=int(model.max_seq_length or 512), mlm_head=True)
            budget = plan_on_device(shape, self.device, self.precision, self.ceiling_gb, cpu_items=self.cpu_items,
                                    policy=self.policy)  # type: ignore[arg-type]
            self._engine = Engine(model, self.device, budget, forward=splade_forward(model),
                                  preprocess=splade_preprocess(model))
        return self._engine

    def embed(self, texts: Sequence[str]) -> list[SparseVector]:
        """Document vectors over the tokenizer vocabulary."""
        if not texts:
            return []
        engine = self.engine()
        out = engine.run_window(engine.tokenise(list(texts))).coalesce()
        idx = out.indices().numpy()
        vals = out.values().float().numpy().astype(np.float64)
        bounds = np.searchsorted(idx[0], np.arange(len(texts) + 1))
        return [_to_sparse(idx[1, a:b], vals[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def query_embed(self, texts: Sequence[str]) -> list[SparseVector]:
        """Query vectors over the tokenizer vocabulary (the library's own query path: queries are few)."""
        model = self.load()
        out = model.encode_query(list(texts), convert_to_sparse_tensor=True, batch_size=32, show_progress_bar=False,
                                 device=str(next(model.parameters()).device))
        vectors = []
        for row in out:
            row = row.coalesce()
            vectors.append(_to_sparse(row.indices()[0].numpy(), row.values().float().numpy().astype(np.float64)))
        return vectors

    def vocab(self) -> dict[str, int]:
        """The tokenizer vocabulary (for the metadata fallback)."""
        return dict(self.load().tokenizer.get_vocab())


def load_sparse_model(resolved: ResolvedModel, device: str = "cpu", *, local_files_only: bool = False,
                      precision: str = "fp32", ceiling_gb: float = 12.0, cpu_items: int = 32,
                      policy: str = "auto") -> SparseModel:
    """A sparse model for this run's device and settings, its weights loaded once per process.

    The weights live in the process's one model cache
    (:func:`~embedder.models.loading.loaded`); the model object around them is
    this call's, so a run's memory ceiling and batch settings are its own.

    Raises:
        ModelUnavailableError: With the reason, when it cannot load.
    """
    model: Bm25Model | SpladeModel
    if resolved.spec.kind == "sparse-bm25":
        model = Bm25Model(resolved)
    else:
        model = SpladeModel(resolved, device, local_files_only=local_files_only, precision=precision,
                            ceiling_gb=ceiling_gb, cpu_items=cpu_items, policy=policy)
    try:
        model.load()
    except ModelUnavailableError:
        raise
    except Exception as exc:
        raise ModelUnavailableError(
            f"sparse model {resolved.spec.name!r} could not be loaded from {resolved.location}: {exc}"
        ) from exc
    return model


# --- the metadata fallback -------------------------------------------------------------------


def _term_weights(chunk: Chunk) -> tuple[list[dict[str, Any]], int | None] | None:
    features = chunk.metadata.get("sparse_features")
    if not isinstance(features, dict):
        return None
    weights = features.get("term_weights")
    if not isinstance(weights, list) or not weights:
        return None
    total = features.get("total_terms")
    return weights, total if isinstance(total, int) and not isinstance(total, bool) else None


def splade_fallback_vector(chunk: Chunk, vocab: dict[str, int]) -> SparseVector | None:
    """A SPLADE-space vector from term weights: each term's word-piece ids, weighted log(1 + tf)."""
    tw = _term_weights(chunk)
    if tw is None:
        return None
    merged: dict[int, float] = defaultdict(float)
    for entry in tw[0]:
        term = entry.get("term") if isinstance(entry, dict) else None
        tf = entry.get("tf", entry.get("weight", 0)) if isinstance(entry, dict) else 0
        if not isinstance(term, str) or not isinstance(tf, (int, float)) or tf <= 0:
            continue
        idx = vocab.get(term.lower())
        if idx is not None:
            merged[idx] = max(merged[idx], math.log1p(float(tf)))
    return _to_sparse(merged.keys(), merged.values()) if merged else None


@dataclass
class SparseResult:
    """One sparse model's output for a collection."""

    model_name: str
    vectors: list[SparseVector | None]
    fallback: list[bool]
    query_vectors: dict[str, SparseVector]
    run: SparseInferenceRun
    telemetry: StageTelemetry
    warnings: list[str] = field(default_factory=list)


class SparseInference:
    """Live sparse inference for one model over a collection streamed in windows, with the metadata fallback.

    Call :meth:`window` for each window of chunks, :meth:`queries` once, then
    :meth:`finish` for the run's payload, telemetry and warnings: only counters
    outlive a window, so memory stays flat in the number of chunks.

    Args:
        spec: The sparse model's registry entry.
        model: The loaded model, or None when it could not load (then every chunk
            takes the fallback and ``load_error`` says why).
        load_error: Why ``model`` is None.
        bm25_dir: Directory of the BM25 stopword list (for the BM25 fallback).
        batch_size: Chunks per live call; a failing batch is retried chunk by chunk.
        total: Chunks in the collection (for progress and the inline payload).
        todo: Chunks that will be embedded live (for progress).
        inline_vectors_limit: Up to this many chunks, the payload carries every document vector.
        progress: Called with ``(embedded, todo)`` after each live batch.
    """

    def __init__(self, spec: ModelSpec, model: SparseModel | None, *, load_error: str | None = None,
                 bm25_dir: str | Path | None = None, batch_size: int = 256, total: int = 0, todo: int = 0,
                 inline_vectors_limit: int = 50, progress: Callable[[int, int], None] | None = None) -> None:
        self.spec = spec
        self.model = model
        self.bm25_dir = bm25_dir
        self.batch_size = batch_size
        self.total = total
        self.todo_total = todo
        self.inline = total <= inline_vectors_limit
        self.progress = progress
        self.t0 = time.perf_counter()
        self.n = self.todo = self.known = self.failed = self.fallback_count = self.available = self.nnz = 0
        self.docs: list[SparseVector] = []
        self.warnings: list[str] = []
        self.query_vectors: dict[str, SparseVector] = {}
        self._terms: Bm25Terms | None = None
        self._vocab: dict[str, int] | None = None
        self._fallback_ready = False
        self.load_error = load_error
        # No model and no load error: every vector was reused, so the model was never needed (nor loaded).
        if model is None and load_error is not None:
            self.warnings.append(f"sparse model {spec.name!r} unavailable ({load_error}); using the metadata fallback")

    def _fallback(self, chunk: Chunk) -> SparseVector | None:
        if not self._fallback_ready:
            self._fallback_ready = True
            if self.spec.kind == "sparse-bm25" and self.bm25_dir is not None:
                self._terms = bm25_terms(str(self.bm25_dir))
            elif isinstance(self.model, SpladeModel):
                self._vocab = self.model.vocab()
        if self._terms is not None:
            tw = _term_weights(chunk)
            return self._terms.from_term_weights(*tw) if tw else None
        if self._vocab is not None:
            return splade_fallback_vector(chunk, self._vocab)
        return None

    def window(self, chunks: Sequence[Chunk],
               known: dict[int, SparseVector] | None = None) -> tuple[list[SparseVector | None], list[bool]]:
        """Vectors for a window (None where neither the model nor the fallback gives one) and fallback flags.

        Args:
            chunks: The window.
            known: Live vectors reused from an earlier run, by position in the window.
        """
        known = known or {}
        n = len(chunks)
        vectors: list[SparseVector | None] = [None] * n
        for i, v in known.items():
            vectors[i] = v
        todo = [i for i in range(n) if i not in known]
        failed: list[int] = list(todo) if self.model is None else []
        if self.model is not None:
            for start in range(0, len(todo), self.batch_size):
                raise_if_stopped()
                idx = todo[start:start + self.batch_size]
                try:
                    out = self.model.embed([chunks[i].text for i in idx])
                    for i, v in zip(idx, out, strict=True):
                        vectors[i] = v
                except Exception as exc:
                    log.warning("sparse batch %d-%d failed (%s); retrying chunk by chunk", idx[0], idx[-1], exc)
                    for i in idx:
                        try:
                            vectors[i] = self.model.embed([chunks[i].text])[0]
                        except Exception as chunk_exc:
                            log.warning("sparse model failed on chunk %s: %s", chunks[i].id, chunk_exc)
                            failed.append(i)
                self.todo += len(idx)
                if self.progress is not None:
                    self.progress(self.todo, self.todo_total)
        else:
            self.todo += len(todo)
        fallback = [False] * n
        for i in failed:
            vectors[i] = self._fallback(chunks[i])
            fallback[i] = vectors[i] is not None
        self.n += n
        self.known += len(known)
        self.failed += len(failed)
        self.fallback_count += sum(fallback)
        for vec in vectors:
            if vec is not None:
                self.available += 1
                self.nnz += vec.nnz
            if self.inline:
                self.docs.append(vec if vec is not None else SparseVector())
        return vectors, fallback

    def queries(self, queries: Sequence[Query]) -> dict[str, SparseVector]:
        """Query vectors from ``query_embed`` (BM25's pipeline without fastembed when the model is unavailable)."""
        if not queries:
            return {}
        if self.model is not None:
            qv = self.model.query_embed([q.text for q in queries])
        elif self.spec.kind == "sparse-bm25" and self.bm25_dir is not None:
            terms = bm25_terms(str(self.bm25_dir))
            qv = [terms.query_vector(q.text) for q in queries]
        else:
            qv = []
            self.warnings.append(f"no query vectors for {self.spec.name!r}: the model is unavailable")
        self.query_vectors = {q.id: v for q, v in zip(queries, qv)}
        return self.query_vectors

    def finish(self, run_id: uuid.UUID | None = None,
               export_path: str | None = None) -> tuple[SparseInferenceRun, StageTelemetry, list[str]]:
        """The run's payload, telemetry and warnings, from the counters of every window."""
        warnings = list(self.warnings)
        if self.failed:
            if self.model is not None:
                warnings.append(f"sparse model {self.spec.name!r} failed on {self.failed} chunk(s); "
                                f"{self.fallback_count} recovered from metadata term weights")
            elif self.load_error is None:  # no model was given, and no load failed: say so where it mattered
                warnings.append(f"sparse model {self.spec.name!r} was not loaded; {self.failed} chunk(s) use the "
                                "metadata fallback")
            elif self.fallback_count < self.failed and self._terms is None and self._vocab is None:
                warnings.append(f"no metadata fallback exists in the index space of {self.spec.name!r}")
            if self.fallback_count < self.failed:
                warnings.append(f"{self.failed - self.fallback_count} chunk(s) have no sparse vector (no usable "
                                "metadata.sparse_features.term_weights)")
        latency_ms = (time.perf_counter() - self.t0) * 1000
        docs: list[SparseVector] | dict[str, Any]
        if self.inline:
            docs = self.docs
        else:
            docs = {"count": self.n, "available": self.available,
                    "mean_nnz": self.nnz / self.available if self.available else 0.0, "path": export_path}
        run = SparseInferenceRun(
            run_id=run_id or uuid.uuid4(), sparse_model=self.spec.name,
            query_sparse_vector=next(iter(self.query_vectors.values()), None), document_sparse_vectors=docs,
            latency_ms=latency_ms, fallback_used=self.fallback_count > 0, fallback_count=self.fallback_count,
            coverage_ratio=self.available / self.n if self.n else 1.0,
        )
        engine = getattr(self.model, "_engine", None)
        extra: dict[str, Any] = {"batch_size": self.batch_size}
        if engine is not None and engine.stats.batches:
            extra, backoff = engine.report("sparse")
            extra["precision"] = getattr(self.model, "precision", None)
            warnings.extend(backoff)
        telemetry = StageTelemetry(
            stage="sparse", model=self.spec.name, device=str(getattr(self.model, "device", "cpu")),
            items=self.todo, reused=self.known, latency_ms=latency_ms,
            items_per_s=self.todo / (latency_ms / 1000) if latency_ms > 0 else 0.0,
            fallback=self.fallback_count > 0, warnings=warnings, **extra,
        )
        return run, telemetry, warnings


def infer_sparse(
    chunks: Sequence[Chunk],
    spec: ModelSpec,
    model: SparseModel | None,
    *,
    queries: Sequence[Query] = (),
    load_error: str | None = None,
    bm25_dir: str | Path | None = None,
    run_id: uuid.UUID | None = None,
    batch_size: int = 256,
    inline_vectors_limit: int = 50,
    export_path: str | None = None,
    known: dict[int, SparseVector] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SparseResult:
    """Live sparse vectors for every chunk of an in-memory list (one window of :class:`SparseInference`).

    Args:
        chunks: The collection.
        spec: The sparse model's registry entry.
        model: The loaded model, or None when it could not load.
        queries: Real queries; their vectors come from ``query_embed``.
        load_error: Why ``model`` is None.
        bm25_dir: Directory of the BM25 stopword list (for the BM25 fallback).
        run_id: The run's id.
        batch_size: Chunks per live call.
        inline_vectors_limit: Above this many chunks, the payload summarises
            document vectors and points at ``export_path``.
        export_path: Where ``sparse.jsonl`` will be written.
        known: Live vectors reused from an earlier run, by chunk position.

    Returns:
        Vectors, per-chunk fallback flags, query vectors, the SparseInferenceRun and telemetry.
    """
    inference = SparseInference(spec, model, load_error=load_error, bm25_dir=bm25_dir, batch_size=batch_size,
                                total=len(chunks), todo=len(chunks) - len(known or {}),
                                inline_vectors_limit=inline_vectors_limit, progress=progress)
    vectors, fallback = inference.window(chunks, known)
    query_vectors = inference.queries(queries)
    run, telemetry, warnings = inference.finish(run_id, export_path)
    return SparseResult(spec.name, vectors, fallback, query_vectors, run, telemetry, warnings)
