"""Prefect flows: orchestration only (order, concurrency, roll-up)."""
