"""ensemble_flow: average the predictions of a search's top-k trials (the lecture's model ensembles).

The top-k finished trials of a search (by validation accuracy) are retrained from the configs
their MLflow runs recorded, each is tested alone, and their softmax probabilities are averaged.
The result is an MLflow run of its own, tagged with the search's parent run id.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from pydantic import ValidationError
from prefect.cache_policies import NO_CACHE

from babysit import tracking
from babysit.config import PLACEMENT_FIELDS, Config, with_values
from babysit.errors import BabysitError
from tasks.data import data_fingerprint, load_data_task
from tasks.preprocess import Prepared, preprocess_task
from tasks.train import train_and_test


@dataclass(frozen=True)
class EnsembleSummary:
    run_id: str
    members: list[str]  # the trial runs, best first
    member_test_acc: list[float]
    best_single_test_acc: float  # the member with the best validation accuracy, tested alone
    ensemble_test_acc: float


def config_from_params(params: dict[str, str]) -> Config:
    """A trial's training config rebuilt from its MLflow params (the flattened config). MLflow keeps
    every param as text: each is read back as YAML ('0.001', '[256, 256]', 'true'), except where
    the config wants text and YAML would read a number or a bool (a name '2024', a column '0')."""
    values = {key: _yaml_or_text(text) for key, text in params.items()}
    while True:
        try:
            return Config.model_validate(with_values({}, values))
        except ValidationError as err:
            wants_text = {".".join(map(str, e["loc"])) for e in err.errors() if e["type"] == "string_type"} & params.keys() - {
                key for key, value in values.items() if isinstance(value, str)}
            if not wants_text:
                raise
            values.update({key: params[key] for key in wants_text})


def _yaml_or_text(text: str) -> object:
    import yaml

    if text == "None":  # how MLflow writes a null
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def ensemble_probabilities(member_probabilities: list[np.ndarray]) -> np.ndarray:
    """The ensemble's class probabilities: the mean of its members' (rows × classes each)."""
    return np.mean(np.stack(member_probabilities), axis=0)


def search_parent(uri: str, search_run_id: str) -> tracking.RunRecord:
    """The parent run of a search; a BabysitError when there is none of that id, or it is no search."""
    parent = tracking.read_run(uri, search_run_id)
    if parent.tags.get("babysit.kind") != "search":
        raise BabysitError(f"MLflow run '{search_run_id}' is not a babysit search (no tag babysit.kind=search); pass a search's parent run id.")
    return parent


def top_trials(uri: str, search_run_id: str, k: int, parent: tracking.RunRecord | None = None) -> list:
    parent = parent or search_parent(uri, search_run_id)
    trials = [r for r in search_trials(uri, parent.experiment_id, search_run_id, parent.tags.get("babysit.reused_from"))
              if r.info.status == "FINISHED" and r.data.tags.get("babysit.stage") != "final" and r.data.tags.get("babysit.status") == "finished"]
    best = parent.tags.get("babysit.best_trial")  # first among the trials tied with it, as the search chose it
    ranked = sorted(trials, key=lambda r: (-r.data.metrics.get("best_val_acc", 0.0), r.data.tags.get("babysit.trial_key") != best))
    members, seen = [], set()
    for run in ranked:  # two stages can train the same config (same seed): one model, which an ensemble needs once
        trained = tuple(sorted((key, value) for key, value in run.data.params.items() if key not in PLACEMENT_FIELDS))
        if trained not in seen:
            seen.add(trained)
            members.append(run)
    if len(members) < k:
        raise BabysitError(f"search '{search_run_id}' has {len(members)} finished trials with distinct configs; --top {k} needs at least {k}.")
    return members[:k]


def search_trials(uri: str, experiment_id: str, search_run_id: str, reused_from: str | None) -> list:
    """A search's trial runs: its children, and the trials it reused from the earlier runs of the
    same search in `reused_from` (their ids, comma-separated), which its trials.csv lists."""
    trials = tracking.find_runs(uri, experiment_id, {"mlflow.parentRunId": search_run_id})
    if reused_from:
        listed = set(pd.read_csv(io.StringIO(tracking.read_text(uri, search_run_id, "trials.csv")))["run_id"].dropna())
        trials += [r for earlier in reused_from.split(",") for r in tracking.find_runs(uri, experiment_id, {"mlflow.parentRunId": earlier}) if r.info.run_id in listed]
    return trials


@task(name="ensemble-member", cache_policy=NO_CACHE)
def member_task(cfg: Config, prepared: Prepared) -> tuple[float, np.ndarray]:
    """Retrain one member; return its own test accuracy and its test-set class probabilities."""
    result, model = train_and_test(cfg, prepared)
    X_test = torch.as_tensor(prepared.splits.X_test).to(next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        probabilities = torch.softmax(model(X_test).float(), dim=1).cpu().numpy()
    return result.test_acc, probabilities


@flow(name="ensemble", flow_run_name="ensemble-{search_run_id}")
def ensemble_flow(search_run_id: str, top: int = 3, epochs: int | None = None, tracking_uri: str | None = None) -> EnsembleSummary:
    """Retrain the top `top` trials of a search (for `epochs`, default each trial's own) and average them."""
    if top < 1 or epochs is not None and epochs < 1:
        raise BabysitError(f"ensemble of search {search_run_id}: `top` and `epochs` are counts of at least 1 (got top={top}, epochs={epochs}).")
    uri = tracking.resolve_uri(tracking_uri)
    parent = search_parent(uri, search_run_id)
    trials = top_trials(uri, search_run_id, top, parent)
    configs = [config_from_params(r.data.params) for r in trials]
    if epochs is not None:
        configs = [c.model_copy(update={"train": c.train.model_copy(update={"epochs": epochs})}) for c in configs]
    base = configs[0]  # members share data and preprocessing: a search varies the model, not the split
    if (searched_on := parent.tags.get("babysit.data_version")) and data_fingerprint(base.data) != searched_on:  # QA: retrained on other data, without a word
        get_run_logger().warning("ensemble of search %s: %s changed after the search ran (its files' sizes or times differ): its members were "
                                 "chosen on the old data and retrain on the new, so they need not be its best any more", search_run_id, base.data.path)
    prepared = preprocess_task(load_data_task(base.data, base.seed), base.preprocess)
    # one after another: small models hold the GIL for most of each step, so threads would not overlap them
    members = [member_task(cfg, prepared) for cfg in configs]
    y_test = prepared.splits.y_test
    ensemble_acc = float((ensemble_probabilities([p for _, p in members]).argmax(1) == y_test).mean())

    experiment_id = trials[0].info.experiment_id  # the search's
    run = tracking.start_run(uri, tracking.experiment_name(uri, experiment_id), f"ensemble-top{top}", {"top": top, "epochs": epochs},
                             {"babysit.kind": "ensemble", "babysit.search_run_id": search_run_id, "babysit.members": ",".join(r.info.run_id for r in trials)})
    with tracking.finished_or_failed(run):
        tracking.log_metric_series(run, {"member_test_acc": [acc for acc, _ in members]}, first_step=1)
        tracking.log_metrics(run, {"ensemble_test_acc": ensemble_acc, "best_single_test_acc": members[0][0]})
    return EnsembleSummary(run.run_id, [r.info.run_id for r in trials], [acc for acc, _ in members], members[0][0], ensemble_acc)
