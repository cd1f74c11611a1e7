"""The `babysit` command: train, ui (and the commands later issues add).

The config is validated here, before any flow or MLflow run exists: a bad file or `--set`
exits with status 2 and one paragraph that names the field.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from rich.console import Console
from rich.table import Table

from babysit.config import load_config
from babysit.errors import BabysitError

console = Console()


class HideUserErrorTracebacks(logging.Filter):
    """Bad input is not a bug: log BabysitError's paragraph, not a traceback of our internals."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BabysitError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_errors() -> None:
    for handler in logging.getLogger("prefect").handlers + logging.getLogger().handlers:
        handler.addFilter(HideUserErrorTracebacks())


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    with console.status("starting Prefect (ephemeral server unless PREFECT_API_URL is set)..."):
        from flows.train import train_flow
    quiet_user_errors()
    summary = train_flow(config=args.config, overrides=args.set)

    table = Table(title=f"babysit train: {cfg.name}", show_header=False)
    table.add_row("best validation accuracy", f"{summary.best_val_acc:.4f} (epoch {summary.best_epoch} of {summary.epochs_run})")
    table.add_row("test accuracy", f"{summary.test_acc:.4f}")
    table.add_row("initial loss", f"{summary.initial_loss:.3f}")
    table.add_row("flags", "\n".join(f"[yellow]{name}[/]: {why}" for name, why in summary.flags.items()) or "none")
    if summary.stop_reason:
        table.add_row("stopped", summary.stop_reason)
    table.add_row("MLflow run", f"{summary.run_id} ({summary.tracking_uri})")
    table.add_row("see it", f"babysit ui  →  {summary.url}")
    console.print(table)
    return 0


def ui(args: argparse.Namespace) -> int:
    from babysit import tracking

    uri = tracking.resolve_uri(args.uri)
    if db := tracking.sqlite_path(uri):
        db.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"MLflow UI for {uri} on http://{args.host}:{args.port}/#/experiments?{tracking.UI_VIEW} (Ctrl-C stops it)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="babysit", description="Train neural networks the CS231n way, as Prefect flows tracked in MLflow.")
    commands = root.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("config", help="YAML experiment file, e.g. conf/digits_mlp.yaml")
        sub.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field, e.g. --set optim.lr=3e-3 (repeatable)")
        return sub

    with_config("train", "train one model and track it in MLflow").set_defaults(handler=train)
    ui_cmd = commands.add_parser("ui", help="open the MLflow UI on the local store (127.0.0.1)")
    ui_cmd.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    ui_cmd.add_argument("--host", default="127.0.0.1")
    ui_cmd.add_argument("--port", type=int, default=5000)
    ui_cmd.set_defaults(handler=ui)
    return root


def main(argv: list[str] | None = None) -> int:
    # Offline machines: Prefect's telemetry would only log a connection error.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The first ephemeral server on a new machine migrates its database; 20 s is not always enough.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except BabysitError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
