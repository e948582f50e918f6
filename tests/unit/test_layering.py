import subprocess
import sys

from tests.conftest import REPO


def test_import_embedder_does_not_import_prefect():
    code = (
        "import sys, embedder, embedder.settings, embedder.summary, embedder.stages, embedder.report, "
        "embedder.io.readers, embedder.fusion, embedder.models.sparse, embedder.models.rerank; "
        "print('prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_embedder_sources_never_mention_prefect_imports():
    offenders = [p for p in (REPO / "embedder").rglob("*.py")
                 if "import prefect" in p.read_text() or "from prefect" in p.read_text()]
    assert offenders == []


def test_the_modules_a_run_plans_with_import_no_model_runtime():
    """A re-run with nothing to embed imports these and never runs a model: torch, sentence-transformers,
    fastembed and onnxruntime must load only with a model, where they cost seconds of CPU on every night."""
    heavy = ("torch", "sentence_transformers", "transformers", "fastembed", "onnxruntime")
    code = (
        "import sys, flows.cli, flows.embed_collections, tasks.stages, tasks.lease, embedder.report, "
        "embedder.stages.dense, embedder.stages.sparse, embedder.stages.rerank, embedder.stages.fuse, "
        "embedder.stages.index, embedder.gpu, embedder.models.engine, embedder.batching; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_is_oom_tells_a_cuda_oom_from_other_errors_without_importing_torch_first():
    code = (
        "import sys; from embedder.gpu import is_oom; "
        "before = [is_oom(RuntimeError('CUDA out of memory. Tried to allocate 2 GiB')), is_oom(ValueError('x')), "
        "'torch' in sys.modules]; "
        "import torch; "
        "after = [is_oom(torch.cuda.OutOfMemoryError('boom')), is_oom(RuntimeError('shape mismatch'))]; "
        "print(before, after)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[True, False, False] [True, False]"
