"""Thin Prefect tasks over `embedder` stage functions: leases, caching, retries and telemetry only."""
