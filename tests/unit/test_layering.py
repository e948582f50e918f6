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
