"""Shared fixtures: an isolated Prefect home, one session-scoped test harness, tiny real models."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Before prefect is imported anywhere: keep its database, results and analytics out of the user's home.
_PREFECT_HOME = tempfile.mkdtemp(prefix="embedder-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
os.environ["HF_HUB_OFFLINE"] = "1"
# Three workers and their CLI processes share two cores: torch's OpenMP threads, one per core in each
# process, spin while they wait for each other and burn a fifth of the suite's CPU doing so. One thread a
# process gives the same wall time on a busy machine (every process and its children inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("PREFECT_API_URL", None)
# As tasks.lease sets it for every run on the ephemeral server: leases on disk, visible to every process.
os.environ["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] = "prefect.server.concurrency.lease_storage.filesystem"
for _var in [v for v in os.environ if v.startswith("EMBEDDER_") or v in ("QDRANT_URL", "QDRANT_API_KEY")]:
    os.environ.pop(_var)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "examples" / "sample_collection"
SAMPLE_QUERIES = REPO / "examples" / "queries.jsonl"
SAMPLE_QRELS = REPO / "examples" / "qrels.tsv"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCIFACT = REPO.parent / "shared" / "datasets" / "scifact"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for the whole session (setup costs ~20 s once)."""
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOGGING_TO_API_ENABLED,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_LOGGING_TO_API_ENABLED: False,
                                     PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def _tiny_ce_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_models import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce") / "model")


@pytest.fixture
def tiny_cross_encoder(_tiny_ce_master: Path, tmp_path: Path) -> Path:
    """A trained tiny CrossEncoder directory, copied per test so no test can spoil another's."""
    dst = tmp_path / "tiny-ce"
    shutil.copytree(_tiny_ce_master, dst)
    return dst


@pytest.fixture
def sample_config(tmp_path: Path):  # noqa: ANN201 - returns RunConfig, imported lazily
    """A RunConfig over the shipped sample collection, writing into a temp dir."""
    from embedder.settings import CollectionInput, RunConfig

    return RunConfig(
        collections=[CollectionInput(name="sample", path=str(SAMPLE_DIR))],
        queries_path=str(SAMPLE_QUERIES), qrels_path=str(SAMPLE_QRELS), output_dir=str(tmp_path / "out"),
        local_files_only=True,
    )


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path, extra_env: dict[str, str] | None = None, timeout_s: float = 180,
                         ui: bool = False) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` on a free loopback port with its home in ``home``; return it and its API URL.

    Args:
        ui: Serve the UI too (at the URL without ``/api``), pointed at this server's API.
    """
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    from tests.helpers.homes import seeded_home

    env = {**os.environ, "PREFECT_HOME": str(seeded_home(home)), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true" if ui else "false", "PREFECT_UI_API_URL": url, **(extra_env or {})}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", None)  # a server as users start it: Prefect's defaults
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port), *([] if ui else ["--no-ui"])], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((home / "server.log").read_text())
        time.sleep(0.5)
    stop_process_group(proc)
    raise RuntimeError(f"prefect server did not become healthy in {timeout_s:.0f} s: "
                       f"{(home / 'server.log').read_text()[-3000:]}")


def process_group_gone(pgid: int, wait_s: float = 0.0) -> bool:
    """Whether no process of the group ``pgid`` is left, waiting up to ``wait_s`` for the last ones to exit."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM a process started with ``start_new_session`` and its children; SIGKILL what outlives it."""
    stop_process_groups([proc], timeout_s)


def stop_process_groups(procs: list[subprocess.Popen], timeout_s: float = 30) -> None:
    """Stop several process groups at once: SIGTERM to all, one shared grace period, then SIGKILL.

    One after another, each group's grace period would add up (a Prefect worker takes its whole
    grace period to stop).
    """
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server start` on loopback, with its own database; yields its API URL."""
    proc, url = start_prefect_server(tmp_path_factory.mktemp("server-home"), timeout_s=120)
    yield url
    stop_process_group(proc)


@pytest.fixture(scope="session")
def tiny_dense_model(tmp_path_factory, _tiny_ce_master: Path) -> Path:
    """A 64-dim sentence-transformers model built from the tiny BERT: another model, another dimension."""
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(str(_tiny_ce_master), max_seq_length=128)
    dim = (getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension)()
    model = SentenceTransformer(modules=[word, models.Pooling(dim, "mean")])
    path = tmp_path_factory.mktemp("tiny-dense") / "model"
    model.save(str(path))
    return path


@pytest.fixture(scope="session")
def clean_sample_run(tmp_path_factory: pytest.TempPathFactory, prefect_harness) -> tuple[Path, list]:
    """One clean run of the sample collection (read it, never write it) and what search answered after it."""
    from tests.helpers.sample_runs import answers, run_one, sample_config

    out = tmp_path_factory.mktemp("clean-sample") / "out"
    assert run_one(sample_config(out)).status == "completed"
    return out, answers(out)


# --- the fast tier stays fast, checked without a clock ------------------------------------------------

# What makes a test take more than a few seconds here: a Prefect server or flow, a worker, a CLI process.
# A test in the fast tier (`make test-fast`: tests/unit and tests/models without slow or live) that uses
# one must say so with a mark; a timing check would fail on a loaded machine, this one cannot.
_HEAVY_FIXTURES = frozenset({"prefect_harness", "prefect_server", "clean_sample_run", "live", "deployed", "fleet"})
_HEAVY_CALLS = ("embed_collections", "run_one", "run_flow", "start_prefect_server", "_cli", "wrapped_cli")
_FAST_TIER = ("tests/unit/", "tests/models/")


def _heavy_use(item: pytest.Item) -> str | None:
    """What ``item`` starts that the fast tier must not, or None."""
    import inspect
    import re

    used = _HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
    if used:
        return f"uses {sorted(used)}"
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return None
    body = source.split(":", 1)[-1]  # not the test's own name
    calls = [call for call in _HEAVY_CALLS if re.search(rf"(?<![\w.]){call}\(", body)]
    return f"calls {calls}" if calls else None


# The files that take longest (a full run on three workers, 2026-12-06), longest first. xdist hands whole
# files (--dist loadfile) to the workers in collection order, so the long ones start first and the short
# ones fill the gaps at the end, instead of one worker running a long file alone while the others idle.
# Only the wall time depends on this order; a file missing here keeps its place after these.
_LONGEST_FIRST = (
    "tests/flows/test_lease.py", "tests/reliability/test_heal_state.py", "tests/flows/test_reruns.py",
    "tests/reliability/test_faults.py", "tests/flows/test_pipeline.py", "tests/reliability/test_heal.py",
    "tests/reliability/test_crash.py", "tests/flows/test_eval.py", "tests/flows/test_bench_gpu.py",
    "tests/flows/test_failures.py", "tests/reliability/test_signals.py", "tests/flows/test_fleet.py",
    "tests/flows/test_serve.py", "tests/flows/test_deployments.py", "tests/flows/test_service.py",
    "tests/reliability/test_heal_index.py", "tests/flows/test_live.py", "tests/flows/test_warm_server.py",
    "tests/unit/test_engine.py", "tests/models/test_models.py", "tests/unit/test_stage_keys.py",
    "tests/unit/test_streaming.py", "tests/flows/test_dense_blend.py", "tests/models/test_store.py",
)


def pytest_configure(config: pytest.Config) -> None:
    # xdist reorders the files by their number of tests unless told not to, which put the long files
    # with one or two tests last: one worker ran them alone for minutes at the end.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _where(item: pytest.Item) -> str:
    """The test file of ``item``, relative to the repository."""
    return str(Path(str(item.fspath)).relative_to(REPO))


def _longest_first(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(_LONGEST_FIRST)}
    # Stable: within a file, and among the files not listed, the collection order stays.
    items.sort(key=lambda item: rank.get(_where(item), len(rank)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _longest_first(items)
    offenders = []
    for item in items:
        if (not _where(item).startswith(_FAST_TIER) or item.get_closest_marker("slow")
                or item.get_closest_marker("live")):
            continue
        if (why := _heavy_use(item)) is not None:
            offenders.append(f"{item.nodeid} {why}")
    if offenders:
        raise pytest.UsageError("tests in the fast tier that start a server, flow or CLI process must be marked "
                                "slow or live:\n  " + "\n  ".join(offenders))


_SLOW_S = 10.0
_unmarked_slow: list[tuple[float, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Reported, never failed on: a loaded machine runs anything past any limit (the check above is the gate).
    if report.when == "call" and report.duration > _SLOW_S and report.nodeid.startswith(_FAST_TIER):
        if not {"slow", "live"} & set(report.keywords):
            _unmarked_slow.append((report.duration, report.nodeid))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _unmarked_slow:
        terminalreporter.write_sep("-", f"fast-tier tests over {_SLOW_S:.0f} s without a slow mark (mark them)")
        for duration, nodeid in sorted(_unmarked_slow, reverse=True):
            terminalreporter.write_line(f"{duration:6.1f} s  {nodeid}")
