"""The pipeline's stages as plain functions over small file references.

One module per stage (:mod:`~embedder.stages.load`, :mod:`~embedder.stages.dense`,
:mod:`~embedder.stages.sparse`, :mod:`~embedder.stages.index`,
:mod:`~embedder.stages.fuse`, :mod:`~embedder.stages.rerank`), each owning its
result model, its cache key and its section of the summary. Each stage writes
its files into ``.stages/<stage>/<key>/`` (see :mod:`embedder.stages.common`)
and returns a small pydantic result. Prefect tasks wrap these one-to-one;
nothing here knows about Prefect.
"""

from embedder.stages.common import (
    SEAL,
    Status,
    SummarySection,
    code_version,
    collect_stage_dirs,
    collect_vector_spaces,
    collection_dir,
    input_digest,
    model_fingerprint,
    seal,
    sealed,
    stage_dir,
    stage_key,
    stages_dir,
    store_id,
    vector_space,
)
from embedder.stages.dense import (
    DenseStageResult,
    dense_encoder,
    dense_key,
    dense_section,
    dense_stage,
    query_vector,
)
from embedder.stages.fuse import FusionResult, fuse_key, fuse_stage, fusion_section
from embedder.stages.index import (
    POINT_BATCH,
    IndexResult,
    index_layout,
    index_section,
    index_stage,
    iter_collection_points,
    iter_point_windows,
)
from embedder.stages.load import load_key, load_section, load_stage
from embedder.stages.rerank import RerankStageResult, rerank_key, rerank_section, rerank_stage
from embedder.stages.sparse import (
    SparseModelOutput,
    SparseStageResult,
    sparse_key,
    sparse_section,
    sparse_stage,
)

__all__ = [
    "POINT_BATCH", "SEAL", "DenseStageResult", "FusionResult", "IndexResult", "RerankStageResult",
    "SparseModelOutput", "SparseStageResult", "Status", "SummarySection", "code_version", "collect_stage_dirs",
    "collect_vector_spaces",
    "collection_dir", "dense_encoder", "dense_key", "dense_section", "dense_stage", "fuse_key", "fuse_stage",
    "fusion_section", "index_layout", "index_section", "index_stage", "input_digest", "iter_collection_points",
    "load_key", "iter_point_windows", "load_section", "load_stage", "model_fingerprint",
    "query_vector", "rerank_key", "rerank_section", "rerank_stage", "seal", "sealed", "sparse_key",
    "sparse_section", "sparse_stage", "stage_dir", "stage_key", "stages_dir", "store_id", "vector_space",
]
