"""Load a run configuration's CPU models ahead of its runs, into the process's one model cache.

A process that runs many flows (the warm runner of ``embed-collections server``)
loads the models its runs will ask for once, before any run: a run then finds
them in :mod:`embedder.models.loading`'s cache under the same key its stage
builds, and a run that asks for another model loads that one itself.

Only what is safe to share with a forked child is loaded here: torch models on
the CPU and BM25. Nothing is encoded (a thread pool that has run once does not
survive a fork), nothing touches CUDA (a GPU run loads its models in its own
process, under the GPU lease), and ONNX Runtime sessions, which start their
thread pools when they are created, are left to the runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from embedder.errors import EmbedderError
from embedder.settings import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preloaded:
    """One model the preload loaded, or why it did not."""

    role: str
    name: str
    error: str | None = None

    def line(self) -> str:
        """One line for a log or a status."""
        return f"{self.role} {self.name}: " + (f"not loaded ({self.error})" if self.error else "loaded")


def preload_models(config: RunConfig) -> list[Preloaded]:
    """Load ``config``'s dense and sparse models for the CPU, as its stages would; return what happened.

    A model that cannot load is reported, not raised: the run that needs it
    loads it (or reports it) as it would without a preload.
    """
    from embedder.models.registry import resolve_model

    if not config.force_cpu:
        from embedder.gpu import resolve_device

        if resolve_device(False) != "cpu":
            return [Preloaded("all", "-", "a GPU is usable: runs load their models under the GPU lease")]
    done: list[Preloaded] = []
    if config.dense.backend == "torch":
        from embedder.stages.dense import dense_encoder

        for name, _weight in config.dense.components():
            try:
                resolved = resolve_model(name, "dense", local_files_only=config.local_files_only)
                if resolved.spec.engine != "sentence-transformers":
                    done.append(Preloaded("dense", name, f"its {resolved.spec.engine} engine loads in the run"))
                    continue
                dense_encoder(config, resolved).load()
                done.append(Preloaded("dense", name))
            except (EmbedderError, OSError, RuntimeError, ValueError) as exc:
                done.append(Preloaded("dense", name, str(exc)))
    if config.sparse.enabled:
        from embedder.stages.sparse import load_sparse_for

        for name in config.sparse.models:
            try:
                model, error = load_sparse_for(config, name, "cpu")
            except (EmbedderError, OSError, RuntimeError, ValueError) as exc:
                model, error = None, str(exc)
            done.append(Preloaded("sparse", name, error if model is None else None))
    for item in done:
        log.info("preload: %s", item.line())
    return done
