"""The nightly re-run, side by side with LlamaIndex's IngestionPipeline: whole processes, interleaved.

Both sides index the same SciFact abstracts with the same all-MiniLM-L6-v2 (from its wheel) and the same
fastembed BM25 (the project's shipped directory and stopwords), hybrid, into their store, offline:

- ``project``: ``embed-collections run`` (rerank off) with a temporary Prefect server per run, as a
  cron job would call it;
- ``project-warm``: the same with ``embed-collections server start`` run once before the round (the warm
  server and the warm runner, which imports Prefect and loads the models once and forks each run; its
  cost is reported apart, as ``warm_start``); the CPU seconds of the server and the runner during each
  step (``server_cpu_s``: their processes and the children they reaped) are counted into the step's CPU,
  since they do part of every run's work;
- ``llamaindex``: bench/peer_llamaindex.py, a docstore-backed ``IngestionPipeline``
  (``UPSERTS_AND_DELETE``) writing Qdrant (qdrant-client on disk), in its own virtual environment.

Each round runs three steps per side, in a fresh directory: the first run, an unchanged re-run, and an
edit (one document changed, ten deleted, five added). Per step: wall and CPU seconds of the whole process
tree, its peak RSS, the embeddings computed, the points in the index, and the bytes on disk. After the
edit, each side is checked: points = documents, no deleted document found by its own title, the edited
document found by its new text, once. The sides' order alternates between rounds. Ratios are
project ÷ LlamaIndex, per step, on the median of the rounds.

The peer's environment is built once (``--setup``) into ``.venv-peers`` from bench/peers-requirements.txt;
nothing of it is needed by the project, its tests or CI.

Usage:
    python bench/peers.py --setup                 # build .venv-peers (needs the package index)
    python bench/peers.py [--docs 2000] [--rounds 2] [--name peers]   # bench/results/<name>.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import write_result  # noqa: E402

SCIFACT = REPO.parent / "shared" / "datasets" / "scifact"
PEER_VENV = REPO / ".venv-peers"
PROJECT_BIN = Path(sys.executable).parent
STEPS = ("first", "unchanged", "edit")
DELETED = 10
ADDED = 5


def setup() -> None:
    """Build the peer's virtual environment from bench/peers-requirements.txt."""
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(PEER_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "-r",
                    str(REPO / "bench" / "peers-requirements.txt")], check=True)


def corpus(n: int) -> list[dict[str, str]]:
    """The first ``n + ADDED`` SciFact abstracts as ``{id, text}`` (title, then abstract)."""
    rows = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)
            rows.append({"id": str(doc["_id"]), "title": doc.get("title", ""),
                         "text": f"{doc.get('title', '')}\n{doc['text']}".strip()})
            if len(rows) == n + ADDED:
                break
    return rows


def edited(docs: list[dict[str, str]], n: int) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The collection after the night's change: doc 0 edited, docs 10-19 deleted, five new docs added."""
    base = [dict(d) for d in docs[:n]]
    base[0]["text"] += " Edited: zebrafish lanthanum telomere quorum."
    gone = [d["id"] for d in base[10:10 + DELETED]]
    kept = [d for d in base if d["id"] not in gone] + [dict(d) for d in docs[n:n + ADDED]]
    return kept, {"edited": base[0], "gone": [d for d in docs[10:10 + DELETED]]}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows), encoding="utf-8")


def measured(cmd: list[str], env: dict[str, str]) -> tuple[dict[str, float], str]:
    """Run a whole process; its wall and CPU seconds (with the descendants it reaped) and peak RSS."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=err, text=True)
        _pid, status, usage = os.wait4(proc.pid, 0)  # the child's own usage, its reaped descendants' included
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "rss_gb": round(usage.ru_maxrss / 1024 / 1024, 3)}, stdout


def tree_cpu_s(pid: int) -> float:
    """CPU seconds so far of ``pid`` and its live descendants, with the children each has reaped (``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15]) / tick  # utime, stime, cutime, cstime
            todo += [int(c) for t in Path(f"/proc/{p}/task").iterdir()
                     for c in (t / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue  # gone between the listing and the read
    return total


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` as ``du`` counts them: holes excluded, each file once however
    many hard links name it (an unchanged night links its exports to the published set's)."""
    seen: dict[tuple[int, int], int] = {}
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


class Project:
    """The project through its CLI; ``warm`` keeps a Prefect server between its runs."""

    def __init__(self, work: Path, warm: bool) -> None:
        self.work, self.warm = work, warm
        self.env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "HF_HUB_OFFLINE": "1"}
        self.env.pop("PREFECT_API_URL", None)
        self.out = work / "out"

    def start(self) -> dict[str, float] | None:
        """Once per round on the warm side: ``server start`` (the server, and the runner's imports and model
        loads), measured apart from the steps, whose CPU then counts only what each run made them do."""
        if not self.warm:
            return None
        figures, _ = measured([str(PROJECT_BIN / "embed-collections"), "server", "start"], self.env)
        figures["cpu_s"] = round(figures["cpu_s"] + sum(tree_cpu_s(p) for p in self._warm_pids()), 2)
        return figures

    def stop(self) -> None:
        if self.warm:
            subprocess.run([str(PROJECT_BIN / "embed-collections"), "server", "stop"], env=self.env,
                           capture_output=True)

    def _warm_pids(self) -> list[int]:
        """The warm server and its runner: each does part of every run's work, so their CPU is the run's."""
        home = self.work / "prefect-home"
        records = [home / "embedder-server.json", home / "embedder-runner.json"] if self.warm else []
        return [int(json.loads(p.read_text())["pid"]) for p in records if p.is_file()]

    def step(self, corpus_path: Path) -> dict[str, Any]:
        warm = self._warm_pids()
        before = sum(tree_cpu_s(p) for p in warm)
        figures, _ = measured([str(PROJECT_BIN / "embed-collections"), "run", "--input", str(corpus_path),
                               "--collection", "scifact", "--output-dir", str(self.out), "--disable-rerank",
                               "--local-files-only"], self.env)
        if warm:
            figures["server_cpu_s"] = round(sum(tree_cpu_s(p) for p in warm) - before, 2)
            figures["cpu_s"] = round(figures["cpu_s"] + figures["server_cpu_s"], 2)
        summary = json.loads((self.out / "scifact" / "processing_summary.json").read_text(encoding="utf-8"))
        return {**figures, "embedded": summary["dense_run"]["total_embeddings_generated"],
                "points": summary["index_run"]["points_count"], "status": summary["status"],
                "warm_runner": bool((summary["telemetry"].get("startup") or {}).get("warm_runner")),
                "disk_bytes": disk_bytes(self.out)}

    def search(self, queries: list[str], ids: list[str]) -> dict[str, Any]:
        code = (
            "import json,sys\nfrom embedder.service import SearchRequest, search_collection\n"
            "qs=json.loads(sys.argv[1]);out={}\n"
            "for q in qs:\n"
            "    req=SearchRequest(collection='scifact', query=q, top_k=10, rerank=False)\n"
            "    r=search_collection(sys.argv[2], req)\n"
            "    out[q]=[h.id for h in r.hits]\n"
            "print(json.dumps({'hits': out}))\n")
        r = subprocess.run([sys.executable, "-c", code, json.dumps(queries), str(self.out)], env=self.env,
                           cwd=REPO, capture_output=True, text=True, check=True)
        hits = json.loads(r.stdout.strip().splitlines()[-1])["hits"]
        # A point's id is a UUIDv5 of its chunk id, so the index holds an id once or not at all; what a
        # search can show is whether the edited text's own top 10 holds it once.
        return {"hits": hits, "counts": {i: max((h.count(i) for h in hits.values()), default=0) for i in ids}}


class LlamaIndex:
    """The peer, in its own environment."""

    def __init__(self, work: Path, model: str, bm25: str) -> None:
        self.work, self.model, self.bm25 = work, model, bm25
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.store = work / "store"

    def start(self) -> dict[str, float] | None:
        self.store.mkdir(parents=True, exist_ok=True)
        return None

    def stop(self) -> None:
        pass

    def _cmd(self, *args: str) -> list[str]:
        return [str(PEER_VENV / "bin" / "python"), str(REPO / "bench" / "peer_llamaindex.py"), *args,
                "--store", str(self.store), "--model", self.model, "--bm25", self.bm25]

    def step(self, corpus_path: Path) -> dict[str, Any]:
        figures, out = measured(self._cmd("ingest", "--corpus", str(corpus_path)), self.env)
        report = json.loads(out.strip().splitlines()[-1])
        return {**figures, "embedded": report["embedded"], "points": report["points"], "status": "completed",
                "disk_bytes": disk_bytes(self.store), "breakdown": report}

    def search(self, queries: list[str], ids: list[str]) -> dict[str, Any]:
        r = subprocess.run(self._cmd("search", "--queries", json.dumps(queries), "--count-ids", json.dumps(ids)),
                           env=self.env, cwd=REPO, capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])


def check_after_edit(side: Any, change: dict[str, Any], expected_points: int, points: int) -> dict[str, Any]:
    """Points = documents, no deleted document found by its own title, the edited text found once."""
    gone_titles = [d["title"] for d in change["gone"]]
    edited_doc = change["edited"]
    found = side.search([*gone_titles, edited_doc["text"]], [edited_doc["id"]])
    deleted_found = [d["id"] for d in change["gone"] if d["id"] in found["hits"].get(d["title"], [])]
    top = found["hits"].get(edited_doc["text"], [])
    return {"points_ok": points == expected_points, "deleted_found": deleted_found,
            "edited_top1": bool(top) and top[0] == edited_doc["id"],
            "edited_once": found["counts"].get(edited_doc["id"]) == 1}


def run_side(name: str, work: Path, docs: list[dict[str, str]], n: int, model: str, bm25: str) -> dict[str, Any]:
    """One side's three steps in a fresh directory."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    side: Any = LlamaIndex(work, model, bm25) if name == "llamaindex" else Project(work, warm=name == "project-warm")
    first, after = work / "first.jsonl", work / "edited.jsonl"
    write_jsonl(first, docs[:n])
    kept, change = edited(docs, n)
    write_jsonl(after, kept)
    started = side.start()
    try:
        steps: dict[str, Any] = {"warm_start": started} if started else {}
        if started:
            print(f"  {name:12s} server start wall {started['wall_s']:7.1f} s  cpu {started['cpu_s']:7.1f} s (once)",
                  flush=True)
        for step, path in zip(STEPS, (first, first, after)):
            steps[step] = side.step(path)
            print(f"  {name:12s} {step:10s} wall {steps[step]['wall_s']:7.1f} s  cpu {steps[step]['cpu_s']:7.1f} s  "
                  f"embedded {steps[step]['embedded']:5d}  points {steps[step]['points']:5d}  "
                  f"disk {steps[step]['disk_bytes'] / 1e6:7.1f} MB", flush=True)
        steps["checks"] = check_after_edit(side, change, len(kept), steps["edit"]["points"])
        print(f"  {name:12s} checks     {steps['checks']}", flush=True)
    finally:
        side.stop()
    return steps


def main() -> None:
    """Parse the arguments; build the peer or run the rounds and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="Build .venv-peers and exit.")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", default="project,project-warm,llamaindex")
    parser.add_argument("--work", type=Path, default=REPO / "output" / "peers")
    parser.add_argument("--name", default="peers", help="bench/results/<name>.json")
    args = parser.parse_args()
    if args.setup:
        setup()
        return
    if not (PEER_VENV / "bin" / "python").exists():
        sys.exit("the peer's environment is missing: run `python bench/peers.py --setup` first")
    from embedder.models.registry import resolve_model

    model = resolve_model("all-minilm-l6-v2", "dense").location
    bm25 = resolve_model("qdrant-bm25", "sparse").location
    docs = corpus(args.docs)
    sides = args.sides.split(",")
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        print(f"round {r + 1}: {', '.join(order)}", flush=True)
        rounds.append({name: run_side(name, args.work / f"r{r}-{name}", docs, args.docs, model, bm25)
                       for name in order})

    def median(side: str, step: str, key: str) -> float:
        return statistics.median(float(rnd[side][step][key]) for rnd in rounds)

    ratios: dict[str, Any] = {}
    if "llamaindex" in sides:
        for side in (s for s in sides if s != "llamaindex"):
            ratios[side] = {step: {key: round(median(side, step, key) / median("llamaindex", step, key), 2)
                                   for key in ("wall_s", "cpu_s", "disk_bytes")} for step in STEPS}
    medians = {side: {step: {key: median(side, step, key) for key in ("wall_s", "cpu_s", "rss_gb", "disk_bytes")}
                      for step in STEPS} for side in sides}
    write_result(args.name, {"docs": args.docs, "rounds": args.rounds, "sides": sides, "medians": medians,
                             "ratios_vs_llamaindex": ratios, "runs": rounds})


if __name__ == "__main__":
    main()
