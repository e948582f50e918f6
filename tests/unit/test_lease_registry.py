"""The holder registry's calls ride out a busy SQLite server in milliseconds, and never give up sooner than before."""

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

import tasks.lease as lease


def _answer(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("DELETE", "http://127.0.0.1:9/api/variables/name/embedder-lease-x")
    return httpx.HTTPStatusError(f"{status}", request=request, response=httpx.Response(status, request=request))


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    # A fault injected in place of the server: the registry's own waits are recorded, not slept.
    slept: list[float] = []
    monkeypatch.setattr(lease.time, "sleep", slept.append)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        yield slept


def _flaky(busy: int, status: int = 503) -> tuple[list[int], object]:
    retries: list[int] = []

    def call(_client: object) -> str:
        retries.append(PREFECT_CLIENT_MAX_RETRIES.value())
        if len(retries) <= busy:
            raise _answer(status)
        return "done"

    return retries, call


def test_a_busy_answer_is_retried_after_milliseconds_without_the_clients_two_second_back_off(sleeps):
    retries, call = _flaky(busy=2)
    assert lease._busy_tolerant(call) == "done"
    assert retries == [0, 0, 0]
    assert sleeps == [0.05, 0.1]


def test_a_server_busy_past_the_quick_attempts_gets_the_clients_own_retries_last(sleeps):
    retries, call = _flaky(busy=len(lease.BUSY_RETRY_DELAYS_S))
    assert lease._busy_tolerant(call) == "done"
    assert retries[:-1] == [0] * len(lease.BUSY_RETRY_DELAYS_S)
    assert retries[-1] == PREFECT_CLIENT_MAX_RETRIES.value() > 0
    retries, call = _flaky(busy=99)
    with pytest.raises(httpx.HTTPStatusError):
        lease._busy_tolerant(call)


def test_other_errors_are_raised_at_once(sleeps):
    retries, call = _flaky(busy=1, status=500)
    with pytest.raises(httpx.HTTPStatusError):
        lease._busy_tolerant(call)
    assert retries == [0] and sleeps == []
