"""`embed-collections`: the command-line interface (run, summary, validate, search, eval).

Prefect is imported only by the commands that run flows, so `validate` and
`summary` start fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from embedder import startup
from embedder.errors import CollectionsFailedError, EmbedderError
from embedder.summary import load_summary, render_summary_lines

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Embed document collections into search-ready vectors.")
console = Console(stderr=True)


# The temporary server's start-up (migrations on a fresh database, imports on a busy machine) can take
# minutes; Prefect's default of 20 s failed runs that would have worked.
EPHEMERAL_STARTUP_TIMEOUT_S = 300
# `search` when the collection has no usable index (none published, damaged, the server unreachable); a run fixes it.
EXIT_INDEX_UNAVAILABLE = 3


def _prefect_defaults() -> None:
    # First, before Prefect is imported (it reads its settings once): the warm server of this Prefect home.
    from flows.warm_server import use_warm_server

    if (url := use_warm_server()) is not None:
        console.print(f"using the warm Prefect server at {escape(url)} (`embed-collections server stop` stops it)")
    # Offline machines log telemetry errors otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Before anything starts the ephemeral server, which inherits it: leases on disk, so a run
    # can free the slot of one killed hard.
    from tasks.lease import use_shared_lease_storage

    use_shared_lease_storage()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_expected_errors_without_traceback)


def _start_temporary_server() -> None:
    """Start the temporary Prefect server now, timed for the summary's ``telemetry.startup``.

    The flow would start it on its first API call anyway; started here, its
    cost is measured apart from the flow's. Nothing happens when
    ``PREFECT_API_URL`` names a server.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    startup.mark(startup.SERVER_START)
    try:
        with get_client(sync_client=True) as client:
            client.api_healthcheck()
    except RuntimeError as exc:
        if (message := _server_error(exc)) is None:
            raise
        _fail(message)
    startup.mark(startup.SERVER_READY)


def _expected_errors_without_traceback(record: logging.LogRecord) -> bool:
    """Our own errors (a model that cannot load, a failed collection) are one clear line, not a traceback.

    Their messages say what failed and why; anything else keeps its traceback.
    """
    if record.exc_info and isinstance(record.exc_info[1], EmbedderError):
        message = record.getMessage()
        if str(record.exc_info[1]) not in message:
            message = f"{message} {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        record.msg, record.args = message, None
        record.exc_info = None
        record.exc_text = None
    return True


@contextlib.contextmanager
def stage_progress(title: str) -> Iterator[None]:
    """A progress bar per long stage (dense, sparse, index) on a terminal; elsewhere the stages log a line
    every few seconds instead (see `tasks.telemetry.ProgressReporter`)."""
    if not console.is_terminal:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tasks.telemetry import add_progress_listener, remove_progress_listener

    bars: dict[tuple[str, str], Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        progress.add_task(title, total=None)

        def listener(collection: str, stage: str, done: int, total: int) -> None:
            if (collection, stage) not in bars:
                bars[collection, stage] = progress.add_task(f"{collection} {stage}", total=total)
            progress.update(bars[collection, stage], completed=done, total=total)

        add_progress_listener(listener)
        try:
            yield
        finally:
            remove_progress_listener(listener)


def _blend(text: str | None) -> dict[str, float] | None:
    """``--dense-blend name=weight[,name=weight]`` as the dense_blend setting (None: not given).

    Raises:
        ConfigError: A part is not ``name=weight`` with a number.
    """
    from embedder.errors import ConfigError

    if text is None:
        return None
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.rpartition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(weight)
        except ValueError:
            raise ConfigError(f"--dense-blend {part!r}: write name=weight, for example "
                              "multilingual-e5-small-q4=0.9") from None
    return out


# The flags of `run` and `eval` that set a run setting: the parameter's name, the RunConfig field it sets,
# and how its text becomes the field's value. A flag's help is the field's own description, so a setting
# is described once; tests/unit/test_cli_settings.py checks every flag against the model.
def _split_models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",")]


SETTING_FLAGS: dict[str, tuple[str, Any]] = {
    "dense_model": ("dense.model", None),
    "dense_blend": ("dense.blend", _blend),
    "sparse_models": ("sparse.models", _split_models),
    "rerank_model": ("rerank.model", None),
    "enable_sparse": ("sparse.enabled", None),
    "enable_rerank": ("rerank.enabled", None),
    "rerank_candidates": ("rerank.top_k_candidates", None),
    "rerank_top_k": ("rerank.top_k", None),
    "fusion": ("fuse.method", None),
    "force_cpu": ("force_cpu", None),
    "local_files_only": ("local_files_only", None),
}


def _described(param: str, extra: str = "") -> str | None:
    """The help of a setting's flag: its RunConfig field's description (and how to write it on the CLI)."""
    from embedder.settings import setting_field

    description = setting_field(SETTING_FLAGS[param][0]).description or ""
    return " ".join(filter(None, (description, extra))) or None


# The setting flags `run` and `eval` share, declared once.
DenseModelOpt = Annotated[str | None, typer.Option("--dense-model", help=_described("dense_model"))]
DenseBlendOpt = Annotated[str | None, typer.Option(
    "--dense-blend", help=_described("dense_blend", "Write name=weight[,name=weight]."))]
SparseModelsOpt = Annotated[str | None, typer.Option(
    "--sparse-models", help=_described("sparse_models", "Comma-separated."))]
RerankModelOpt = Annotated[str | None, typer.Option("--rerank-model", help=_described("rerank_model"))]
EnableRerankOpt = Annotated[bool | None, typer.Option("--enable-rerank/--disable-rerank",
                                                      help=_described("enable_rerank"))]
RerankCandidatesOpt = Annotated[int | None, typer.Option("--rerank-candidates", help=_described("rerank_candidates"))]
LocalFilesOnlyOpt = Annotated[bool | None, typer.Option("--local-files-only", help=_described("local_files_only"))]


def setting_overrides(given: dict[str, Any]) -> dict[str, Any]:
    """RunConfig overrides from the setting flags given (a flag not given, or an off switch flag, sets nothing).

    Args:
        given: Parameter name -> value, for the command's setting flags.
    """
    out: dict[str, Any] = {}
    for param, value in given.items():
        field, parse = SETTING_FLAGS[param]
        if value is None or (param in ("force_cpu", "local_files_only") and value is False):
            continue
        out[field] = parse(value) if parse is not None else value
    return out


def _server_error(exc: BaseException) -> str | None:
    """A one-line explanation when ``exc`` is the temporary Prefect server failing to start, else None."""
    if "ephemeral Prefect API server" not in str(exc):
        return None
    timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    return (f"the temporary Prefect server did not start within {timeout} s; point PREFECT_API_URL at a running "
            "server (`prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api) or raise "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop the run between two batches; a second one ends the process at once.

    The first signal only records a stop request (`embedder.cancel`): the stage
    running raises at its next batch boundary, so the run unwinds through its
    normal paths: what dense and sparse embedded is stored, the leases are
    released, a ``cancelled`` summary is published beside the last good run set,
    and the temporary Prefect server stops with the process. The second signal
    kills this process's children (that server) and exits with 128 + the signal.
    """
    from embedder.cancel import clear, request_stop, stop_reason
    from embedder.procs import descendants

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop_reason() is None:
            request_stop(name)
            console.print(f"{name}: stopping after the current batch (again to stop at once)", soft_wrap=True)
            return
        for pid in descendants(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(128 + signum)

    clear()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _foreground_settings() -> Iterator[None]:
    """Prefect settings for a flow this command runs in the foreground.

    No flow-run heartbeats unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set:
    Prefect's heartbeat thread sleeps in 1 s steps and each flow run waits for
    it at its end, 2 s of an unchanged re-run (the run and its collection's
    subflow). A heartbeat only matters to an automation that marks silent runs
    Crashed, and this process reports its own stop (a signal, a failure) to the
    server; whoever has such an automation sets the variable, and deployment
    runs (worker, serve) keep Prefect's default.
    """
    if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in os.environ:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def run_in_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on a worker thread while the main thread waits, so only our signal handlers run.

    Prefect's flow engine replaces the SIGTERM handler of the thread that calls a
    flow, if it is the main thread, with one that raises inside whatever runs
    (mid-batch, mid-write). From a worker thread it cannot, and SIGTERM gets the
    same orderly stop as Ctrl-C (see :func:`stop_on_signals`).

    Raises:
        BaseException: Whatever ``fn`` raised.
    """
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            with _foreground_settings():
                box["result"] = fn(*args)
        except BaseException as exc:  # handed to the main thread as is
            box["error"] = exc

    thread = threading.Thread(target=target, name="embed-collections-run")
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: the main thread runs signal handlers between them
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_flow(cfg: Any) -> list[Any]:
    """The `embed_collections` flow on ``cfg`` (see :func:`run_in_thread`); a server that cannot start is one line.

    Raises:
        EmbedderError: What the flow raised (CollectionsFailedError carries every summary).
    """
    from flows.embed_collections import embed_collections

    try:
        summaries: list[Any] = run_in_thread(embed_collections, cfg)
    except RuntimeError as exc:
        if (message := _server_error(exc)) is None:
            raise
        _fail(message)
    return summaries


def _stopped_code() -> int | None:
    """The exit status of a run stopped by a signal (128 + its number), or None."""
    from embedder.cancel import stop_reason

    reason = stop_reason()
    return 128 + signal.Signals[reason].value if reason is not None and reason in signal.Signals.__members__ else None


def _fail(message: str, code: int = 1) -> NoReturn:
    # Unwrapped and unstyled: the message holds paths and ids to copy, and a "[" in one is not markup.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="A processing_summary.json (any v4.x).")],
    strict: Annotated[bool, typer.Option(
        "--strict", help="As this version writes them: v4.1, every contract key, no unknown keys.")] = False,
) -> None:
    """Exit 0 if the summary is valid, non-zero with the reason."""
    from embedder.summary import read_summary_json, summary_notes, validate_strict

    try:
        s = validate_strict(read_summary_json(path)) if strict else load_summary(path)
    except EmbedderError as exc:
        _fail(str(exc))
    typer.echo(f"valid{' (strict)' if strict else ''}: {path} (schema {s.schema_version})")
    for note in summary_notes(s):
        typer.echo(f"NOTE: {note}")


@app.command()
def summary(path: Annotated[Path, typer.Argument(help="A processing_summary.json (any v4.x).")]) -> None:
    """Print a processing summary as human-readable lines, with soft warnings for what is missing."""
    from embedder.summary import summary_notes

    try:
        s = load_summary(path)
    except EmbedderError as exc:
        _fail(str(exc))
    for line in render_summary_lines(s):
        typer.echo(line)
    for note in summary_notes(s):
        typer.echo(f"NOTE: {note}")


def build_config(
    *, input_path: Path, collection: str | None, output_dir: Path | None, queries: Path | None, qrels: Path | None,
    config_file: Path | None, overrides: dict[str, Any],
) -> Any:
    """Resolve the RunConfig for `run` from the CLI flags (defaults -> file -> env -> flags)."""
    from embedder.io.readers import discover_collections
    from embedder.settings import resolve_run_config

    cols = [{"name": n, "path": str(p.resolve())} for n, p in discover_collections(input_path, collection)]
    overrides = {
        **overrides, "collections": cols,
        "output_dir": str(output_dir.resolve()) if output_dir else None,
        "queries_path": str(queries.resolve()) if queries else None,
        "qrels_path": str(qrels.resolve()) if qrels else None,
    }
    return resolve_run_config(config_file, overrides)


@app.command()
def run(
    input: Annotated[Path, typer.Option("--input", help="JSONL, Parquet, or a directory of *chunks*.json.")],
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Where exports are written.")] = None,
    collection: Annotated[str | None, typer.Option("--collection", help="Collection name.")] = None,
    queries: Annotated[Path | None, typer.Option("--queries", help="JSONL of {_id, text}.")] = None,
    qrels: Annotated[Path | None, typer.Option("--qrels", help="BEIR qrels TSV.")] = None,
    dense_model: DenseModelOpt = None,
    dense_blend: DenseBlendOpt = None,
    sparse_models: SparseModelsOpt = None,
    rerank_model: RerankModelOpt = None,
    enable_sparse: Annotated[bool | None, typer.Option("--enable-sparse/--disable-sparse",
                                                       help=_described("enable_sparse"))] = None,
    enable_rerank: EnableRerankOpt = None,
    rerank_candidates: RerankCandidatesOpt = None,
    rerank_top_k: Annotated[int | None, typer.Option("--rerank-top-k", help=_described("rerank_top_k"))] = None,
    fusion: Annotated[str | None, typer.Option("--fusion", help=_described("fusion", "rrf or dbsf."))] = None,
    force_cpu: Annotated[bool | None, typer.Option("--force-cpu", help=_described("force_cpu"))] = None,
    local_files_only: LocalFilesOnlyOpt = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML or JSON config file.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summaries as JSON.")] = False,
) -> None:
    """Run the embedding flow on one input (one or more collections)."""
    startup.mark(startup.CLI)
    _prefect_defaults()
    try:
        cfg = build_config(
            input_path=input, collection=collection, output_dir=output_dir, queries=queries, qrels=qrels,
            config_file=config,
            overrides=setting_overrides({
                "dense_model": dense_model, "dense_blend": dense_blend, "sparse_models": sparse_models,
                "rerank_model": rerank_model, "enable_sparse": enable_sparse, "enable_rerank": enable_rerank,
                "rerank_candidates": rerank_candidates, "rerank_top_k": rerank_top_k, "fusion": fusion,
                "force_cpu": force_cpu, "local_files_only": local_files_only,
            }),
        )
    except EmbedderError as exc:
        _fail(str(exc), 2)
    failure: str | None = None
    with stop_on_signals(), stage_progress(f"running embed-collections on {len(cfg.collections)} collection(s)..."):
        try:
            _start_temporary_server()
            summaries = run_flow(cfg)
        except CollectionsFailedError as exc:
            summaries, failure = exc.summaries, str(exc)
        except EmbedderError as exc:
            _fail(str(exc), _stopped_code() or 1)
    if json_output:
        typer.echo(json.dumps([s.model_dump(mode="json") for s in summaries], indent=2))
    else:
        for s in summaries:
            for line in render_summary_lines(s):
                typer.echo(line)
            typer.echo(f"Summary: {Path(cfg.output_dir) / s.collection / 'processing_summary.json'}")
    if failure is not None:
        # completed and partial exit 0; any failed collection makes the run exit 1 (DESIGN.md), a stopped run
        # 128 + the signal's number, as a shell reports it.
        _fail(failure, _stopped_code() or 1)
    if (code := _stopped_code()) is not None:  # stopped after the last stage: the run finished as reported
        raise typer.Exit(code)


@app.command()
def search(
    output_dir: Annotated[Path, typer.Option("--output-dir", help="The run's output dir.")],
    collection: Annotated[str, typer.Option("--collection")],
    query: Annotated[str, typer.Option("--query")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=100)] = 10,
    no_rerank: Annotated[bool, typer.Option("--no-rerank", help="Skip the CrossEncoder pass.")] = False,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Hybrid search (dense + sparse, fused by the index engine) over a collection a run wrote, then rerank."""
    from pydantic import ValidationError

    from embedder.service import SearchRequest, search_collection

    try:
        req = SearchRequest(collection=collection, query=query, top_k=top_k, rerank=not no_rerank)
    except ValidationError as exc:
        _fail("; ".join(e["msg"] for e in exc.errors()), 2)
    from embedder.errors import VectorIndexError

    try:
        resp = search_collection(output_dir, req)
    except VectorIndexError as exc:  # none published, damaged, or the server unreachable: the service's 503
        _fail(str(exc), EXIT_INDEX_UNAVAILABLE)
    except EmbedderError as exc:
        _fail(str(exc))
    if json_output:
        typer.echo(resp.model_dump_json(indent=2))
        return
    how = f"{resp.fusion} fusion" + (f", reranked by {resp.rerank_model}" if resp.reranked else "")
    typer.echo(f"{len(resp.hits)} hits from {resp.collection} ({how})")
    for rank, hit in enumerate(resp.hits, start=1):
        typer.echo(f"{rank:>3}. {hit.score:8.4f}  {hit.id}  {hit.text_preview[:100]}")
    for w in resp.warnings:
        typer.echo(f"WARNING: {w}")


@app.command(name="eval")
def eval_(
    beir_dir: Annotated[Path, typer.Option("--beir-dir", help="BEIR layout: corpus.jsonl, queries.jsonl, qrels/.")],
    split: Annotated[str, typer.Option("--split", help="qrels/<split>.tsv")],
    output_dir: Annotated[Path, typer.Option("--output-dir")] = Path("output/eval"),
    dense_model: DenseModelOpt = None,
    dense_blend: DenseBlendOpt = None,
    sparse_models: SparseModelsOpt = None,
    rerank_model: RerankModelOpt = None,
    enable_rerank: EnableRerankOpt = None,
    rerank_candidates: RerankCandidatesOpt = None,
    local_files_only: LocalFilesOnlyOpt = None,
    config: Annotated[Path | None, typer.Option("--config")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    tune: Annotated[Path | None, typer.Option(
        "--tune", help="Fit fusion weights and RRF k on this (training) split and write them to this TOML file, "
        "for --config in run, eval and the runs search reads.")] = None,
) -> None:
    """Run the real pipeline on a BEIR dataset and report nDCG@10 and Recall@100 per list and per fusion.

    Besides the stages' own lists, every combination of two or more lists is
    fused with RRF and DBSF (keys ``rrf:dense+qdrant-bm25``, ...), and the
    packaged recommendation (``--config recommended``) is scored as ``recommended``.
    """
    _prefect_defaults()
    from embedder.io.beir import prepare_beir
    from embedder.settings import resolve_run_config, validate_collection_name

    if tune is not None:
        from embedder.tuning import check_tuning_split

        # Before the run: an eval of a real corpus takes minutes, and its result could not be used.
        try:
            check_tuning_split(split)
        except ValueError as exc:
            _fail(str(exc), 2)
    try:
        name = validate_collection_name(f"beir-{beir_dir.resolve().name}-{split}")
        inputs = prepare_beir(beir_dir, split, output_dir.resolve() / "_inputs" / name)
        cfg = resolve_run_config(config, {
            "collections": [{"name": name, "path": str(inputs.corpus_jsonl)}],
            "queries_path": str(inputs.queries_jsonl), "qrels_path": str(inputs.qrels_tsv),
            "output_dir": str(output_dir.resolve()),
            **setting_overrides({
                "dense_model": dense_model, "dense_blend": dense_blend, "sparse_models": sparse_models,
                "rerank_model": rerank_model, "enable_rerank": enable_rerank, "rerank_candidates": rerank_candidates,
                "local_files_only": local_files_only,
            }),
        })
    except EmbedderError as exc:
        _fail(str(exc), 2)
    title = f"evaluating on {inputs.documents} documents and {inputs.queries} queries..."
    with stop_on_signals(), stage_progress(title):
        try:
            [summary] = run_flow(cfg)
        except EmbedderError as exc:
            _fail(str(exc), _stopped_code() or 1)
    quality = summary.quality or {}
    report: dict[str, Any] = {name: {"ndcg@10": round(m["ndcg@10"], 4), "recall@100": round(m["recall@100"], 4)}
                              for name, m in quality.items()}
    report["queries"] = inputs.queries
    report["documents"] = inputs.documents
    report["models"] = {
        "dense": summary.dense_run.model_name if summary.dense_run else None,
        "sparse": summary.sparse_run.model_names if summary.sparse_run else [],
        "rerank": summary.rerank_run.model_name if summary.rerank_run and summary.rerank_run.executed else None,
    }
    report["warnings"] = summary.warnings
    try:
        report.update(_fusion_report(summary, inputs.qrels_tsv, split, beir_dir, tune))
    except ValueError as exc:
        _fail(str(exc), 2)
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, m in report.items():
        if isinstance(m, dict) and "ndcg@10" in m:
            typer.echo(f"{key:>12}: nDCG@10 {m['ndcg@10']:.4f}  Recall@100 {m['recall@100']:.4f}")
    typer.echo(f"models: {report['models']}")
    for w in summary.warnings:
        typer.echo(f"WARNING: {w}")


def _rounded(m: dict[str, float]) -> dict[str, float]:
    return {"ndcg@10": round(m["ndcg@10"], 4), "recall@100": round(m["recall@100"], 4)}


def _fusion_report(summary: Any, qrels_tsv: Path, split: str, beir_dir: Path, tune: Path | None) -> dict[str, Any]:
    """Every list and fusion of the run, the packaged recommendation's score, and (``--tune``) a fit on this split."""
    import tomllib

    from embedder.errors import ConfigError
    from embedder.io.atomic import atomic_write_text
    from embedder.io.readers import read_qrels
    from embedder.io.writers import read_jsonl_records
    from embedder.settings import RECOMMENDED_CONFIG, load_config_file
    from embedder.tuning import every_fusion, fit_fusion, fit_to_toml, query_lists, score_settings

    fusion = summary.fusion_run
    if fusion is None or not fusion.candidates_path:
        return {}
    queries = query_lists(read_jsonl_records(fusion.candidates_path))
    qrels = read_qrels(str(qrels_tsv))
    out: dict[str, Any] = {key: _rounded(m) for key, m in every_fusion(queries, qrels, k=fusion.k or 60).items()}
    try:
        recommended = load_config_file(RECOMMENDED_CONFIG)
    except ConfigError as exc:  # a damaged install: report it, the rest of the report stands
        out["recommended"] = {"reason": str(exc)}
    else:
        scored = score_settings(queries, qrels, recommended,
                                summary.dense_run.model_name if summary.dense_run else None)
        meta = tomllib.loads(RECOMMENDED_CONFIG.read_text(encoding="utf-8")).get("tuning", {})
        out["recommended"] = {"settings": recommended, "fitted_on": meta,
                              **(_rounded(scored) if isinstance(scored, dict) else {"reason": scored})}
    if tune is not None:
        fit = fit_fusion(queries, qrels, split)
        text = fit_to_toml(fit, {"dataset": beir_dir.resolve().name, "split": split},
                           summary.config or {})
        tune.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tune, text)
        out["tuned"] = {"settings": fit.settings(), "file": str(tune), "train_ndcg@10": round(fit.train_ndcg, 4),
                        "cv_ndcg@10": round(fit.cv_ndcg, 4) if fit.cv_ndcg is not None else None,
                        "cv_folds": fit.folds, "queries": fit.queries, "history": fit.history}
    return out


@app.command()
def verify(
    output_dir: Annotated[Path, typer.Option("--output-dir", help="The run's output dir.")],
    collection: Annotated[str | None, typer.Option("--collection", help="One collection (default: all).")] = None,
    repair: Annotated[bool, typer.Option(
        "--repair", help="Set damaged files aside and run the collection again, as its last run was configured.")]
    = False,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Check every file the output dir keeps against its checksums; exit 1 when anything is damaged."""
    from embedder.verify import collections_in, set_aside, verify_collection

    names = [collection] if collection else collections_in(output_dir)
    if not names:
        _fail(f"no collection under {output_dir}", 2)
    reports = [verify_collection(output_dir, name) for name in names]
    _print_verify(reports, json_output)
    damaged = [r for r in reports if r.damaged]
    if not damaged:
        return
    if not repair:
        _fail(f"{sum(len(r.damaged) for r in damaged)} damaged file(s) in {', '.join(r.collection for r in damaged)}; "
              "`embed-collections verify --repair` (or the next run) recomputes them")
    for r in damaged:
        for where in set_aside(output_dir, r):
            typer.echo(f"set aside: {where}")
    _repair_runs(output_dir, [r.collection for r in damaged])
    after = [verify_collection(output_dir, r.collection) for r in damaged]
    typer.echo("after the repair run:")
    _print_verify(after, json_output)
    if any(r.damaged for r in after):
        _fail("damage remains after the repair run; see the table above")


def _print_verify(reports: list[Any], json_output: bool) -> None:
    if json_output:
        typer.echo(json.dumps([r.to_json() for r in reports], indent=2))
        return
    for r in reports:
        checked = ", ".join(f"{n} {what}" for what, n in r.checked.items())
        typer.echo(f"{r.collection}: checked {checked}; " + (f"{len(r.damaged)} DAMAGED" if r.damaged else "sound"))
        for f in r.damaged:
            typer.echo(f"  {f.kind:<16} {f.path}\n  {'':<16} {f.reason}")


def _repair_runs(output_dir: Path, names: list[str]) -> None:
    """Run each collection again with the settings its published summary recorded: that run heals it."""
    from embedder.service import summary_for
    from embedder.settings import RunConfig

    _prefect_defaults()
    for name in names:
        try:
            recorded = summary_for(output_dir, name).config or {}
            cfg = RunConfig.from_recorded({**recorded, "output_dir": str(output_dir.resolve())})
        except (EmbedderError, ValueError) as exc:
            _fail(f"{name}: its last run's settings cannot be read ({exc}); run `embed-collections run` for it")
        cfg = cfg.model_copy(update={"collections": [c for c in cfg.collections if c.name == name]})
        missing = [c.path for c in cfg.collections if not Path(c.path).exists()]
        if not cfg.collections or missing:
            _fail(f"{name}: its input ({', '.join(missing) or 'unknown'}) is gone; run `embed-collections run` "
                  "with its input to rebuild it")
        typer.echo(f"running {name} again to recompute what was set aside ...")
        with stop_on_signals():
            try:
                run_flow(cfg)
            except EmbedderError as exc:
                _fail(f"{name}: the repair run failed: {exc}", _stopped_code() or 1)


@app.command(name="gpu-slots")
def gpu_slots(
    limit_name: Annotated[str, typer.Option("--limit-name", help="The global concurrency limit.")] = "gpu",
    recover: Annotated[bool, typer.Option(
        "--recover", help="On the ephemeral server: release the leases of holders whose process is gone.")] = False,
) -> None:
    """Show the GPU lease's slots and holders (lease id, pid, host, stage, expiry); --recover frees dead ones."""
    _prefect_defaults()
    from prefect.client.orchestration import get_client

    from tasks.lease import ensure_gpu_limit, holder_state, list_holders, recover_dead_holders, recovery_mode

    ensure_gpu_limit(limit_name)
    freed = recover_dead_holders(limit_name) if recover else []
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name)
    mode = recovery_mode()
    status = f"{limit.name}: {limit.active_slots}/{limit.limit} slot(s) in use"
    typer.echo(status + (f"; freed {len(freed)}" if recover else ""))
    typer.echo("dead holders' slots are freed by " + (
        "the server's lease repossession, once their lease expires" if mode == "prefect" else
        "the next waiting run (or --recover), by lease id, once their process is gone"))
    for h in list_holders(limit_name):
        typer.echo(f"  lease {h.get('lease_id')}  stage {h.get('stage')}  pid {h.get('pid')}@{h.get('host')}  "
                   f"acquired {h.get('acquired_at')}  expires {h.get('expires_at')}  [{holder_state(h)}]")


server_app = typer.Typer(no_args_is_help=True, help=(
    "A Prefect server kept running between runs: runs in the same PREFECT_HOME use it instead of starting a "
    "temporary one each (their runs show in its UI)."))
app.add_typer(server_app, name="server")


@server_app.command(name="start")
def server_start(
    runner: Annotated[bool, typer.Option(
        "--runner/--no-runner", help="Also start the warm runner: Prefect imported and the models loaded once, "
        "each run of this PREFECT_HOME forked from it.")] = True,
    config: Annotated[Path | None, typer.Option(
        "--config", help="The TOML or JSON config whose models the warm runner loads (default: the settings' "
        "defaults and EMBEDDER_* variables).")] = None,
) -> None:
    """Start the warm server of this PREFECT_HOME on a free loopback port (or name the one running)."""
    from flows import warm_runner, warm_server

    try:
        record, new = warm_server.start()
    except RuntimeError as exc:
        _fail(str(exc))
    home = warm_server.prefect_home()
    typer.echo(f"{'started' if new else 'already running'}: warm Prefect server at {record.url} (pid "
               f"{record.pid}); runs with PREFECT_HOME={home} use it; "
               "`embed-collections server stop` stops it")
    if not runner:
        return
    current = warm_runner.alive(home)
    if current is not None and (why := warm_runner.mismatch(current, home)) is not None:
        typer.echo(f"restarting the warm runner (pid {current.pid}): {why}")
        warm_runner.stop(home)
    _runner, line = warm_runner.start(home, record.owner(), config.resolve() if config else None)
    typer.echo(line)


@server_app.command(name="status")
def server_status() -> None:
    """Say whether runs in this PREFECT_HOME find a warm server (exit 0) or start a temporary one (exit 1)."""
    from flows import warm_runner, warm_server

    record, line = warm_server.status()
    typer.echo(line)
    if record is None:
        raise typer.Exit(1)
    home = warm_server.prefect_home()
    runner = warm_runner.alive(home)
    if runner is None:
        typer.echo("no warm runner: each run imports Prefect and loads its models in its own process")
    elif (why := warm_runner.mismatch(runner, home)) is not None:
        typer.echo(f"warm runner (pid {runner.pid}) not used by runs from here: {why}")
    else:
        typer.echo(f"warm runner (pid {runner.pid}) runs each `embed-collections run` from here; loaded: "
                   f"{'; '.join(runner.models) or 'no models'}")


@server_app.command(name="stop")
def server_stop() -> None:
    """Stop the warm server of this PREFECT_HOME and its runner; later runs start a temporary server again."""
    from flows import warm_runner, warm_server

    home = warm_server.prefect_home()
    runner = warm_runner.stop(home)
    if runner is not None:
        typer.echo(f"stopped the warm runner (pid {runner.pid})")
    record = warm_server.stop()
    typer.echo(f"stopped the warm Prefect server at {record.url} (pid {record.pid})" if record is not None
               else f"no warm server in {home}")


def main() -> None:
    """Console-script entry point: ``run`` goes to the warm runner when one can serve it (`flows.warm_runner`)."""
    import sys

    if sys.argv[1:2] == ["run"]:
        from flows.warm_runner import dispatch

        if (code := dispatch(sys.argv[1:])) is not None:
            sys.exit(code)
    app()


if __name__ == "__main__":
    main()
