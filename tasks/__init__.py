"""Prefect tasks: each module is one pipeline stage, pure functions plus a thin task wrapper."""
