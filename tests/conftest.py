"""Shared fixtures: a real Prefect test server (once per session) and a real MLflow store per test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for the whole session (starting one costs ~15 s),
    started with the settings `babysit` gives its own temporary server."""
    from prefect.testing.utilities import prefect_test_harness

    from babysit.servers import temporary_server_settings

    with temporary_server_settings(), prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session", autouse=True)
def temporary_servers_stop_before_pytest_closes_its_output():
    """Temporary Prefect servers that `babysit` commands started in tests stop at the session's end:
    at the process's exit, Prefect's 'Stopping temporary server' line found pytest's captured
    output closed and printed a logging traceback after the summary."""
    yield
    from babysit.servers import stop_temporary_servers

    stop_temporary_servers()


@pytest.fixture(scope="module", autouse=True)
def restore_torch_threads():
    """Tests that train with train.threads=1 set torch's threads for the process: each module gets them back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """The default data, as a run prepares it: digits, standardized, 15% val, 15% test."""
    from babysit.config import Config
    from tasks.data import load_splits
    from tasks.preprocess import fit_preprocess

    cfg = Config()
    splits = load_splits(cfg.data, 0)
    return fit_preprocess(splits, cfg.preprocess)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store in a temporary folder, also exported as $MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def one_thread():
    """Small models on a shared 2-core machine: one torch thread avoids oversubscription stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
