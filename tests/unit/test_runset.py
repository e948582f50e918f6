"""Run sets: one atomic switch publishes a whole set, and stable names follow exactly what the set holds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embedder.io.runset import collect_runs, current_run, publish_run, run_dir


def _write_set(out: Path, run_id: str, names: dict[str, str]) -> Path:
    path = run_dir(out, "docs", run_id)
    for name, body in names.items():
        (path / name).write_text(body)
    return path


def test_stable_names_follow_the_published_set_and_vanish_with_a_stage_that_did_not_run(tmp_path):
    out = tmp_path / "out"
    first = _write_set(out, "r1", {"dense.parquet": "1", "rerank.jsonl": "1", "processing_summary.json": "1"})
    assert publish_run(out, "docs", first) is None
    assert (out / "docs" / "rerank.jsonl").read_text() == "1"

    # The next run had no queries: its set has no rerank.jsonl, so the stable name goes too.
    second = _write_set(out, "r2", {"dense.parquet": "2", "processing_summary.json": "2"})
    assert publish_run(out, "docs", second) == first.resolve()
    cdir = out / "docs"
    assert current_run(out, "docs") == second.resolve()
    assert (cdir / "dense.parquet").read_text() == "2" and (cdir / "processing_summary.json").read_text() == "2"
    assert not os.path.lexists(cdir / "rerank.jsonl")


def test_a_plain_file_an_earlier_version_wrote_is_replaced_or_removed(tmp_path):
    out = tmp_path / "out"
    cdir = out / "docs"
    cdir.mkdir(parents=True)
    (cdir / "dense.parquet").write_text("old")
    (cdir / "rerank.jsonl").write_text("old")  # from an earlier version's run, not this one's
    publish_run(out, "docs", _write_set(out, "r1", {"dense.parquet": "new"}))
    assert (cdir / "dense.parquet").is_symlink() and (cdir / "dense.parquet").read_text() == "new"
    assert not os.path.lexists(cdir / "rerank.jsonl")


def test_only_the_published_set_and_the_one_before_it_are_kept(tmp_path):
    out = tmp_path / "out"
    sets = []
    for i in range(4):
        path = _write_set(out, f"r{i}", {"dense.parquet": str(i)})
        os.utime(path, (1_000 + i, 1_000 + i))
        publish_run(out, "docs", path)
        sets.append(path.name)
    failed = [_write_set(out, f"f{i}", {"processing_summary.json": "failed"}) for i in range(5)]
    for i, path in enumerate(failed):
        os.utime(path, (2_000 + i, 2_000 + i))
    collect_runs(out, "docs")
    left = sorted(p.name for p in (out / "docs" / "runs").iterdir())
    # Published: r2 and r3 (current); unpublished (failed) runs: the newest three.
    assert left == ["f2", "f3", "f4", "r2", "r3"]


def test_a_directory_outside_the_collection_cannot_be_published(tmp_path):
    other = run_dir(tmp_path / "elsewhere", "docs", "r1")
    with pytest.raises(ValueError):
        publish_run(tmp_path / "out", "docs", other)


def test_a_set_still_being_written_is_never_pruned_and_holds_back_the_cutoff(tmp_path):
    import json
    import subprocess
    import sys
    import time

    from embedder.io.runset import close_run, open_run, retention_cutoff

    out = tmp_path / "out"
    mine = open_run(out, "docs", "a-live")  # this process: alive
    os.utime(mine, (1, 1))  # the oldest set of all
    # A set left behind by a process that is gone (killed mid-run).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = open_run(out, "docs", "b-dead")
    info = json.loads((gone / "run.json").read_text())
    (gone / "run.json").write_text(json.dumps(info | {"pid": int(dead.stdout), "started": None}))
    os.utime(gone, (2, 2))
    newer = [open_run(out, "docs", f"c{i}") for i in range(3)]
    for path in newer:
        close_run(path)  # finished without publishing: failed runs
    collect_runs(out, "docs")
    left = {p.name for p in (out / "docs" / "runs").iterdir()}
    assert "a-live" in left and "b-dead" not in left and {"c0", "c1", "c2"} <= left
    # The live run started before every other: stage results it looked up must stay until it finishes.
    started = json.loads((mine / "run.json").read_text())["started_at"]
    assert retention_cutoff(out, "docs") == started
    close_run(mine)
    assert retention_cutoff(out, "docs") >= time.time() - 5  # nothing published, nothing live: no hold-back
