"""The `babysit` command: train, check, search, report, ensemble, server, ui.

The config is validated here, before any flow or MLflow run exists: a bad file or `--set`
exits with status 2 and one paragraph that names the field.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from babysit import servers
from babysit.config import load_config, warmup_outlasts
from babysit.errors import BabysitError

console = Console()


class HideUserErrorTracebacks(logging.Filter):
    """Bad input is not a bug: log BabysitError's paragraph, not a traceback of our internals.
    On the terminal, drop Prefect's "failed with exception" records of it altogether: the command
    ends by printing the paragraph once (the API, and so the Prefect UI, still gets them). So too
    for a server that stopped answering (lost_server)."""

    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BabysitError) or isinstance(error, Exception) and lost_server(error):
            if self.terminal:
                return False
            record.exc_info, record.exc_text = None, None
        return True


def port_number(text: str) -> int:
    """argparse type for TCP ports: 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return value


def at_least_one(text: str) -> int:
    """argparse type for counts (members, epochs, examples): a whole number ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def quiet_user_errors() -> None:
    for handler in logging.getLogger("prefect").handlers + logging.getLogger().handlers:
        handler.addFilter(HideUserErrorTracebacks(terminal=isinstance(handler, logging.StreamHandler)))


def summary_table(title: str) -> Table:
    table = Table(title=escape(title), show_header=False)  # a config's name is text: run[/b] is not markup
    table.add_column()
    table.add_column(overflow="fold")  # a link or run id too long for the terminal wraps, whole, instead of ending in '…'
    return table


def print_links(*lines: tuple[str, str]) -> None:
    """Commands and links below a summary, each on one line, never wrapped nor cut: to copy or click."""
    for label, text in lines:
        console.print(f"{label}: {escape(text)}", soft_wrap=True, highlight=False)


def with_uri(command: str, uri: str, default: str) -> str:
    """`command` as the user can run it: with --uri when the store is not `default`, the one it
    reads when given none (resolved before a flow runs: logging a model sets MLflow's URI here)."""
    return command if uri == default else f"{command} --uri {shlex.quote(uri)}"  # a store path may hold spaces


def see_it(url: str, uri: str, default: str) -> str:
    """Where to look at a run: a tracking server's own UI, or `babysit ui` on the local store."""
    from babysit import tracking

    return url if tracking.is_remote(uri) else f"{with_uri('babysit ui', uri, default)}  →  {url}"


def before_starting(cfg) -> None:
    """What a run cannot start without, checked before Prefect's server starts (15-25 s): its
    device, a tracking server or database that answers, and its data, loaded here for the flow.
    The flows check them again, for deployments."""
    from babysit import tracking
    from tasks.data import check_data_path, load_ahead
    from tasks.train import training_device

    check_data_path(cfg.data)
    training_device(cfg)
    tracking.check_reachable(tracking.resolve_uri(cfg.tracking.uri))
    load_ahead(cfg.data, cfg.seed)


def train(args: argparse.Namespace) -> int:
    from babysit import tracking

    cfg = load_config(args.config, args.set)
    if problem := warmup_outlasts(cfg.optim.warmup_epochs, cfg.train.epochs, "train.epochs"):  # said at once; the flow says it too, for deployments
        raise BabysitError(f"{args.config}: {problem}.")
    default_uri = tracking.resolve_uri(None)
    with console.status("starting Prefect (ephemeral server unless PREFECT_API_URL is set)..."):
        from flows.train import train_flow

        before_starting(cfg)
    quiet_user_errors()
    with servers.temporary_server_settings():
        summary = train_flow(config=args.config, overrides=args.set)

    table = summary_table(f"babysit train: {cfg.name}")
    if not math.isnan(summary.best_val_acc):
        table.add_row("best validation accuracy", f"{summary.best_val_acc:.4f} (epoch {summary.best_epoch} of {summary.epochs_run})")
    else:  # no epoch scored: the loss diverged in the first one
        table.add_row("best validation accuracy", f"none ({summary.epochs_run} epoch(s) run, none scored; see flags)")
    # no epoch scored: the kept weights, tested and logged, are the initial ones
    table.add_row("test accuracy", f"{summary.test_acc:.4f}" + (" (the initial weights: no epoch scored)" if summary.best_epoch == 0 else ""))
    table.add_row("initial loss", f"{summary.initial_loss:.3f}")
    table.add_row("flags", "\n".join(f"[yellow]{name}[/]: {escape(why)}" for name, why in summary.flags.items()) or "none")
    if summary.stop_reason:
        table.add_row("stopped", escape(summary.stop_reason))
    table.add_row("MLflow run", f"{summary.run_id} ({summary.tracking_uri})")
    console.print(table)
    print_links(("see it", see_it(summary.url, summary.tracking_uri, default_uri)),
                ("what next", with_uri(f"babysit report {summary.run_id}", summary.tracking_uri, default_uri)))
    return 0


def search(args: argparse.Namespace) -> int:
    from babysit import tracking
    from babysit.config import SearchExperiment

    exp = load_config(args.config, args.set, model=SearchExperiment)
    default_uri = tracking.resolve_uri(None)
    with console.status("starting Prefect (ephemeral server unless PREFECT_API_URL is set)..."):
        from flows.search import check_not_running, check_searched_devices, search_flow

        if not exp.search.dask_address:  # trials train here
            before_starting(exp.base_config())
            check_searched_devices(exp)
        check_not_running(exp)
    quiet_user_errors()
    with servers.temporary_server_settings():
        summary = search_flow(config=args.config, overrides=args.set)

    table = summary_table(f"babysit search: {exp.name}")
    for stage, space in summary.ranges.items():
        # escaped: rich takes "[false, true]" for a markup tag and prints "choice()"
        table.add_row(f"stage {stage}", escape("\n".join(f"{field} ~ {dist}" for field, dist in space.items())))
    table.add_row("best trial", f"val acc {summary.best_val_acc:.4f}: " + escape(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.best_params.items())))
    if summary.final_val_acc is not None:
        table.add_row("final retrain", f"val acc {summary.final_val_acc:.4f}, test acc {summary.test_acc:.4f}")
    elif summary.test_acc is not None:  # it ran, and diverged or failed: no accuracy to show
        table.add_row("final retrain", "[yellow]diverged or failed[/]: see the final run's flags in MLflow")
    table.add_row("edges", "\n".join(summary.edges) or "none: no range moved past an edge")
    table.add_row("trials", f"{summary.trials_run} run, {summary.trials_reused} reused from an earlier run of this search")
    if summary.changes:
        table.add_row("since last run", escape("\n".join(summary.changes)))
    if summary.advice:
        table.add_row("report", escape(summary.advice.strip()))
    table.add_row("MLflow parent run", f"{summary.parent_run_id} ({summary.tracking_uri})")
    console.print(table)
    print_links(("see it", see_it(summary.url, summary.tracking_uri, default_uri)))
    return 0


def check(args: argparse.Namespace) -> int:
    """Pre-flight checks on plain functions (no Prefect server, no MLflow run): exit 0 if all pass, 1 if not."""
    import torch

    from tasks.check import preflight
    from tasks.data import load_splits
    from tasks.preprocess import fit_preprocess

    cfg = load_config(args.config, args.set)
    if args.plots:  # before the checks run, not after
        plots_folder(args.plots)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    splits = load_splits(cfg.data, cfg.seed)
    prepared = fit_preprocess(splits, cfg.preprocess)
    source = None
    if cfg.model.init_from:  # a source that train refuses, check refuses too (it passed every check, QA)
        from tasks.train import transfer_source

        source = transfer_source(cfg, prepared.splits.input_shape, prepared.splits.n_classes)
        console.print(escape(f"model.init_from {cfg.model.init_from}: read, and it fits; the checks below judge the transferred weights, as training starts from them"),
                      highlight=False)
    results = preflight(cfg, prepared, n=args.subset, budget_epochs=args.budget, source=source)
    architecture = next((r.data["report"].architecture for r in results if "report" in r.data), "")
    console.print(escape(f"babysit check: {cfg.name} ({architecture})"), highlight=False)
    for result in results:
        verdict = "[green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
        console.print(f"{verdict}  {result.name}: {escape(result.reason)}", highlight=False)
    if args.plots:
        saved = save_check_plots(results, args.plots, cfg.name)
        console.print(f"plots: {', '.join(saved)}", highlight=False)
    failed = [r.name for r in results if not r.passed]
    console.print(f"{len(failed)} of {len(results)} checks failed: {', '.join(failed)}" if failed else f"all {len(results)} checks passed", highlight=False)
    return 1 if failed else 0


def plots_folder(folder: str) -> Path:
    """`--plots FOLDER`, made if missing; one this user cannot make or write is a BabysitError."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BabysitError(f"--plots {folder}: cannot make that folder ({err.strerror}); give a folder this user can write.") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BabysitError(f"--plots {folder}: this user cannot write in that folder; give one it can write.")
    return path


def save_check_plots(results: list, folder: str, name: str) -> list[str]:
    """The activation histograms at init and the tiny-subset loss curve, as PNGs in `folder`."""

    from babysit import plots

    plots_folder(folder)
    saved = []
    for result in results:
        if result.curve:
            figure, file = plots.loss_curve(result.curve, f"{name}: {result.name}"), Path(folder) / "overfit_curve.png"
        elif (report := result.data.get("report")) is not None and report.histograms:
            figure, file = plots.activation_histograms(report.histograms, report.layer_stats, name), Path(folder) / "init_activations.png"
        else:
            continue
        figure.savefig(file, dpi=100)
        plots.close(figure)
        saved.append(str(file))
    return saved


def report(args: argparse.Namespace) -> int:
    """Rebuild a run's report from what MLflow holds (tags flag.*, metric histories) and print it."""
    from babysit import tracking
    from babysit.advice import run_report
    from tasks.track import flags_from_tags

    uri = tracking.resolve_uri(args.uri)
    tracking.check_reachable(uri)  # else minutes of MLflow's retries, then blame on the run id
    record = tracking.read_run(uri, args.run_id, ("train_loss", "train_acc", "val_loss", "val_acc", "update_ratio"))
    if not any(key.startswith("babysit.") for key in record.tags):  # QA: any MLflow run read as "no flags: the run looks healthy"
        raise BabysitError(f"run {args.run_id} was not made by babysit (it has no babysit.* tags), so there is nothing to judge it by: "
                           "babysit report reads the runs of babysit train, search (and its trials) and ensemble; open this one in the MLflow UI (babysit ui).")
    flags = flags_from_tags(record.tags)
    history = {key: record.histories[key] for key in ("train_loss", "train_acc", "val_loss", "val_acc") if key in record.histories}
    name = record.tags.get("babysit.config_name") or record.tags.get("mlflow.runName", args.run_id)
    kind = record.tags.get("babysit.kind")
    if kind == "search":  # a parent run: the search wrote its own report (ranges, edges, stages), not a training's
        try:
            text = f"# Search {name} ({args.run_id})\n\n" + tracking.read_text(uri, args.run_id, "report.md")
        except Exception as err:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            why = record.tags.get("babysit.failure")
            if record.status == "FINISHED":  # it wrote one: its artifact store does not answer (QA: "the search stopped before it ended")
                text = (f"# Search {name} ({args.run_id})\n\nreport.md could not be read from the run's artifact store ({' '.join(str(err).split())[:300]}); "
                        "if the run was logged through a tracking server (`babysit server up`), start it again.\n")
            else:
                text = (f"# Search {name} ({args.run_id})\n\nNo report.md: the search stopped before it ended (MLflow status {record.status}"
                        f"{': ' + why if why else ''}); run the same search again to resume it: it writes report.md when it ends.\n")
    elif kind == "ensemble":
        members = record.tags.get("babysit.members", "").split(",")
        text = (f"# Ensemble {name} ({args.run_id})\n\n{len(members)} members from search {record.tags.get('babysit.search_run_id')}: "
                f"ensemble test acc {record.metrics.get('ensemble_test_acc', float('nan')):.4f}, "
                f"best single member {record.metrics.get('best_single_test_acc', float('nan')):.4f}.\n")
    else:
        search_run = record.tags.get("mlflow.parentRunId") if "babysit.trial_key" in record.tags else None
        text = run_report(name, flags, history, record.metrics.get("initial_loss", float("nan")), record.histories,
                          record.tags.get("babysit.stop_reason"), args.run_id, finished=record.status == "FINISHED", search_run=search_run)
        if search_run:  # which search, stage and outcome: a pruned trial read as any short run (QA)
            status = record.tags.get("babysit.status", "unknown")
            said = f"Trial of search run {search_run}, stage {record.tags.get('babysit.stage', '?')}: {status}."
            text = text.replace("\n\n", f"\n\n{said}\n", 1)
    if record.status != "FINISHED":
        text += f"\nMLflow status: {record.status}" + (f" ({record.tags['babysit.failure']})" if "babysit.failure" in record.tags else "") + "\n"
    print(text, end="")
    return 0


def serve(args: argparse.Namespace) -> int:
    """flow.serve with a schedule: runs come while this process runs (no worker, no work pool)."""
    from babysit import deploy

    schedule = deploy.schedule_for(args.cron, args.interval, args.timezone)
    search, name = deploy.check_config(args.config, args.set)
    deploy.check_name(args.name or name, "--name" if args.name else f"the `name` of {args.config}")
    if not (api := os.environ.get("PREFECT_API_URL")):

        running = [r for r, alive, ok in servers.status(Path(".babysit")) if r.name == "prefect" and alive and ok]
        raise BabysitError("schedules need a Prefect server (the temporary one Prefect starts when PREFECT_API_URL is unset runs no scheduler): "
                           + (f"`babysit server up` started one; run `{servers.exports(running)[0]}` and try again." if running
                              else "start one with `babysit server up`, run the `export PREFECT_API_URL=...` line it prints, and try again."))
    servers.check_prefect_api(api)
    with console.status("loading the flow..."):
        flow = deploy.flow_of(search)
    console.print(f"serving {args.config} as deployment '{flow.name}/{args.name or name}' on the Prefect server at {api}; Ctrl-C stops serving and pauses the schedule", highlight=False)
    quiet_user_errors()
    deploy.serve(flow, args.config, args.set, schedule, args.name or name)
    return 0


def server(args: argparse.Namespace) -> int:
    """babysit server up|down|status|env (babysit.servers)."""

    state = Path(args.state)
    names = [args.only] if args.only else ["prefect", "mlflow"]
    # QA: run from another folder, down and env found nothing there and said nothing, exit 0, with both servers running
    which = f"{args.only} server" if args.only else "servers"
    none_recorded = (f"no {which} recorded in {state.resolve()}/ (`babysit server up` starts them "
                     f"and records them in the folder it runs from: run this there, or pass --state PATH/.babysit)")
    if args.action == "down":
        stopped = servers.down(state, names)
        for name, was_running in stopped:
            console.print(f"{name}: {'stopped' if was_running else 'was not running'}", highlight=False)
        if stopped:
            return 0
        if (state / "servers.json").exists():  # a `down` before this one stopped them: as safe to repeat as before
            console.print(f"no {which} running from {state.resolve()}/ (stopped already)", highlight=False)
            return 0
        console.print(none_recorded, highlight=False)
        return 1
    if args.action in ("status", "env"):
        found = servers.status(state)
        if args.action == "env":
            running = [r for r, alive, _ in found if alive]
            if running:
                print("\n".join(servers.exports(running)))
            else:  # on stderr: `eval "$(babysit server env)"` exports nothing, and says why
                print(none_recorded if not found else "the recorded servers are not running (`babysit server up` starts them)", file=sys.stderr)
            return 0 if running else 1
        for record, running, ok in found:
            console.print(f"{record.name}: pid {record.pid} {'running' if running else 'not running'}, "
                          f"{'healthy' if ok else 'not healthy'} at {record.health_url} (log {record.log})", highlight=False)
        if not found:
            console.print(none_recorded, highlight=False)
        return 0 if found and all(running and ok for _, running, ok in found) else 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] binding {args.host}: the servers are reachable from the network, without authentication", highlight=False)
    specs = []
    if "prefect" in names:
        specs.append(servers.prefect_spec(state, args.host, args.prefect_port, args.prefect_db))
    if "mlflow" in names:
        specs.append(servers.mlflow_spec(state, args.host, args.mlflow_port, args.backend_store_uri, args.artifacts_destination, args.mlflow_workers))
    began = time.time()
    with console.status(f"starting {' and '.join(s.name for s in specs)} (logs in {state}/)..."):
        records = servers.up(specs, state, args.timeout)
        if "prefect" in names:
            servers.ensure_work_pool(records[0].export["PREFECT_API_URL"])
    asked = {"prefect": args.prefect_port, "mlflow": args.mlflow_port}
    for record in records:
        since = f"healthy after {record.healthy_after_s:.1f} s" if record.started >= began else "already running"
        if record.started < began and record.port != asked[record.name]:  # QA: the ports asked for were silently not used
            since += f" on port {record.port}, not the {asked[record.name]} asked for (babysit server down first to move it)"
        console.print(f"{record.name}: pid {record.pid}, {since}, UI {record.ui} (log {record.log})", highlight=False)
    console.print("point babysit, prefect and mlflow at them (babysit server env prints these; babysit server down stops them):", highlight=False)
    print("\n".join(servers.exports(records)))
    return 0


def ensemble(args: argparse.Namespace) -> int:
    from babysit import tracking

    tracking.check_reachable(tracking.resolve_uri(args.uri))  # before Prefect starts, as train and search do
    with console.status("starting Prefect (ephemeral server unless PREFECT_API_URL is set)..."):
        from flows.ensemble import ensemble_flow, search_parent

        parent = search_parent(tracking.resolve_uri(args.uri), args.run_id)  # a wrong id, before a server starts and a flow run fails
    if parent.status != "FINISHED":  # killed or interrupted: its later stages and final retrain may never have run (QA)
        console.print(f"[yellow]note:[/] search {args.run_id} is {parent.status} in MLflow, not FINISHED: the ensemble takes the best of the trials "
                      "it finished; run the search again to finish it first.", highlight=False)
    quiet_user_errors()
    with servers.temporary_server_settings():
        summary = ensemble_flow(search_run_id=args.run_id, top=args.top, epochs=args.epochs, tracking_uri=args.uri)
    table = summary_table(f"babysit ensemble: top {args.top} of search {args.run_id}")
    table.add_row("members (test acc)", "\n".join(f"{run} ({acc:.4f})" for run, acc in zip(summary.members, summary.member_test_acc)))
    table.add_row("best single model (by val acc)", f"test acc {summary.best_single_test_acc:.4f}")
    table.add_row("ensemble (mean of probabilities)", f"test acc {summary.ensemble_test_acc:.4f}")
    table.add_row("MLflow run", summary.run_id)
    console.print(table)
    return 0


def check_can_serve(host: str, port: int) -> None:
    """A port taken, or a host that is not this machine's, is a BabysitError: MLflow's server would say so in a traceback and exit 0."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise BabysitError(f"port {port} on {host} is taken (an MLflow UI already running there? open http://{host}:{port}); "
                                   "choose another with --port, or stop what holds it.") from None
            raise BabysitError(f"--host {host} --port {port}: cannot serve there ({err.strerror}); give an address of this machine "
                               "(127.0.0.1, or 0.0.0.0 for all of them) and a free port.") from None


def ui(args: argparse.Namespace) -> int:
    from babysit import tracking

    uri = tracking.resolve_uri(args.uri)
    if tracking.is_remote(uri):  # a tracking server is its own UI
        tracking.check_reachable(uri)
        console.print(f"{uri} is a tracking server: its UI is {uri.rstrip('/')}/#/experiments?{tracking.UI_VIEW}", highlight=False)
        return 0
    check_can_serve(args.host, args.port)
    if db := tracking.sqlite_path(uri):
        db.parent.mkdir(parents=True, exist_ok=True)
    if db is None or db.is_file():  # one MLflow cannot use: its UI died in its child process with a traceback (QA)
        tracking.check_store(uri)
    console.print(f"MLflow UI for {uri} on http://{args.host}:{args.port}/#/experiments?{tracking.UI_VIEW} (Ctrl-C stops it)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port), "--workers", "1"]
    if (served := tracking.served_artifacts(uri)) is not None:  # runs logged through `babysit server up` show their artifacts (QA: 404)
        command += ["--artifacts-destination", str(served.resolve())]
    return servers.run_in_own_group(command)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="babysit", description="Train neural networks the CS231n way, as Prefect flows tracked in MLflow.")
    commands = root.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("config", help=f"YAML experiment file, e.g. conf/{'search_digits' if name == 'search' else 'digits_mlp'}.yaml")
        sub.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field, e.g. --set optim.lr=3e-3 (repeatable)")
        return sub

    with_config("train", "train one model and track it in MLflow").set_defaults(handler=train)
    check_cmd = with_config("check", "pre-flight checks: initial loss, tiny-subset overfit, activations at init")
    check_cmd.add_argument("--subset", type=at_least_one, default=20, metavar="N", help="training examples the model must overfit (default 20)")
    check_cmd.add_argument("--budget", type=at_least_one, default=200, metavar="EPOCHS", help="epochs allowed to overfit them (default 200)")
    check_cmd.add_argument("--plots", default=None, metavar="DIR", help="also save init_activations.png and overfit_curve.png there")
    check_cmd.set_defaults(handler=check)
    report_cmd = commands.add_parser("report", help="a run's flags and advice, rebuilt from MLflow")
    report_cmd.add_argument("run_id", help="MLflow run id (shown by `babysit train` and in `babysit ui`)")
    report_cmd.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    report_cmd.set_defaults(handler=report)
    with_config("search", "coarse-to-fine hyperparameter search (conf/search_*.yaml)").set_defaults(handler=search)
    serve_cmd = with_config("serve", "serve the config's flow on a schedule (flow.serve; search files serve the search flow)")
    when = serve_cmd.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", default=None, metavar="EXPR", help="cron schedule, e.g. '0 3 * * *' (nightly at 03:00)")
    when.add_argument("--interval", type=float, default=None, metavar="SECONDS", help="run every SECONDS")
    serve_cmd.add_argument("--timezone", default="UTC", help="IANA time zone of --cron (default UTC)")
    serve_cmd.add_argument("--name", default=None, help="deployment name (default: the config's `name`)")
    serve_cmd.set_defaults(handler=serve)
    server_cmd = commands.add_parser("server", help="local Prefect and MLflow servers: up | down | status | env")
    server_cmd.add_argument("action", choices=["up", "down", "status", "env"])
    server_cmd.add_argument("--only", choices=["prefect", "mlflow"], default=None, help="just this server")
    server_cmd.add_argument("--state", default=".babysit", metavar="DIR", help="PIDs and logs (default .babysit)")
    server_cmd.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 exposes them)")
    server_cmd.add_argument("--prefect-port", type=port_number, default=4200)
    server_cmd.add_argument("--mlflow-port", type=port_number, default=5000)
    server_cmd.add_argument("--prefect-db", default=None, metavar="URL", help="Prefect's database (default SQLite under --state; postgresql+asyncpg://...)")
    server_cmd.add_argument("--backend-store-uri", default=None, metavar="URL", help="MLflow's store: any SQLAlchemy URL (default sqlite:///mlruns/mlflow.db, the local store)")
    server_cmd.add_argument("--artifacts-destination", default=None, metavar="URI", help="where the MLflow server keeps artifacts it serves (default: served-artifacts beside a SQLite store, else mlruns/served-artifacts; s3://...)")
    server_cmd.add_argument("--mlflow-workers", type=int, default=2, help="MLflow server worker processes (default 2)")
    server_cmd.add_argument("--timeout", type=float, default=180, metavar="SECONDS", help="how long to wait for health (default 180)")
    server_cmd.set_defaults(handler=server)
    ens = commands.add_parser("ensemble", help="average the top-k trials of a search and compare with the best single model")
    ens.add_argument("run_id", help="the search's parent MLflow run id")
    ens.add_argument("--top", type=at_least_one, default=3, help="members: the k best trials by validation accuracy (default: 3)")
    ens.add_argument("--epochs", type=at_least_one, default=None, help="retrain each member this long (default: its trial's epochs)")
    ens.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    ens.set_defaults(handler=ensemble)
    ui_cmd = commands.add_parser("ui", help="open the MLflow UI on the local store (127.0.0.1)")
    ui_cmd.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    ui_cmd.add_argument("--host", default="127.0.0.1")
    ui_cmd.add_argument("--port", type=port_number, default=5000)
    ui_cmd.set_defaults(handler=ui)
    return root


INTERRUPTED = {  # what an interrupted command left in MLflow
    "train": "the run in progress is marked FAILED in MLflow (a training does not resume: run it again to start afresh).",
    "search": "runs in progress are marked FAILED in MLflow; finished trials are kept, and running the same command again resumes the search.",
    "ensemble": "the members trained so far are not kept: run the same command again.",
    "server up": "servers it started may still be starting, in process groups of their own: `babysit server status` lists them, `babysit server down` stops them.",
}


class StopSignal(KeyboardInterrupt):
    """SIGHUP (a closed terminal, a dropped SSH session) or SIGTERM (`kill`, `timeout`, a process
    manager), handled as Ctrl-C is: runs in progress end FAILED, the exit status names the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal = signum  # as Prefect's TerminationSignal: babysit.failure names it (tracking.failure_reason)


def stop_on_signal(signum: int, frame: object) -> None:
    # during a flow Prefect's own SIGTERM handler ends the flow run first, then hands the signal on to this one
    raise StopSignal(signum)


def main(argv: list[str] | None = None) -> int:
    # the environment's defaults for Prefect and MLflow are set when babysit is imported (babysit/__init__.py)
    args = parser().parse_args(argv)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints where every thread of a stuck command is
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except ValueError:  # stderr without a file descriptor (captured, as under pytest): nowhere to print
            pass
    if args.command != "ui":  # ui stops its own process group on a hang-up or SIGTERM
        for signum in (getattr(signal, "SIGHUP", None), signal.SIGTERM):
            if signum is not None:
                signal.signal(signum, stop_on_signal)
    try:
        return args.handler(args)
    except BabysitError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)  # a user's choice([a, b]) is not markup
        return 2
    except KeyboardInterrupt as err:
        if (said := INTERRUPTED.get(args.command if args.command != "server" else f"server {args.action}")) is not None:
            console.print(f"[bold red]interrupted:[/] {said}", highlight=False)
        else:
            console.print("[bold red]interrupted.[/]", highlight=False)
        return 128 + err.signal if isinstance(err, StopSignal) else 130
    except Exception as err:
        if (lost := lost_server(err)) is None:
            raise
        console.print(f"[bold red]error:[/] {escape(lost.message)}", highlight=False)
        if lost.prefect:
            # Prefect's events worker would try every queued event on the way out, ~7 s apiece
            # (300 trials' events: half an hour), and nothing is left to send them to
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1


@dataclass(frozen=True)
class LostServer:
    message: str  # one paragraph for the user
    prefect: bool  # the Prefect server (else MLflow's)


def lost_server(err: Exception) -> LostServer | None:
    """What to say when a command was cut off from its MLflow or Prefect server in mid-run, else None."""
    from babysit import tracking

    if mlflow := tracking.lost_server(err):
        return LostServer(f"the MLflow tracking server at {mlflow} stopped answering, so this command could not record its run there "
                          "(nor end it). Start the server again (`babysit server up`) and rerun: the next `babysit train` in that "
                          "experiment ends a training left RUNNING as FAILED, and a search run again resumes from its finished trials.", prefect=False)
    if prefect := servers.lost_prefect_api(err):
        return LostServer(f"the Prefect server at {prefect} stopped answering, so this command could not go on reporting its flow run. "
                          "Start it again (`babysit server up`) and rerun: MLflow keeps what finished, and a search resumes from its "
                          "finished trials.", prefect=True)
    return None


if __name__ == "__main__":
    sys.exit(main())
