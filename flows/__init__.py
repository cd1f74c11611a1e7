"""Prefect flows: the entrypoints (flows/train.py:train_flow, flows/search.py:search_flow)."""
