"""Every setting is defined once, in RunConfig: the environment and the CLI flags are checked against it.

A setting added to RunConfig is readable from the environment with RunConfig's bounds and default;
a CLI flag that sets a setting must be declared in SETTING_FLAGS, parse into that field, and show
the field's own description as its help.
"""

from __future__ import annotations

import json

import pytest
import typer

from embedder.errors import ConfigError
from embedder.settings import (
    FLAT_NAMES,
    SETTING_PATHS,
    RunConfig,
    flat_name,
    resolve_run_config,
    setting_field,
)
from flows.cli import SETTING_FLAGS, app, setting_overrides

# A value other than the default, as the environment writes it, for every setting the environment may set.
ENV_SAMPLES: dict[str, tuple[str, object]] = {
    "queries_path": ("q.jsonl", "q.jsonl"),
    "qrels_path": ("qrels.tsv", "qrels.tsv"),
    "output_dir": ("elsewhere", "elsewhere"),
    "dense.model": ("e5-small", "e5-small"),
    "dense.backend": ("onnx", "onnx"),
    "dense.blend": ('{"e5-small": 0.25}', {"e5-small": 0.25}),
    "sparse.models": ('["splade-pp"]', ["splade-pp"]),
    "rerank.model": ("my-reranker", "my-reranker"),
    "sparse.enabled": ("false", False),
    "rerank.enabled": ("false", False),
    "rerank.top_k_candidates": ("50", 50),
    "rerank.top_k": ("5", 5),
    "rerank.latency_budget_ms": ("250", 250.0),
    "fuse.method": ("dbsf", "dbsf"),
    "fuse.rrf_k": ("10", 10),
    "fuse.weights": ('{"dense": 2.0}', {"dense": 2.0}),
    "fuse.retrieval_top_n": ("30", 30),
    "gpu.memory_ceiling_gb": ("8", 8.0),
    "gpu.concurrency_limit_name": ("gpu-{host}", "gpu-{host}"),
    "gpu.lease_timeout_s": ("60", 60.0),
    "gpu.lease_duration_s": ("120", 120.0),
    "query_policy": ('{"mode": "hash"}', {"mode": "hash", "max_chars": 200}),
    "local_files_only": ("true", True),
    "force_cpu": ("true", True),
    "max_chunk_chars": ("1000", 1000),
    "index.batch_size": ("64", 64),
    "index.hnsw_min_points": ("10", 10),
    "orchestration.collection_fanout": ("subflows", "subflows"),
    "orchestration.collection_deployment": ("a/b", "a/b"),
    "orchestration.collection_lock_timeout_s": ("30", 30.0),
    "sparse.overlap": ("false", False),
    "stream.window": ("128", 128),
    "stream.vector_checkpoint_s": ("0", 0.0),
    "stream.vector_retention_days": ("7", 7.0),
    "dense.precision": ("fp16", "fp16"),
    "sparse.precision": ("bf16", "bf16"),
    "rerank.precision": ("fp32", "fp32"),
    "gpu.batch_policy": ("items", "items"),
    "gpu.cpu_batch_items": ("16", 16),
}


def test_the_environment_reads_every_setting_but_the_collections():
    assert set(ENV_SAMPLES) == set(SETTING_PATHS) - {"collections"}, "add a sample for the new setting"
    # Every section setting keeps its flat name of earlier releases, and no two share one.
    assert sorted(FLAT_NAMES.values()) == sorted(p for p in SETTING_PATHS if "." in p)


def _env_names(path: str) -> list[str]:
    """The variables that set ``path``: EMBEDDER_DENSE__MODEL and the flat EMBEDDER_DENSE_MODEL."""
    names = [f"EMBEDDER_{path.replace('.', '__').upper()}"]
    return names + [f"EMBEDDER_{flat_name(path).upper()}"] if "." in path else names


@pytest.mark.parametrize("path", sorted(ENV_SAMPLES))
def test_each_setting_comes_from_its_environment_variables(path, monkeypatch):
    text, expected = ENV_SAMPLES[path]
    assert expected != setting_field(path).get_default(call_default_factory=True)
    for variable in _env_names(path):
        with monkeypatch.context() as env:
            env.setenv(variable, text)
            cfg = resolve_run_config()
        value = cfg.setting(path)
        assert (value.model_dump() if hasattr(value, "model_dump") else value) == expected, variable
        assert cfg.sources[path] == "env"
        assert cfg.flat_names == []  # the environment's flat names are a documented short form


def test_the_environment_keeps_the_settings_bounds(monkeypatch):
    # RunConfig's bounds hold in the environment too, under either name: the error names the setting.
    for variable in ("EMBEDDER_RERANK_TOP_K", "EMBEDDER_RERANK__TOP_K"):
        with monkeypatch.context() as env:
            env.setenv(variable, "0")
            with pytest.raises(ConfigError, match="top_k"):
                resolve_run_config()


def test_one_setting_set_by_both_its_variables_is_refused(monkeypatch):
    monkeypatch.setenv("EMBEDDER_RRF_K", "10")
    monkeypatch.setenv("EMBEDDER_FUSE__RRF_K", "20")
    with pytest.raises(ConfigError, match="EMBEDDER_RRF_K and EMBEDDER_FUSE__RRF_K"):
        resolve_run_config()


def test_a_flat_name_in_a_file_or_parameter_still_works_and_is_named(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text('[embedder]\nrrf_k = 10\nenable_rerank = false\n[embedder.dense]\nmodel = "x"\n')
    cfg = resolve_run_config(old, read_env=False)
    assert (cfg.fuse.rrf_k, cfg.rerank.enabled, cfg.dense.model) == (10, False, "x")
    assert cfg.flat_names == ["rrf_k", "enable_rerank"]
    assert cfg.sources["fuse.rrf_k"] == "file"
    # A deployment registered with the flat parameters of an earlier release: the same config.
    param = RunConfig.model_validate({"rrf_k": 10, "enable_rerank": False, "dense": {"model": "x"}})
    assert param.model_dump(exclude={"flat_names"}) == cfg.model_dump(exclude={"flat_names", "sources"}) | {
        "sources": {}}
    assert param.flat_names == ["rrf_k", "enable_rerank"]
    # One setting by both names is refused, not silently resolved.
    with pytest.raises(ValueError, match="given twice"):
        RunConfig.model_validate({"rrf_k": 10, "fuse": {"rrf_k": 20}})


def test_model_copy_validates_its_update():
    cfg = RunConfig()
    assert cfg.model_copy(update={"rrf_k": 5}).fuse.rrf_k == 5
    assert cfg.model_copy(update={"fuse.rrf_k": 6}).fuse.rrf_k == 6
    assert cfg.model_copy(update={"fuse": {"rrf_k": 7}}).fuse.method == "rrf"
    with pytest.raises(ValueError):
        cfg.model_copy(update={"fuse.rrf_k": 0})
    with pytest.raises(ValueError):
        cfg.model_copy(update={"no_such_setting": 1})


def test_a_recorded_config_of_any_release_reads():
    flat = {"dense_model": "x", "rrf_k": 9, "removed_long_ago": 1, "output_dir": "o"}
    nested = {"dense": {"model": "x", "gone": 1}, "fuse": {"rrf_k": 9}, "output_dir": "o"}
    for recorded in (flat, nested):
        cfg = RunConfig.from_recorded(recorded)
        assert (cfg.dense.model, cfg.fuse.rrf_k, cfg.output_dir) == ("x", 9, "o")


# Flags that are not run settings: where to read and write, and how to print.
NOT_SETTINGS = {"run": {"input", "output_dir", "collection", "queries", "qrels", "config", "json_output"},
                "eval": {"beir_dir", "split", "output_dir", "config", "json_output", "tune"}}
FLAG_SAMPLES: dict[str, tuple[list[str], object]] = {
    "dense_model": (["--dense-model", "e5-small"], "e5-small"),
    "dense_blend": (["--dense-blend", "e5-small=0.2, bge=0.1"], {"e5-small": 0.2, "bge": 0.1}),
    "sparse_models": (["--sparse-models", "qdrant-bm25, splade-pp"], ["qdrant-bm25", "splade-pp"]),
    "rerank_model": (["--rerank-model", "my-reranker"], "my-reranker"),
    "enable_sparse": (["--disable-sparse"], False),
    "enable_rerank": (["--disable-rerank"], False),
    "rerank_candidates": (["--rerank-candidates", "40"], 40),
    "rerank_top_k": (["--rerank-top-k", "7"], 7),
    "fusion": (["--fusion", "dbsf"], "dbsf"),
    "force_cpu": (["--force-cpu"], True),
    "local_files_only": (["--local-files-only"], True),
}
REQUIRED = {"run": ["--input", "x.jsonl"], "eval": ["--beir-dir", "b", "--split", "test"]}


@pytest.mark.parametrize("command", ["run", "eval"])
def test_every_flag_is_a_declared_setting_or_declared_not_to_be_one(command):
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        if param.name in NOT_SETTINGS[command]:
            continue
        assert param.name in SETTING_FLAGS, f"{command} --{param.name}: declare the setting it sets"
        field = setting_field(SETTING_FLAGS[param.name][0])
        assert field.description and param.help.startswith(field.description), param.name


@pytest.mark.parametrize("command", ["run", "eval"])
def test_each_setting_flag_sets_its_field(command):
    click_command = typer.main.get_command(app).commands[command]
    names = {p.name for p in click_command.params} - NOT_SETTINGS[command]
    assert names <= set(FLAG_SAMPLES)
    for name in sorted(names):
        argv, expected = FLAG_SAMPLES[name]
        ctx = click_command.make_context(command, [*REQUIRED[command], *argv])
        overrides = setting_overrides({n: ctx.params[n] for n in names})
        field = SETTING_FLAGS[name][0]
        assert overrides == {field: expected}, (name, overrides)
        cfg = resolve_run_config(None, overrides, read_env=False)
        assert cfg.setting(field) == expected
        assert cfg.flat_names == []
        section, _, name = field.partition(".")
        dumped = json.loads(cfg.model_dump_json())[section]
        assert (dumped[name] if name else dumped) == expected


def test_a_foreground_run_sends_no_heartbeats_unless_the_user_set_them(monkeypatch):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    from flows.cli import _foreground_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 90}):
        monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
        with _foreground_settings():
            # Each flow run would wait up to 1 s for the heartbeat thread at its end.
            assert get_current_settings().flows.heartbeat_frequency is None
        monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "90")
        with _foreground_settings():
            assert get_current_settings().flows.heartbeat_frequency == 90
        assert get_current_settings().flows.heartbeat_frequency == 90
