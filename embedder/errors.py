"""One exception root for the library.

Every error raised on purpose derives from :class:`EmbedderError` and from the
built-in it resembles, so callers can catch either.
"""

from __future__ import annotations

from typing import Any


class EmbedderError(Exception):
    """Root of every error the embedder raises on purpose."""


class ConfigError(EmbedderError, ValueError):
    """A setting or config file is invalid."""


class UnsafeNameError(EmbedderError, ValueError):
    """A collection name would escape the output directory."""


class InputFormatError(EmbedderError, ValueError):
    """An input file or dataset does not fit any supported layout."""


class SummaryValidationError(EmbedderError, ValueError):
    """A processing summary does not validate against a supported schema."""


class ModelNotRegisteredError(EmbedderError, KeyError):
    """A model name is neither registered nor an existing local directory."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class ModelUnavailableError(EmbedderError, RuntimeError):
    """A registered model cannot be loaded (offline, missing files, broken weights)."""


class StageError(EmbedderError, RuntimeError):
    """A pipeline stage failed for a reason the user can act on."""


class VectorIndexError(EmbedderError, RuntimeError):
    """The vector index (Qdrant) could not be reached or rejected a write."""


class UnknownCollectionError(EmbedderError, LookupError):
    """No collection by that name exists in the output dir or the index."""


class IndexNotFoundError(VectorIndexError, LookupError):
    """No published index exists for a collection (never built, failed, or written by an older version)."""


class IndexLayoutError(VectorIndexError, ValueError):
    """The store holds the collection with another layout (dense dimension, sparse vectors): deterministic."""


class CollectionsFailedError(EmbedderError):
    """One or more collections of a run failed; the others ran. Carries every collection's summary."""

    def __init__(self, message: str, summaries: list[Any] | None = None) -> None:
        super().__init__(message)
        self.summaries = summaries or []


class RunCancelledError(EmbedderError):
    """The run was asked to stop (SIGINT, SIGTERM) and stopped between two batches.

    Attributes:
        partial: Set by an engine stopped inside a window: ``(window, rows,
            outputs)``, the outputs of the window's rows that were finished, so
            the stage can store them before it unwinds.
    """

    partial: tuple[Any, ...] | None = None


class DamagedStoreError(EmbedderError, OSError):
    """A kept file failed its check as it was read; it was set aside (quarantined) and must be recomputed.

    Attributes:
        path: Where the damaged file was moved.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class IndexDamagedError(VectorIndexError):
    """The published index failed its check or cannot be read; a run rebuilds it from the stored vectors."""
