"""The process's one model cache, and one lock around every model construction.

Each model is loaded once per process and per what changes its weights in memory
(its files, backend, precision, maximum length): the dense, sparse and rerank
stages of every run in a process, the search service and the benches share the
loaded copy. :func:`loaded` is the only place a model is kept.

transformers builds a model's modules on the meta device under a process-wide
default-device context, then fills in the weights. Two threads constructing
models at once (the sparse stage runs beside the dense stage) see each other's
context: SPLADE-tiny failed with "Cannot copy out of meta tensor" while MiniLM
loaded on the other thread. A load takes seconds and happens once per process
and model, so serialising loads costs nothing a run can measure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

LOAD_LOCK = threading.RLock()
_MODELS: dict[tuple[Hashable, ...], Any] = {}


def loaded(key: tuple[Hashable, ...], build: Callable[[], T]) -> T:
    """The model kept under ``key``, built by ``build`` (under :data:`LOAD_LOCK`) the first time.

    Args:
        key: The role first (``"dense"``, ``"sparse"``, ``"rerank"``, ...), then what
            makes two loaded copies differ.
        build: Loads the model; an exception leaves nothing kept, so the next call tries again.
    """
    with LOAD_LOCK:
        if key not in _MODELS:
            _MODELS[key] = build()
        model: T = _MODELS[key]
        return model


def loaded_keys(role: str) -> list[tuple[Hashable, ...]]:
    """The keys of the models of one role kept now (for tests and benches)."""
    with LOAD_LOCK:
        return [k for k in _MODELS if k[0] == role]


def forget_models() -> None:
    """Drop every kept model, so the next use loads again (a bench measuring load time; a test)."""
    with LOAD_LOCK:
        _MODELS.clear()
