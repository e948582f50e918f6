"""When `embed-collections run` may be served by the warm runner, and why not (no process started here)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from flows import warm_runner


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> warm_runner.Runner:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    return warm_runner.Runner(pid=1, started=None, host="h", address=warm_runner.address(tmp_path),
                              env=warm_runner.import_time_env(dict(os.environ), tmp_path),
                              code=warm_runner.code_fingerprint(), models=[])


def test_the_same_environment_and_code_are_served(record: warm_runner.Runner, tmp_path: Path) -> None:
    assert warm_runner.mismatch(record, tmp_path) is None


def test_a_variable_read_at_import_time_that_differs_is_named(record, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG" if record.env.get("PREFECT_LOGGING_LEVEL") != "DEBUG"
                       else "INFO")
    monkeypatch.setenv("EMBEDDER_DENSE__MODEL", "another")  # a setting: read by the run, not at import
    why = warm_runner.mismatch(record, tmp_path)
    assert why == "it was started with other values of PREFECT_LOGGING_LEVEL"


def test_prefect_home_given_or_defaulted_is_the_same_home(tmp_path: Path) -> None:
    env = warm_runner.import_time_env({"PREFECT_HOME": str(tmp_path / "." / "")}, tmp_path)
    assert env == warm_runner.import_time_env({}, tmp_path) == {"PREFECT_HOME": str(tmp_path.resolve())}


def test_changed_code_is_not_served(record: warm_runner.Runner, tmp_path: Path) -> None:
    older = dataclasses.replace(record, code="0" * 24)
    assert "the code on disk changed" in (warm_runner.mismatch(older, tmp_path) or "")


def test_homes_get_distinct_abstract_addresses(tmp_path: Path) -> None:
    a, b = warm_runner.address(tmp_path / "a"), warm_runner.address(tmp_path / "b")
    assert a != b and a.startswith("\0") and len(a) < 108


def test_a_runner_that_never_answers_is_not_waited_for(tmp_path, monkeypatch, capsys) -> None:
    """A live record whose socket is never accepted (a stopped or swamped runner): the run runs itself."""
    import json
    import socket

    from embedder.procs import owner

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setattr(warm_runner, "ACCEPT_TIMEOUT_S", 0.5)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stuck.bind(warm_runner.address(tmp_path))
    stuck.listen(1)  # the connection is queued, never accepted
    try:
        (tmp_path / warm_runner.RECORD).write_text(json.dumps({
            **owner(), "address": warm_runner.address(tmp_path), "models": [],
            "env": warm_runner.import_time_env(os.environ, tmp_path), "code": warm_runner.code_fingerprint()}))
        assert warm_runner.dispatch(["run", "--help"]) is None
    finally:
        stuck.close()
    assert f"not using the warm runner (pid {os.getpid()}): it did not answer within 0.5 s" in capsys.readouterr().err
