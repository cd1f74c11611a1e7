"""babysit: train neural networks the CS231n way, as Prefect flows tracked in MLflow."""

import os


def _environment_defaults() -> None:
    """Defaults for Prefect and MLflow in every process that imports babysit: the CLI, and the flows
    that deployment workers load from their entrypoints (flows/search.py:search_flow). Set before
    MLflow is imported (no babysit module imports it at the top); a variable already set wins."""
    # Offline machines: Prefect's telemetry would only log a connection error.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # MLflow's usage telemetry: offline, its thread gives up and deletes an environment variable
    # while other threads read the environment (requests does, on every HTTP call): QA saw a
    # deployment's search fail on KeyError '_MLFLOW_TELEMETRY_SESSION_ID' in its first write.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # The first ephemeral server on a new machine migrates its database; 20 s is not always enough.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # A tracking server that stops answering: MLflow's default (7 retries, doubling from 2 s) waits
    # about 4 minutes on each write before the command can say so; these wait about 15 s. One that
    # hangs (its process stopped) held each try for MLflow's 120-s read timeout: 10 minutes a write.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # with a tracking server MLflow prints "View run ... at" for every run it ends: a line per trial; babysit prints its own links
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


_environment_defaults()
