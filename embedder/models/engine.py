"""Running sentence-transformers models fast: precision, token-budget batches, overlapped tokenisation.

One engine serves the three model families the pipeline runs on a device (a
``SentenceTransformer`` for dense vectors, a ``SparseEncoder`` for SPLADE and a
``CrossEncoder`` for rerank). What it does differently from their ``encode``/
``predict`` loops, and why (``bench/batching.py`` and ``bench/gpu.py`` measure it):

- **Precision.** ``auto`` runs bf16 on a GPU that supports it, else fp16, and
  fp32 on the CPU. The weights are cast once, on the CPU before the lease; the
  process cache keys models by precision, so a half-precision copy never
  serves an fp32 caller.
- **Token-budget batches.** A window's inputs are tokenised in one call, sorted
  by token length and cut into batches whose padded size (rows x longest row)
  fits a budget derived from the model's shape (hidden size, heads,
  intermediate size, vocabulary for MLM heads, parameter count) and the memory
  ceiling. Item-count batches either waste the GPU on short texts or run out of
  memory on long ones.
- **Overlap.** A worker thread reads and tokenises the next window while the
  device runs the current one; batches are copied from pinned memory without
  blocking, and outputs stay on the device until the window ends, so there is
  one host-device sync per window, not per batch.
- **OOM back-off** halves the token budget and retries the batch; it gives up
  below one sequence at the model's maximum length.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import numpy as np

from embedder.batching import back_off
from embedder.cancel import raise_if_stopped
from embedder.errors import RunCancelledError
from embedder.gpu import apply_memory_ceiling, cuda_context_gb

if TYPE_CHECKING:
    # At run time torch is imported by the functions that use it: a re-run with nothing
    # to embed imports this module to plan its stages but never runs a model.
    import torch

Precision = Literal["auto", "fp32", "fp16", "bf16"]
BatchPolicy = Literal["auto", "tokens", "items"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
_GB = 1024**3
# The fraction of the memory left after weights and the CUDA context that activations may take:
# the allocator fragments, and the estimate below counts only the largest live tensors of a layer.
_ACTIVATION_SHARE = 0.5

T = TypeVar("T")
W = TypeVar("W")
X = TypeVar("X")


def resolve_precision(setting: str, device: str) -> str:
    """The precision a stage runs in: ``auto`` is bf16 on a GPU that supports it, else fp16; fp32 on the CPU.

    Raises:
        ValueError: For a setting other than auto, fp32, fp16 or bf16.
    """
    if setting not in PRECISIONS:
        raise ValueError(f"unknown precision {setting!r}; use one of {', '.join(PRECISIONS)}")
    if setting != "auto":
        return setting
    if not device.startswith("cuda"):
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision (``fp32``, ``fp16`` or ``bf16``)."""
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return dtypes[precision]


def cast_model(model: Any, precision: str) -> Any:
    """Cast a loaded model's weights to ``precision`` in place (a no-op for fp32) and return it."""
    if precision != "fp32":
        model.to(torch_dtype(precision))
    return model


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a forward pass depends on, read from the loaded model.

    Attributes:
        parameters: Number of weights.
        hidden: Hidden size.
        layers: Transformer layers.
        heads: Attention heads.
        intermediate: Feed-forward width.
        max_length: Longest input in tokens (the model's own limit, as truncation applies it).
        vocab_logits: Vocabulary size when the head scores every token against the vocabulary
            (SPLADE's MLM head), else 0.
    """

    parameters: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_length: int
    vocab_logits: int = 0

    @classmethod
    def of(cls, model: Any, *, max_length: int, mlm_head: bool = False) -> ModelShape:
        """Read the shape of a sentence-transformers model (or a bare ``transformers`` model)."""
        config = getattr(_hf_model(model), "config", None) or getattr(model, "config", None)

        def read(*names: str, default: int) -> int:
            for name in names:
                value = getattr(config, name, None)
                if isinstance(value, int) and value > 0:
                    return value
            return default

        hidden = read("hidden_size", "d_model", "dim", default=768)
        parameters = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0
        return cls(
            parameters=int(parameters), hidden=hidden,
            layers=read("num_hidden_layers", "n_layers", "num_layers", default=12),
            heads=read("num_attention_heads", "n_heads", default=max(1, hidden // 64)),
            intermediate=read("intermediate_size", "hidden_dim", "d_ff", default=4 * hidden),
            max_length=int(max_length), vocab_logits=read("vocab_size", default=30522) if mlm_head else 0,
        )

    def activation_bytes_per_token(self, dtype_bytes: int) -> int:
        """Peak live activation bytes per padded token in one layer (no autograd).

        Hidden states in and out, the residual and the layer norm (4h), query,
        key and value (3h), attention scores and probabilities (2 x heads x
        length), the feed-forward activations (2 x intermediate), and for an MLM
        head its vocabulary logits and their activation (2 x vocabulary).
        """
        return dtype_bytes * (7 * self.hidden + 2 * self.intermediate + 2 * self.heads * self.max_length
                              + 2 * self.vocab_logits)

    def weights_gb(self, dtype_bytes: int) -> float:
        """Weight memory in GB at ``dtype_bytes`` per parameter."""
        return self.parameters * dtype_bytes / _GB


def _hf_model(model: Any) -> Any:
    """The ``transformers`` model inside a sentence-transformers model, across library versions 5 and 6."""
    getters: tuple[Callable[[Any], Any], ...] = (lambda m: m.transformers_model, lambda m: m[0].auto_model,
                                                 lambda m: m.model)
    for get in getters:
        try:
            inner = get(model)
        except (AttributeError, TypeError, IndexError, KeyError):
            continue
        if inner is not None:
            return inner
    return model


@dataclass(frozen=True)
class TokenBudget:
    """How a window is cut into batches.

    Attributes:
        tokens: Padded tokens per batch (rows x the batch's longest row), at most.
        max_items: Rows per batch, at most.
        policy: ``tokens`` (cut by padded tokens) or ``items`` (cut every ``max_items`` rows).
        floor_tokens: Back-off stops below this (one sequence at the maximum length).
    """

    tokens: int
    max_items: int
    policy: Literal["tokens", "items"] = "tokens"
    floor_tokens: int = 1

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.max_items < 1 or self.floor_tokens < 1:
            raise ValueError(f"invalid token budget: {self}")

    @property
    def size(self) -> int:
        """The figure the policy cuts by: padded tokens, or rows."""
        return self.tokens if self.policy == "tokens" else self.max_items

    @property
    def unit(self) -> str:
        """``tokens`` or ``rows``: what :attr:`size` counts."""
        return "tokens" if self.policy == "tokens" else "rows"

    def halved(self) -> TokenBudget:
        """The budget after an out-of-memory error."""
        return TokenBudget(tokens=max(self.floor_tokens, self.tokens // 2), max_items=max(1, self.max_items // 2),
                           policy=self.policy, floor_tokens=self.floor_tokens)

    def cut(self, lengths: np.ndarray) -> list[tuple[int, int]]:
        """Batches as ``[start, end)`` spans over rows sorted longest first."""
        spans = []
        start, n = 0, len(lengths)
        while start < n:
            if self.policy == "items":
                end = min(n, start + self.max_items)
            else:
                # Sorted longest first: the first row sets the batch's padded length.
                rows = max(1, self.tokens // max(1, int(lengths[start])))
                end = min(n, start + min(rows, self.max_items))
            spans.append((start, end))
            start = end
        return spans


def plan_token_budget(shape: ModelShape, device: str, precision: str, ceiling_gb: float, *,
                      context_gb: float = 0.0, cpu_items: int, policy: BatchPolicy = "auto") -> TokenBudget:
    """The batch budget for a model on a device under the memory ceiling.

    On a GPU the budget is the memory left under the ceiling (or the device's
    free memory, if less) after the CUDA context and the weights, shared with
    the allocator's slack, divided by the activation bytes of one padded token.
    On the CPU memory is not the limit and large batches buy nothing:
    ``cpu_items`` sequences at the model's maximum length, cut by items unless
    ``policy`` says otherwise (bench/batching.py measured both on SciFact).

    Args:
        shape: The loaded model's shape.
        device: ``cpu`` or ``cuda[:N]``.
        precision: The resolved precision.
        ceiling_gb: The process's device-memory ceiling.
        context_gb: Device memory the process holds outside torch's allocator (the CUDA context).
        cpu_items: Rows per batch on the CPU.
        policy: ``tokens``, ``items`` or ``auto`` (tokens on a GPU, items on the CPU).
    """
    longest = max(1, shape.max_length)
    on_gpu = device.startswith("cuda")
    chosen: Literal["tokens", "items"] = ("tokens" if on_gpu else "items") if policy == "auto" else policy
    if not on_gpu:
        tokens = cpu_items * longest
        return TokenBudget(tokens=tokens, max_items=cpu_items if chosen == "items" else max(1, tokens // 4),
                           policy=chosen, floor_tokens=longest)
    import torch

    dtype_bytes = torch_dtype(precision).itemsize
    index = torch.device(device).index or 0
    free_b, _total = torch.cuda.mem_get_info(index)
    room_gb = min(ceiling_gb - context_gb, free_b / _GB) - shape.weights_gb(dtype_bytes)
    tokens = int(max(0.0, room_gb) * _GB * _ACTIVATION_SHARE // shape.activation_bytes_per_token(dtype_bytes))
    tokens = max(longest, tokens)
    # Every row holds at least a few tokens (the special tokens and one word); more rows than that
    # cannot fit the budget anyway.
    return TokenBudget(tokens=tokens, max_items=max(1, tokens // 4), policy=chosen, floor_tokens=longest)


def plan_on_device(shape: ModelShape, device: str, precision: str, ceiling_gb: float, *, cpu_items: int,
                   policy: BatchPolicy = "auto") -> TokenBudget:
    """Cap torch's allocator at the ceiling less the CUDA context, then plan the budget there.

    Call it inside the GPU lease: the free memory it reads is then this stage's.
    """
    apply_memory_ceiling(device, ceiling_gb)
    return plan_token_budget(shape, device, precision, ceiling_gb, context_gb=cuda_context_gb(device),
                             cpu_items=cpu_items, policy=policy)


# --- overlap ---------------------------------------------------------------------------------------------


_DONE = object()


class Prefetch(Generic[T]):
    """Iterate ``source`` on a worker thread, ``depth`` items ahead of the consumer.

    Exceptions in the worker are raised in the consumer. Closing (or leaving the
    ``with`` block) stops the worker at its next item.
    """

    def __init__(self, source: Iterable[T], *, depth: int = 1, name: str = "prefetch") -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._run, args=(iter(source),), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def __iter__(self) -> Iterator[T]:
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.wait_s += time.perf_counter() - t0
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the worker and wait for it."""
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Drain(Generic[T]):
    """Hand items to ``consume`` on a worker thread, in order, ``depth`` items behind the producer.

    :meth:`close` waits for the last item; an exception in ``consume`` is raised
    from the next :meth:`put` or from :meth:`close`.
    """

    def __init__(self, consume: Callable[[T], None], *, depth: int = 2, name: str = "drain") -> None:
        self._consume = consume
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._consume(item)
                except BaseException as exc:
                    self._error = exc

    def put(self, item: T) -> None:
        """Queue an item (blocks while ``depth`` items wait)."""
        if self._error is not None:
            raise self._error
        self._queue.put(item)

    def close(self) -> None:
        """Wait for every queued item to be consumed; raise the consumer's error, if any."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        if self._error is not None:
            raise self._error


# --- the engine ------------------------------------------------------------------------------------------


@dataclass
class Tokenised(Generic[X]):
    """A window's inputs, tokenised in one call and sorted longest first."""

    items: Sequence[X]
    features: dict[str, Any]
    lengths: np.ndarray  # token lengths, in sorted order
    order: np.ndarray  # sorted position -> input position
    padding_left: bool = False


@dataclass
class EngineStats:
    """What the engine did: batches, back-offs, and where the time went."""

    batches: int = 0
    items: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0
    backoffs: list[int] = field(default_factory=list)
    device_s: float = 0.0
    tokenise_s: float = 0.0
    input_wait_s: float = 0.0

    @property
    def padding_ratio(self) -> float:
        """Padded tokens per real token (1.0 means no padding)."""
        return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0


@contextlib.contextmanager
def stop_between_layers(model: Any) -> Iterator[None]:
    """Let a stop request end a forward pass between two of the model's layers, not only between batches.

    A batch of long texts takes seconds on a CPU (more on a busy one); a check
    before each layer of every ``ModuleList`` (a transformer's blocks) bounds the
    wait by one layer's time. The check is one flag read per layer.
    """
    import torch

    modules = model.modules() if isinstance(model, torch.nn.Module) else []
    layers = [layer for m in modules if isinstance(m, torch.nn.ModuleList) for layer in m]
    handles = [layer.register_forward_pre_hook(lambda *_: raise_if_stopped()) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Engine(Generic[X]):
    """Runs one model over windows of inputs with token-budget batches and overlapped tokenisation.

    Args:
        model: A sentence-transformers model (its ``preprocess`` tokenises a list of inputs).
        device: Where the forward pass runs (the model must already be there).
        budget: The batch budget (see :func:`plan_token_budget`).
        forward: Features on the device -> one output row per input (a tensor on the device).
        preprocess: Inputs -> padded features; defaults to ``model.preprocess``.
        on_batch: Called with the rows of each finished batch (progress).
    """

    def __init__(self, model: Any, device: str, budget: TokenBudget, *,
                 forward: Callable[[dict[str, Any]], torch.Tensor],
                 preprocess: Callable[[Sequence[X]], dict[str, Any]] | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.model = model
        self.on_batch = on_batch
        self.device = device
        self.budget = budget
        self.planned = budget
        self.forward = forward
        self.preprocess = preprocess or default_preprocess(model)
        self.stats = EngineStats()
        self._cuda = device.startswith("cuda")
        tokenizer = getattr(model, "tokenizer", None)
        self._left = getattr(tokenizer, "padding_side", "right") == "left"

    def tokenise(self, items: Sequence[X]) -> Tokenised[X]:
        """Tokenise a window in one call (runs on the prefetch thread)."""
        import torch

        t0 = time.perf_counter()
        features = dict(self.preprocess(list(items))) if len(items) else {}
        mask = features.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            lengths = mask.sum(dim=1).numpy()
        else:  # no mask (a model that does not pad): every row is as long as the window's longest
            width = next((v.shape[1] for v in features.values() if isinstance(v, torch.Tensor) and v.ndim == 2), 1)
            lengths = np.full(len(items), width)
        order = np.argsort(-lengths, kind="stable")
        self.stats.tokenise_s += time.perf_counter() - t0
        return Tokenised(items=items, features=features, lengths=lengths[order], order=order,
                         padding_left=self._left)

    def _batch(self, window: Tokenised[X], start: int, end: int) -> dict[str, Any]:
        import torch

        rows = torch.from_numpy(window.order[start:end])
        width = int(window.lengths[start])
        batch: dict[str, Any] = {}
        n = len(window.items)
        for key, value in window.features.items():
            if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == n:
                value = value.index_select(0, rows)
                if value.ndim >= 2 and value.shape[1] > width and key in _SEQUENCE_KEYS:
                    value = value[:, -width:] if window.padding_left else value[:, :width]
                if self._cuda:
                    # Pinned, so the copy runs asynchronously; torch's host allocator keeps the
                    # buffer alive until the copy has finished.
                    value = value.contiguous().pin_memory().to(self.device, non_blocking=True)
                else:
                    value = value.contiguous()
            batch[key] = value
        return batch

    def run_window(self, window: Tokenised[X]) -> torch.Tensor:
        """Outputs for one tokenised window, on the host, in input order.

        Raises:
            StageError: When even one sequence at the maximum length runs out of memory.
        """
        import torch

        n = len(window.items)
        if n == 0:
            return torch.empty(0)
        t0 = time.perf_counter()
        outputs: list[torch.Tensor] = []
        spans = self.budget.cut(window.lengths)
        i = 0
        with torch.inference_mode(), stop_between_layers(self.model):
            while i < len(spans):
                start, end = spans[i]
                try:
                    raise_if_stopped()
                    out = self.forward(self._batch(window, start, end))
                except RunCancelledError as exc:
                    if outputs:  # rows [0, start) of the sorted window are done: hand them to the stage
                        exc.partial = (None, window.order[:start], _concat(outputs).to("cpu"))
                    raise
                except Exception as exc:
                    back_off(exc, device=self.device, size=self.budget.size, backoffs=self.stats.backoffs,
                             at_floor=self.budget.tokens <= self.budget.floor_tokens and end - start <= 1,
                             floor="one sequence of the model's maximum length")
                    self.budget = self.budget.halved()
                    # Re-cut what is left of the window under the smaller budget.
                    rest = self.budget.cut(window.lengths[start:])
                    spans = spans[:i] + [(start + s, start + e) for s, e in rest]
                    continue
                outputs.append(out)
                self.stats.batches += 1
                self.stats.padded_tokens += (end - start) * int(window.lengths[start])
                self.stats.real_tokens += int(window.lengths[start:end].sum())
                if self.on_batch is not None:
                    self.on_batch(end - start)
                i += 1
            merged = _concat(outputs)
            # The window's one host-device sync.
            host = merged.to("cpu")
        self.stats.items += n
        self.stats.device_s += time.perf_counter() - t0
        inverse = torch.from_numpy(np.argsort(window.order, kind="stable"))
        return host.index_select(0, inverse)

    def report(self, stage: str) -> tuple[dict[str, Any], list[str]]:
        """The :class:`StageTelemetry` fields that describe this engine's batches, and its back-off warning."""
        s, planned = self.stats, self.planned
        fields = {
            "batch_policy": planned.policy, "token_budget": self.budget.tokens, "initial_token_budget": planned.tokens,
            "initial_batch_size": planned.max_items, "batches": s.batches,
            "batch_size": max(1, round(s.items / s.batches)) if s.batches else 0, "backoffs": list(s.backoffs),
            "padding_ratio": round(s.padding_ratio, 4), "gpu_work_s": round(s.device_s, 3),
            "tokenise_s": round(s.tokenise_s, 3),
        }
        warnings = ([f"{stage} batch backed off after OOM: "
                     f"{' -> '.join(map(str, [*s.backoffs, self.budget.size]))} {self.budget.unit}"]
                    if s.backoffs else [])
        return fields, warnings

    def map(self, windows: Iterable[W], inputs: Callable[[W], Sequence[X]]) -> Iterator[tuple[W, torch.Tensor]]:
        """Each window with its outputs, tokenising the next window (on a thread) while the device runs this one.

        Args:
            windows: Anything; read on the tokenising thread, so it may do I/O.
            inputs: A window's inputs to the model.
        """
        def tokenised() -> Iterator[tuple[W, Tokenised[X]]]:
            for w in windows:
                yield w, self.tokenise(inputs(w))

        with Prefetch(tokenised(), depth=1, name="engine-tokenise") as ahead:
            for w, window in ahead:
                try:
                    out = self.run_window(window)
                except RunCancelledError as exc:
                    if exc.partial is not None:
                        exc.partial = (w, *exc.partial[1:])
                    raise
                yield w, out
            self.stats.input_wait_s += ahead.wait_s


# Keys whose second dimension is the sequence (trimmed to the batch's longest row).
_SEQUENCE_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids",
                            "special_tokens_mask"})


def _concat(outputs: list[torch.Tensor]) -> torch.Tensor:
    import torch

    if not outputs:
        return torch.empty(0)
    merged = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return merged.coalesce() if merged.is_sparse else merged


# --- the three model families ----------------------------------------------------------------------------


def dense_forward(model: Any) -> Callable[[dict[str, Any]], torch.Tensor]:
    """L2-normalised sentence embeddings in fp32 (normalised after the cast, so half precision costs little)."""

    import torch

    def forward(features: dict[str, Any]) -> torch.Tensor:
        emb = model(features)["sentence_embedding"].float()
        return torch.nn.functional.normalize(emb, p=2, dim=1)

    return forward


def default_preprocess(model: Any) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """The model's own tokenisation: ``preprocess`` (sentence-transformers 6) or ``tokenize`` (5)."""
    fn = getattr(model, "preprocess", None) or model.tokenize
    return lambda items: fn(list(items))


def rerank_preprocess(model: Any) -> Callable[[Sequence[tuple[str, str]]], dict[str, Any]]:
    """Pair tokenisation as ``CrossEncoder.predict`` does it (its ``preprocess`` in version 6, its tokenizer in 5)."""
    if hasattr(model, "preprocess"):
        return lambda pairs: model.preprocess(list(pairs))
    longest = getattr(model, "max_length", None)

    def preprocess(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        return dict(model.tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True,
                                    truncation="longest_first", return_tensors="pt", max_length=longest))

    return preprocess


def rerank_forward(model: Any) -> Callable[[dict[str, Any]], torch.Tensor]:
    """One score per pair, through the CrossEncoder's own activation, in fp32 (as ``predict`` computes it)."""
    activation = getattr(model, "activation_fn", None)
    modular = hasattr(model, "preprocess")

    def forward(features: dict[str, Any]) -> torch.Tensor:
        if modular:
            scores = model(features)["scores"].float()
        else:  # sentence-transformers 5: a transformers sequence classifier inside
            scores = model.model(**features, return_dict=True).logits.float()
        if activation is not None:
            scores = activation(scores)
        first: torch.Tensor = scores.reshape(scores.shape[0], -1)[:, 0]
        return first

    return forward


def splade_forward(model: Any, *, task: str = "document") -> Callable[[dict[str, Any]], torch.Tensor]:
    """Sparse vocabulary weights per input, made sparse on the device (only non-zeros cross to the host)."""
    from sentence_transformers.util import select_max_active_dims

    max_active = getattr(model, "max_active_dims", None)

    def forward(features: dict[str, Any]) -> torch.Tensor:
        emb = model(features, task=task)["sentence_embedding"].float()
        if max_active is not None:
            emb = select_max_active_dims(emb, max_active_dims=max_active)
        sparse: torch.Tensor = emb.to_sparse()
        return sparse

    return forward


def splade_preprocess(model: Any, *, task: str = "document") -> Callable[[Sequence[str]], dict[str, Any]]:
    """SPLADE document tokenisation with the model's own document prompt (as ``encode_document`` picks it)."""
    prompts = getattr(model, "prompts", {}) or {}
    prompt = next((prompts[p] for p in ("document", "passage", "corpus") if p in prompts), None) or None

    def preprocess(texts: Sequence[str]) -> dict[str, Any]:
        features: dict[str, Any]
        try:
            features = model.preprocess(list(texts), prompt=prompt, task=task)
        except TypeError:  # a model without a Router takes no task
            features = model.preprocess(list(texts), prompt=prompt)
        return features

    return preprocess
