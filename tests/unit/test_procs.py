"""Owner records: a holder is judged dead only when its process is provably gone from this host."""

from __future__ import annotations

import subprocess
import sys

from embedder.procs import owner, owner_dead


def test_this_process_is_alive_and_a_finished_one_is_dead():
    me = owner()
    assert not owner_dead(me)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert owner_dead(me | {"pid": int(proc.stdout)})


def test_a_reused_pid_is_not_the_recorded_owner():
    me = owner()
    if me["started"] is None:  # no /proc: start times unknown, a live pid counts as the owner
        assert not owner_dead(me | {"started": 1})
    else:
        assert owner_dead(me | {"started": me["started"] - 1})


def test_an_owner_on_another_host_or_an_unreadable_record_is_never_judged_dead():
    assert not owner_dead(owner() | {"host": "some-other-host", "pid": 999_999_999})
    assert not owner_dead({})
    assert not owner_dead({"host": owner()["host"], "pid": "not-a-pid"})
