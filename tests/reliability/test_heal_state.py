"""Damaged stage results, a full disk and read-only storage, met the way users meet them.

A damaged stage directory is set aside and its stage runs again; a full disk
fails the run without taking the last good run set out of service; a read-only
output dir is still searched, and a run into it fails in one line; two runs of a
collection queue on the output dir itself, whatever their Prefect home.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedder.errors import EmbedderError
from embedder.io.writers import read_jsonl_records
from tests.conftest import REPO, SAMPLE_DIR
from tests.helpers.homes import cli_env
from tests.helpers.sample_runs import answers, ranked, run_one, sample_config
from tests.helpers.wrapped_cli import cli_with_dense_hook

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def _same_exports(out: Path, clean_out: Path) -> None:
    a, b = pq.read_table(out / "sample" / "dense.parquet"), pq.read_table(clean_out / "sample" / "dense.parquet")
    assert a["id"].to_pylist() == b["id"].to_pylist()
    va = np.stack(a["vector"].to_numpy(zero_copy_only=False))
    vb = np.stack(b["vector"].to_numpy(zero_copy_only=False))
    assert np.allclose(va, vb, atol=1e-6)
    sa = read_jsonl_records(out / "sample" / "sparse.jsonl")
    sb = read_jsonl_records(clean_out / "sample" / "sparse.jsonl")
    assert [r["sparse_vector"] for r in sa] == [r["sparse_vector"] for r in sb]
    assert (out / "sample" / "chunks.parquet").read_bytes() == (clean_out / "sample" / "chunks.parquet").read_bytes()


def _stage_file(out: Path, stage: str, pattern: str) -> Path:
    [path] = sorted((out / "sample" / ".stages" / stage).glob(f"*/{pattern}"))
    return path


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "missing":
        path.unlink()
        return
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped bytes":
        at = len(data) // 2
        data[at:at + 8] = bytes(b ^ 0x5A for b in data[at:at + 8])
    else:  # garbage
        at = len(data) // 3
        data[at:at + 256] = np.random.default_rng(5).integers(0, 256, 256, dtype=np.uint8).tobytes()
    with open(path, "r+b") as fh:  # in place, as a disk does: a hard-linked export shares the damage
        fh.write(bytes(data))
        fh.truncate(len(data))


@pytest.mark.parametrize(("stage", "pattern", "how"), [
    ("load", "chunks.parquet", "garbage"),
    ("dense", "dense.parquet", "flipped bytes"),
    ("sparse", "sparse-*.jsonl", "truncated"),
    ("load", "result.json", "garbage"),
    ("dense", "checksums.json", "missing"),
])
def test_a_damaged_stage_directory_is_set_aside_and_the_stage_runs_again(stage, pattern, how, clean_sample_run,
                                                                         tmp_path):
    from embedder.io.integrity import check_dir
    from embedder.verify import verify_collection

    clean_out, clean_answers = clean_sample_run
    out = tmp_path / "out"
    assert run_one(sample_config(out)).status == "completed"
    path = _stage_file(out, stage, pattern)
    _damage(path, how)
    if pattern != "checksums.json":  # a directory without checksums is one verify cannot judge, and a run distrusts
        assert "stage directory" in {f.kind for f in verify_collection(out, "sample").damaged}

    summary = run_one(sample_config(out))  # the nightly re-run, same input: every stage would be served from its store
    assert summary.status == "completed", summary.warnings
    [q] = [q for q in summary.integrity.quarantined if q["stage"] == stage]
    assert f".stages/quarantine/{stage}/" in q["file"] and Path(q["file"]).is_dir()
    assert Path(q["file"] + ".reason.txt").read_text().strip().endswith(q["reason"])
    assert check_dir(path.parent).ok  # the stage wrote the directory anew, under the same key
    assert any(f"{stage}: its stored result was damaged" in w for w in summary.warnings), summary.warnings
    assert summary.dense_run.total_embeddings_generated == 0  # the vectors themselves were sound: nothing embedded
    _same_exports(out, clean_out)
    assert answers(out) == clean_answers
    assert verify_collection(out, "sample").damaged == []


class _FullDisk:
    """A Parquet writer on a disk that fills up: the first row group fails with ENOSPC."""

    def __init__(self, where: str, *args: object, **kwargs: object) -> None:
        self.where = where
        Path(where).write_bytes(b"PAR1" + b"\0" * 1000)  # what was written before the disk filled

    def write_table(self, table: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.where)

    def close(self) -> None:
        pass


class _VectorStoreDisk:
    """``pyarrow.parquet`` as the vector store sees it on a full disk (the rest of the run writes as usual)."""

    ParquetWriter = _FullDisk

    def __getattr__(self, name: str) -> object:
        return getattr(pq, name)


def test_a_full_disk_while_the_vector_store_is_written_fails_cleanly_and_the_next_run_heals(
        clean_sample_run, tmp_path, monkeypatch):
    from embedder.io import vector_cache
    from embedder.verify import verify_collection

    clean_out, clean_answers = clean_sample_run
    out = tmp_path / "out"
    monkeypatch.setattr(vector_cache, "pq", _VectorStoreDisk())
    with pytest.raises(EmbedderError, match="dense"):
        run_one(sample_config(out))
    failed = json.loads((out / "sample" / "processing_summary.json").read_text())
    assert failed["status"] == "failed" and failed["failed_stage"] == "dense"
    assert any("No space left on device" in w for w in failed["warnings"]), failed["warnings"]
    vectors = out / "sample" / ".stages" / "vectors"
    assert not list(vectors.rglob("*.tmp")) and not list(vectors.rglob("part-*.parquet"))  # nothing half-written
    assert verify_collection(out, "sample").damaged == []

    monkeypatch.undo()  # the disk has room again
    summary = run_one(sample_config(out))
    assert summary.status == "completed" and summary.dense_run.total_embeddings_generated == 50
    _same_exports(out, clean_out)
    assert answers(out) == clean_answers


def test_a_full_disk_in_export_after_a_model_switch_never_takes_the_last_good_index_out_of_service(
        clean_sample_run, tmp_path, tiny_dense_model, monkeypatch):
    from embedder import report
    from embedder.io.runset import current_run

    clean_out, clean_answers = clean_sample_run
    out = tmp_path / "out"
    first = run_one(sample_config(out))
    good_set = current_run(out, "sample")
    real_link = report._link_atomic

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # The disk fills during the export of a run with a new dense model, and stays full for the carry-forward.
    monkeypatch.setattr(report, "write_jsonl", full)
    monkeypatch.setattr(report, "_link_atomic", full)
    with pytest.raises(EmbedderError, match="the last good run set stays current"):
        run_one(sample_config(out, dense_model=str(tiny_dense_model)))
    assert current_run(out, "sample") == good_set
    assert answers(out) == clean_answers  # MiniLM queries against MiniLM's index, as before
    [failed_path] = [p for p in (out / "sample" / "runs").glob("*/processing_summary.json")
                     if p.parent != good_set]
    failed = json.loads(failed_path.read_text())
    assert failed["status"] == "failed" and failed["failed_stage"] == "export"
    assert any("it is not published, the last good run set stays current" in w for w in failed["warnings"])

    # The disk has room for links (the carry-forward) but not for the export: the failed set is published,
    # carrying the last good exports and index, and search still uses the model that built that index.
    monkeypatch.setattr(report, "_link_atomic", real_link)
    with pytest.raises(EmbedderError, match="export"):
        run_one(sample_config(out, dense_model=str(tiny_dense_model)))
    carried = json.loads((out / "sample" / "processing_summary.json").read_text())
    assert carried["status"] == "failed" and carried["exports_run_id"] == str(first.run_id)
    assert answers(out) == clean_answers

    monkeypatch.undo()
    switched = run_one(sample_config(out, dense_model=str(tiny_dense_model)))
    assert switched.status == "completed" and switched.index_run.action == "rebuilt"
    assert len(answers(out)[0]) == 5


def _read_only(out: Path, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``command`` with ``out`` read-only: a read-only bind mount (as root), else no write permission."""
    if os.geteuid() == 0:
        script = f'mount --bind "{out}" "{out}" && mount -o remount,ro,bind "{out}" && exec "$@"'
        return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *command], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    subprocess.run(["chmod", "-R", "a-w", str(out)], check=True)
    try:
        return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(out)], check=True)


def test_search_answers_from_a_read_only_output_dir_and_a_run_into_it_fails_in_one_line(clean_sample_run, tmp_path):
    clean_out, clean_answers = clean_sample_run
    out = tmp_path / "out"
    shutil.copytree(clean_out, out, symlinks=True)
    before = os.readlink(out / "sample" / "current")
    env = cli_env(tmp_path / "home", TMPDIR=str(tmp_path))
    cli = [sys.executable, "-m", "flows.cli"]

    found = _read_only(out, [*cli, "search", "--output-dir", str(out), "--collection", "sample", "--query",
                             "how do bees make honey", "--top-k", "5", "--no-rerank", "--json"], env)
    assert found.returncode == 0, found.stderr[-3000:]
    resp = json.loads(found.stdout)
    assert ranked([(h["id"], h["score"]) for h in resp["hits"]]) == clean_answers[0]
    assert any("read-only" in w and "private copy" in w for w in resp["warnings"]), resp["warnings"]
    assert not list(tmp_path.glob("embedder-sample-*"))  # the private copy is gone with the process

    ran = _read_only(out, [*cli, "run", "--input", str(SAMPLE_DIR), "--collection", "sample", "--output-dir",
                           str(out), "--local-files-only", "--disable-rerank"], env)
    assert ran.returncode == 1
    [error] = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert "needs write access to its output dir" in error and "read-write" in error, ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr and os.readlink(out / "sample" / "current") == before


def test_two_runs_with_separate_prefect_homes_queue_on_the_output_dir(tmp_path):
    """Neither sees the other's Prefect lease; the lock on the output dir makes the second wait for the first."""
    out = tmp_path / "out"
    args = ["run", "--input", str(SAMPLE_DIR), "--collection", "sample", "--output-dir", str(out),
            "--local-files-only", "--disable-rerank"]

    def env(home: str) -> dict[str, str]:
        return cli_env(tmp_path / home)

    # The first run dwells in its dense stage until the second has started its collection's flow run.
    go = tmp_path / "go"
    slow = cli_with_dense_hook(f"""
        deadline = time.monotonic() + 300
        while calls[0] == 1 and not os.path.exists({str(go)!r}) and time.monotonic() < deadline:
            time.sleep(0.1)
    """)
    first = subprocess.Popen([sys.executable, "-c", slow, *args], env=env("home-a"), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    runs = out / "sample" / "runs"
    while not list(runs.glob("*/run.json")):
        assert first.poll() is None, first.communicate()[0][-3000:]
        time.sleep(0.2)
    second = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env("home-b"), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    said: list[str] = []
    for line in second.stdout:  # type: ignore[union-attr]
        said.append(line)
        if "Beginning subflow run 'embed-collection-sample'" in line:
            break
    time.sleep(3)  # the second now waits on the output dir's lock
    assert len(list(runs.glob("*/run.json"))) == 1
    go.touch()
    said.append(second.communicate(timeout=600)[0])
    first_out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, first_out[-3000:]
    assert second.returncode == 0, "".join(said)[-3000:]
    assert "waited" in "".join(said) and "for another run of collection 'sample'" in "".join(said), said[-1][-3000:]

    # One run at a time wrote the collection: each run set was written start to end before the next began.
    spans = sorted((json.loads((p / "run.json").read_text())["started_at"],
                    (p / "processing_summary.json").stat().st_mtime) for p in runs.iterdir() if p.is_dir())
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]


def test_verify_names_the_damage_and_repair_heals_it_through_a_run(clean_sample_run, tmp_path):
    """`embed-collections verify` as a user runs it: a table and exit 1; `--repair`; then sound, exit 0."""
    clean_out, clean_answers = clean_sample_run
    out = tmp_path / "out"
    env = cli_env(tmp_path / "home")
    cli = [sys.executable, "-m", "flows.cli"]
    first = subprocess.run([*cli, "run", "--input", str(SAMPLE_DIR), "--collection", "sample", "--output-dir",
                            str(out), "--local-files-only", "--disable-rerank"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    [part] = sorted((out / "sample" / ".stages" / "vectors").glob("*/part-*.parquet"))[:1]
    _damage(part, "garbage")
    sparse = _stage_file(out, "sparse", "sparse-*.jsonl")
    _damage(sparse, "truncated")

    found = subprocess.run([*cli, "verify", "--output-dir", str(out)], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "2 DAMAGED" in found.stdout and part.name in found.stdout and str(sparse.parent) in found.stdout
    assert "verify --repair" in found.stderr
    as_json = subprocess.run([*cli, "verify", "--output-dir", str(out), "--json"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    [report] = json.loads(as_json.stdout)
    assert sorted(d["kind"] for d in report["damaged"]) == ["stage directory", "vector part"]

    repaired = subprocess.run([*cli, "verify", "--output-dir", str(out), "--collection", "sample", "--repair"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert repaired.returncode == 0, repaired.stdout[-3000:] + repaired.stderr[-3000:]
    assert repaired.stdout.count("set aside: ") == 2 and "after the repair run:" in repaired.stdout
    assert repaired.stdout.rstrip().splitlines()[-1].endswith("sound")
    again = subprocess.run([*cli, "verify", "--output-dir", str(out)], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "sound" in again.stdout
    _same_exports(out, clean_out)
    assert answers(out) == clean_answers
