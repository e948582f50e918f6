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
from embedder.settings import EmbedderSettings, RunConfig, resolve_run_config
from flows.cli import SETTING_FLAGS, app, setting_overrides

# A value other than the default, as the environment writes it, for every setting the environment may set.
ENV_SAMPLES: dict[str, tuple[str, object]] = {
    "queries_path": ("q.jsonl", "q.jsonl"),
    "qrels_path": ("qrels.tsv", "qrels.tsv"),
    "output_dir": ("elsewhere", "elsewhere"),
    "dense_model": ("e5-small", "e5-small"),
    "dense_backend": ("onnx", "onnx"),
    "dense_blend": ('{"e5-small": 0.25}', {"e5-small": 0.25}),
    "sparse_models": ('["splade-pp"]', ["splade-pp"]),
    "rerank_model": ("my-reranker", "my-reranker"),
    "enable_sparse": ("false", False),
    "enable_rerank": ("false", False),
    "rerank_top_k_candidates": ("50", 50),
    "rerank_top_k": ("5", 5),
    "rerank_latency_budget_ms": ("250", 250.0),
    "fusion": ("dbsf", "dbsf"),
    "rrf_k": ("10", 10),
    "fusion_weights": ('{"dense": 2.0}', {"dense": 2.0}),
    "retrieval_top_n": ("30", 30),
    "gpu_memory_ceiling_gb": ("8", 8.0),
    "gpu_concurrency_limit_name": ("gpu-{host}", "gpu-{host}"),
    "gpu_lease_timeout_s": ("60", 60.0),
    "gpu_lease_duration_s": ("120", 120.0),
    "query_policy": ('{"mode": "hash"}', {"mode": "hash", "max_chars": 200}),
    "local_files_only": ("true", True),
    "force_cpu": ("true", True),
    "max_chunk_chars": ("1000", 1000),
    "index_batch_size": ("64", 64),
    "index_hnsw_min_points": ("10", 10),
    "collection_fanout": ("subflows", "subflows"),
    "collection_deployment": ("a/b", "a/b"),
    "collection_lock_timeout_s": ("30", 30.0),
    "overlap_sparse": ("false", False),
    "stream_window": ("128", 128),
    "vector_checkpoint_s": ("0", 0.0),
    "vector_retention_days": ("7", 7.0),
    "dense_precision": ("fp16", "fp16"),
    "sparse_precision": ("bf16", "bf16"),
    "rerank_precision": ("fp32", "fp32"),
    "batch_policy": ("items", "items"),
    "cpu_batch_items": ("16", 16),
}


def test_the_environment_reads_every_setting_but_the_collections():
    assert set(EmbedderSettings.model_fields) == set(RunConfig.model_fields) - {"collections", "sources"}
    assert set(ENV_SAMPLES) == set(EmbedderSettings.model_fields), "add a sample for the new setting"


@pytest.mark.parametrize("name", sorted(ENV_SAMPLES))
def test_each_setting_comes_from_its_environment_variable(name, monkeypatch):
    text, expected = ENV_SAMPLES[name]
    assert expected != RunConfig.model_fields[name].get_default(call_default_factory=True)
    monkeypatch.setenv(f"EMBEDDER_{name.upper()}", text)
    cfg = resolve_run_config()
    value = getattr(cfg, name)
    assert (value.model_dump() if hasattr(value, "model_dump") else value) == expected
    assert cfg.sources[name] == "env"


def test_the_environment_keeps_the_settings_bounds(monkeypatch):
    # RunConfig's bounds hold in the environment too: the error names the variable's setting.
    monkeypatch.setenv("EMBEDDER_RERANK_TOP_K", "0")
    with pytest.raises(ConfigError, match="rerank_top_k"):
        resolve_run_config()


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
        field = RunConfig.model_fields[SETTING_FLAGS[param.name][0]]
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
        cfg = RunConfig(**overrides)
        assert getattr(cfg, field) == expected
        assert json.loads(cfg.model_dump_json())[field] == expected
