"""The real search flow: Prefect tasks, nested MLflow runs in a temporary store, resume."""

from __future__ import annotations

import io
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from babysit import tracking
from babysit.errors import BabysitError
from babysit.config import DEFAULT_LR, SearchExperiment, load_config
from babysit.space import parse_dist
from flows.search import search_flow
from tasks.data import load_data_task
from tasks.preprocess import fit_preprocess

ROOT = Path(__file__).resolve().parents[1]

SMALL = [
    "model.hidden=[32]",
    "search.workers=2",
    "search.stages=[{name: coarse, trials: 4, epochs: 1}, {name: fine, trials: 3, epochs: 2}]",
    "search.final.epochs=3",
]


@pytest.fixture
def fresh_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def children(uri, parent_id):
    parent = tracking.get_run(uri, parent_id)
    return tracking.find_runs(uri, parent.info.experiment_id, {"mlflow.parentRunId": parent_id})


def small_search(uri, *overrides):
    """The digits search on a small model with 2 workers and `overrides`: its summary and trial runs."""
    summary = search_flow(config="conf/search_digits.yaml", overrides=[*SMALL[:2], *overrides])
    return summary, children(uri, summary.parent_run_id)


@pytest.fixture(scope="module")
def search_store(tmp_path_factory):
    """One store for the tests that read the same finished search (a search costs ~20 s)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('search')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def finished_search(prefect_harness, search_store):
    return search_flow(config="conf/search_digits.yaml", overrides=SMALL)


@pytest.fixture
def tracking_uri(search_store):  # the tests below read the shared store
    return search_store


def test_search_tracks_a_parent_with_nested_trials(finished_search, tracking_uri):
    summary = finished_search
    parent = tracking.get_run(tracking_uri, summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    kids = children(tracking_uri, summary.parent_run_id)
    assert len(kids) == 4 + 3 + 1
    stages = [k.data.tags["babysit.stage"] for k in kids]
    assert stages.count("coarse") == 4 and stages.count("fine") == 3 and stages.count("final") == 1
    assert all(k.info.status == "FINISHED" and k.data.tags["babysit.trial_key"] for k in kids)
    # test-set discipline: only the final retrain has a test metric
    assert [k.data.tags["babysit.stage"] for k in kids if "test_acc" in k.data.metrics] == ["final"]
    final = next(k for k in kids if k.data.tags["babysit.stage"] == "final")
    assert len(tracking.metric_history(tracking_uri, final.info.run_id, "val_acc")) == 3
    assert math.isclose(summary.test_acc, final.data.metrics["test_acc"])
    # the final retrain (in a worker process, while the flow drew the search figure) logged its model
    models = tracking._client(tracking_uri).search_logged_models([final.info.experiment_id], filter_string=f"source_run_id = '{final.info.run_id}'")
    assert [m.name for m in models] == ["model"]
    # the parent logs each stage's ranges, the best params, the trial table and the plots
    assert parent.data.tags["range.coarse.optim.lr"] == "loguniform(1e-05, 0.1)"
    assert "range.fine.optim.lr" in parent.data.tags and "best.optim.lr" in parent.data.tags
    artifacts = {a.path for a in tracking._client(tracking_uri).list_artifacts(summary.parent_run_id)}
    assert {"trials.csv", "search.png", "report.md"} <= artifacts


def test_best_trial_is_chosen_on_validation_accuracy(finished_search, tracking_uri):
    kids = [k for k in children(tracking_uri, finished_search.parent_run_id) if k.data.tags["babysit.stage"] != "final"]
    top = max(k.data.metrics.get("best_val_acc", -1) for k in kids)
    assert finished_search.best_val_acc == pytest.approx(top)
    tied = [float(k.data.params["optim.lr"]) for k in kids if k.data.metrics.get("best_val_acc") == top]
    assert any(finished_search.best_params["optim.lr"] == pytest.approx(lr) for lr in tied)


def test_rerunning_a_search_reuses_finished_trials_and_redoes_interrupted_ones(finished_search, tracking_uri):
    client = tracking._client(tracking_uri)
    kids = children(tracking_uri, finished_search.parent_run_id)
    # what `kill -9` mid-stage leaves behind: one trial RUNNING, one never started
    interrupted = next(k for k in kids if k.data.tags["babysit.stage"] == "coarse")
    client.update_run(interrupted.info.run_id, "RUNNING")
    never_started = next(k for k in kids if k.data.tags["babysit.stage"] == "coarse" and k.info.run_id != interrupted.info.run_id)
    client.delete_run(never_started.info.run_id)
    client.set_tag(finished_search.parent_run_id, "babysit.failure", "interrupted")  # as Ctrl-C leaves the parent
    client.set_tag(finished_search.parent_run_id, "edge.model.dropout", "high")  # an edge of an earlier run of it, which this one does not reach
    client.set_tag(finished_search.parent_run_id, "babysit.flags", "edge:model.dropout=high")
    client.update_run(finished_search.parent_run_id, "FAILED")
    crashed_flow_run = tracking.get_run(tracking_uri, finished_search.parent_run_id).data.tags["prefect.flow_run_id"]

    again = search_flow(config="conf/search_digits.yaml", overrides=SMALL)

    assert again.parent_run_id == finished_search.parent_run_id
    assert again.trials_run == 2 and again.trials_reused == 4 + 3 + 1 - 2
    after = children(tracking_uri, again.parent_run_id)
    assert not [k for k in after if k.info.status == "RUNNING"]
    marked = tracking.get_run(tracking_uri, interrupted.info.run_id)
    assert marked.info.status == "FAILED" and marked.data.tags["babysit.status"] == "failed"
    parent = tracking.get_run(tracking_uri, again.parent_run_id)
    assert parent.info.status == "FINISHED" and "babysit.failure" not in parent.data.tags  # the resumed search finished
    assert parent.data.tags["prefect.flow_run_id"] != crashed_flow_run  # names the flow run that finished it
    assert {k for k in parent.data.tags if k.startswith("edge.")} == {f"edge.{f}" for f in ([e.split("=")[0].removeprefix("edge:") for e in again.edges])}
    assert parent.data.tags["babysit.flags"] == (",".join(again.edges) or "none")
    finished_keys = pd.Series([k.data.tags["babysit.trial_key"] for k in after if k.info.status == "FINISHED"])
    assert finished_keys.is_unique and len(finished_keys) == 4 + 3 + 1
    assert again.best_val_acc == pytest.approx(finished_search.best_val_acc)


def test_a_resumed_stage_prunes_against_the_trials_it_reuses(prefect_harness, fresh_uri):
    overrides = ["model.hidden=[32]", "search.workers=1", "search.sampler=lhs", "search.space={optim.lr: 'loguniform(1e-6, 1e-1)'}",
                 "search.stages=[{name: coarse, trials: 6, epochs: 3, prune: median}]", "search.final=null"]
    first = search_flow(config="conf/search_digits.yaml", overrides=overrides)
    slowest = min(children(fresh_uri, first.parent_run_id), key=lambda k: float(k.data.params["optim.lr"]))  # lr ~1e-6: near chance
    tracking._client(fresh_uri).delete_run(slowest.info.run_id)  # as if the search was killed before it ran
    again = search_flow(config="conf/search_digits.yaml", overrides=overrides)
    assert again.parent_run_id == first.parent_run_id and (again.trials_run, again.trials_reused) == (1, 5)
    (rerun,) = [k for k in children(fresh_uri, again.parent_run_id) if k.data.tags["babysit.trial_key"] == slowest.data.tags["babysit.trial_key"]]
    # alone in its stage it would have no peers to be judged against; the 5 reused trials' epochs are its peers
    assert rerun.data.tags["babysit.status"] == "pruned" and rerun.data.metrics["epochs_run"] < 3


EDITABLE = ["model.hidden=[32]", "search.workers=1", "search.sampler=lhs", "search.space={optim.lr: 'loguniform(1e-6, 1e-1)'}",
            "search.stages=[{name: coarse, trials: 6, epochs: 3, prune: median}, {name: fine, trials: 2, epochs: 1}]"]


def test_a_search_whose_file_changed_reuses_the_finished_trials_of_its_earlier_runs(prefect_harness, fresh_uri, caplog):
    from flows.ensemble import top_trials

    first = search_flow(config="conf/search_digits.yaml", overrides=[*EDITABLE, "search.final.epochs=2"])
    first_kids = {k.data.tags["babysit.trial_key"]: k for k in children(fresh_uri, first.parent_run_id)}
    pruned = [k for k in first_kids.values() if k.data.tags["babysit.status"] == "pruned"]
    assert pruned, "the coarse stage should prune a trial (lr ~1e-6 barely learns): the case this test checks"

    tracking._client(fresh_uri).update_run(first.parent_run_id, "RUNNING")  # as a killed search leaves it
    flow_log = logging.getLogger("prefect.flow_runs")  # Prefect's loggers do not propagate to caplog's
    flow_log.addHandler(caplog.handler)
    try:  # only the final retrain changed: the stages sample, train and narrow as before
        again = search_flow(config="conf/search_digits.yaml", overrides=[*EDITABLE, "search.final.epochs=3"])
    finally:
        flow_log.removeHandler(caplog.handler)
    assert f"earlier runs {first.parent_run_id} are still RUNNING in MLflow" in caplog.text
    assert again.parent_run_id != first.parent_run_id  # another definition, another parent run
    # every trial of the stages is reused but the pruned ones, which pruning judged against the first run's stage-mates
    assert (again.trials_run, again.trials_reused) == (len(pruned) + 1, 6 + 2 - len(pruned))
    parent = tracking.get_run(fresh_uri, again.parent_run_id)
    assert parent.data.tags["babysit.reused_from"] == first.parent_run_id
    trials = pd.read_csv(io.StringIO(tracking.read_text(fresh_uri, again.parent_run_id, "trials.csv")))
    reused = trials[trials["reused"]]
    assert reused.loc[reused["status"] == "finished", "reason"].isna().all()  # as a fresh trial that completed, not 'completed'
    assert set(reused["run_id"]) == {k.info.run_id for k in first_kids.values() if k.data.tags["babysit.status"] != "pruned" and k.data.tags["babysit.stage"] != "final"}
    assert sorted(k.data.tags["babysit.stage"] for k in children(fresh_uri, again.parent_run_id)) == ["coarse"] * len(pruned) + ["final"]
    assert again.best_val_acc == pytest.approx(first.best_val_acc)
    # the ensemble of the new search finds the trials it reused
    best = top_trials(fresh_uri, again.parent_run_id, 1)[0]
    assert best.data.metrics["best_val_acc"] == pytest.approx(again.best_val_acc)


def test_a_search_on_data_rewritten_in_place_trains_again(prefect_harness, fresh_uri, tmp_path, caplog):
    from sklearn.datasets import load_digits

    from flows.ensemble import ensemble_flow

    table = load_digits(as_frame=True).frame
    csv = tmp_path / "digits.csv"
    table.to_csv(csv, index=False)
    overrides = ["data.source=csv", f"data.path={csv}", "data.target=target", *EDITABLE[:3],
                 "search.stages=[{name: coarse, trials: 2, epochs: 1}]", "search.final=null"]
    first = search_flow(config="conf/search_digits.yaml", overrides=overrides)
    again = search_flow(config="conf/search_digits.yaml", overrides=overrides)
    assert again.parent_run_id == first.parent_run_id and again.trials_reused == 2  # the same data: resumed
    relative = [f"data.path={os.path.relpath(csv)}" if o.startswith("data.path=") else o for o in overrides]
    moved = search_flow(config="conf/search_digits.yaml", overrides=relative)  # the same file by another path
    assert moved.parent_run_id == first.parent_run_id and moved.trials_reused == 2
    table.assign(target=table["target"].sample(frac=1.0, random_state=0).to_numpy()).to_csv(csv, index=False)  # labels shuffled, same path
    changed = search_flow(config="conf/search_digits.yaml", overrides=overrides)
    assert changed.parent_run_id != first.parent_run_id and (changed.trials_run, changed.trials_reused) == (2, 0)
    assert changed.best_val_acc < first.best_val_acc
    # an ensemble of the first search retrains on the new data: it says so (QA: without a word)
    with caplog.at_level(logging.WARNING):
        ensemble_flow(first.parent_run_id, top=2, epochs=1)
    assert "changed after the search ran" in caplog.text
    caplog.clear()
    ensemble_flow(changed.parent_run_id, top=2, epochs=1)
    assert "changed after the search ran" not in caplog.text


def test_a_search_is_the_same_search_however_its_ranges_are_spelled_and_wherever_it_trains():
    from flows.search import search_hash

    def hashed(*overrides):
        return search_hash(load_config("conf/search_digits.yaml", list(overrides), model=SearchExperiment))

    spelled = hashed("search.space.optim.lr='loguniform(0.00001, 0.1)'", "search.space.model.hidden='choice([[32], [64, 64]])'")
    assert spelled == hashed("search.space.optim.lr='loguniform(1e-5, 1e-1)'", "search.space.model.hidden='choice([[32],[64,64]])'")
    assert hashed() == hashed("train.device=cpu", "train.threads=1", "search.workers=1", "search.runner=threads")
    assert hashed() != hashed("search.space.optim.lr='loguniform(1e-5, 1e-2)'") and hashed() != hashed("search.final.epochs=31")
    # the samplers go through the fields in the file's order: the same ranges reordered sample other trials
    space = load_config("conf/search_digits.yaml", model=SearchExperiment).search.space
    reordered = "{" + ", ".join(f"{field}: '{spec}'" for field, spec in reversed(space.items())) + "}"
    assert hashed(f"search.space={reordered}") != hashed()


def test_a_scheduled_search_reuses_no_trial_of_earlier_runs(prefect_harness, fresh_uri):
    from flows.search import open_parent, recurrence_of

    overrides = [*EDITABLE[:3], "search.stages=[{name: coarse, trials: 2, epochs: 1}]", "search.final=null"]
    first = search_flow(config="conf/search_digits.yaml", overrides=overrides)
    changed = load_config("conf/search_digits.yaml", [*overrides, "search.top_k=0.5"], model=SearchExperiment)
    named, _, _ = recurrence_of(changed, fresh_uri)
    assert [run.info.run_id for run in named] == [first.parent_run_id]
    _, by_hand, _ = open_parent(changed, fresh_uri, named)
    assert len(by_hand) == 2
    nightly = {"babysit.schedule": "search-digits-nightly", "babysit.scheduled_for": "2026-11-29T03:00:00Z"}
    same = load_config("conf/search_digits.yaml", overrides, model=SearchExperiment)
    tonight, scheduled, reopened = open_parent(same, fresh_uri, named, nightly)
    assert scheduled == {} and reopened is None and tonight.run_id != first.parent_run_id
    # the same file by hand again: it resumes its own run, not tonight's newer one
    named, _, _ = recurrence_of(same, fresh_uri)
    assert named[0].info.run_id == tonight.run_id
    parent, _, _ = open_parent(same, fresh_uri, named)
    assert parent.run_id == first.parent_run_id
    reopened_tags = tracking.get_run(fresh_uri, parent.run_id).data.tags  # until it ends again, it claims no edges of its last run
    assert "babysit.flags" not in reopened_tags and not [k for k in reopened_tags if k.startswith("edge.")]


def test_a_search_running_now_in_another_process_is_not_resumed_until_that_process_is_gone(prefect_harness, fresh_uri):
    from flows.search import check_not_running, open_parent, process_identity, recurrence_of

    overrides = [*EDITABLE[:3], "search.stages=[{name: coarse, trials: 2, epochs: 1}]", "search.final=null"]
    exp = load_config("conf/search_digits.yaml", overrides, model=SearchExperiment)
    named, _, _ = recurrence_of(exp, fresh_uri)
    parent, _, _ = open_parent(exp, fresh_uri, named)
    assert tracking.get_run(fresh_uri, parent.run_id).data.tags["babysit.owner"] == process_identity()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tracking.set_tags(parent, {"babysit.owner": process_identity(other.pid)})  # as if that process ran it
        named, _, _ = recurrence_of(exp, fresh_uri)
        with pytest.raises(BabysitError, match=rf"is running now, in process {other.pid} on this machine \(MLflow run {parent.run_id}\)"):
            open_parent(exp, fresh_uri, named)
        with pytest.raises(BabysitError, match=rf"is running now, in process {other.pid}"):  # said by `babysit search` before Prefect starts
            check_not_running(exp)
        edited = load_config("conf/search_digits.yaml", [*overrides, "search.top_k=0.5"], model=SearchExperiment)  # a new parent, the same trials
        with pytest.raises(BabysitError, match=rf"is running now, in process {other.pid}"):
            open_parent(edited, fresh_uri, named)
    finally:
        other.kill()
        other.wait()
    check_not_running(exp)  # gone: nothing to refuse
    resumed, _, reopened = open_parent(exp, fresh_uri, named)  # gone, as a killed search's process is: resumed
    assert resumed.run_id == parent.run_id and reopened is not None
    assert tracking.get_run(fresh_uri, parent.run_id).data.tags["babysit.owner"] == process_identity()


def test_runs_a_killed_process_of_this_machine_left_running_are_failed_when_an_edited_search_starts_anew(prefect_harness, fresh_uri):
    from flows.search import fail_abandoned, open_parent, process_identity, recurrence_of

    overrides = [*EDITABLE[:3], "search.stages=[{name: coarse, trials: 2, epochs: 1}]", "search.final=null"]
    exp = load_config("conf/search_digits.yaml", overrides, model=SearchExperiment)
    killed, alive = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2))
    try:
        owners = {"killed": process_identity(killed.pid), "alive": process_identity(alive.pid), "unknown": ""}
        killed.kill()
        killed.wait()
        parents = {}
        for who, owner in owners.items():  # three earlier runs of the search, each left RUNNING with a trial RUNNING
            named, _, _ = recurrence_of(exp, fresh_uri)
            parent, _, _ = open_parent(exp, fresh_uri, [])
            tracking.set_tags(parent, {"babysit.owner": owner})
            trial = tracking.start_run(fresh_uri, exp.tracking.experiment, "coarse-000", {}, {"babysit.trial_key": who}, parent=parent)
            parents[who] = (parent.run_id, trial.run_id)
        named, _, _ = recurrence_of(exp, fresh_uri)
        assert fail_abandoned(fresh_uri, named, keep=parents["unknown"][0]) == {parents["killed"][0]}
        statuses = {who: [tracking.get_run(fresh_uri, run_id).info.status for run_id in ids] for who, ids in parents.items()}
        assert statuses == {"killed": ["FAILED", "FAILED"], "alive": ["RUNNING", "RUNNING"], "unknown": ["RUNNING", "RUNNING"]}
        assert tracking.get_run(fresh_uri, parents["killed"][0]).data.tags["babysit.failure"] == "interrupted: its process is gone"
    finally:
        alive.kill()
        alive.wait()


def test_a_stage_whose_every_trial_failed_stops_the_search_with_the_first_failure(prefect_harness, fresh_uri):
    from babysit.errors import BabysitError

    # the base config trains, and each searched value would beside it; every sampled pair asks batch norm of single-row batches
    with pytest.raises(BabysitError, match=r"all 2 trials of stage coarse failed with an error, so the search stopped there; the first failure: "
                                           r"BabysitError: train.batch_size 1 with model.batchnorm: true.* set model.batchnorm: false\. The trials"):
        small_search(fresh_uri, "search.space={optim.lr: 'loguniform(1e-3, 1e-2)', model.batchnorm: 'choice([true])', train.batch_size: 'choice([1])'}",
                     "search.stages=[{name: coarse, trials: 2, epochs: 1}, {name: fine, trials: 2, epochs: 1}]")
    client = tracking._client(fresh_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.tags.get("babysit.stage") for r in runs if r.data.tags.get("babysit.kind") != "search"} == {"coarse"}  # fine never ran
    assert all(r.info.status == "FAILED" for r in runs)


def test_a_searched_device_that_cannot_train_here_stops_the_search_before_mlflow_has_a_run(prefect_harness, fresh_uri):
    from babysit.errors import BabysitError

    with pytest.raises(BabysitError, match=r"search.space `train.device` offers 'cuda:99', which no trial could train on: train.device 'cuda:99' is not available here"):
        small_search(fresh_uri, "search.space={optim.lr: 'loguniform(1e-3, 1e-2)', train.device: 'choice([cpu, cuda:99])'}")
    client = tracking._client(fresh_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.parametrize("where", ["file", "searched"])
def test_a_missing_init_from_stops_the_search_before_mlflow_has_a_run(prefect_harness, fresh_uri, tmp_path, where):
    from babysit.errors import BabysitError

    missing = tmp_path / "missing.pt"
    # searched: a choice of sources passed, and every trial failed under a parent run (QA)
    override = f"model.init_from={missing}" if where == "file" else f"search.space={{optim.lr: 'loguniform(1e-3, 1e-2)', model.init_from: 'choice([null, {missing}])'}}"
    with pytest.raises(BabysitError, match=r"`model.init_from` .*missing.pt: no such file"):
        small_search(fresh_uri, override)
    client = tracking._client(fresh_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_config_that_cannot_train_here_stops_a_run_before_mlflow_has_one(prefect_harness, fresh_uri):
    import torch

    from babysit.errors import BabysitError
    from flows.train import train_flow

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(BabysitError, match=r"train.device 'cuda:1' is not available here: this PyTorch build has no CUDA support"):
        train_flow(config="conf/digits_mlp.yaml", overrides=["train.device=cuda:1", "train.epochs=1"])
    with pytest.raises(BabysitError, match=r"train.device 'cuda' is not available here"):
        search_flow(config="conf/search_digits.yaml", overrides=["train.device=cuda"])
    with pytest.raises(BabysitError, match=r"train.batch_size 1 with model.batchnorm: true: .* needs at least 2 rows"):
        train_flow(config="conf/digits_mlp.yaml", overrides=["model.batchnorm=true", "train.batch_size=1"])
    client = tracking._client(fresh_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_failed_trials_are_recorded_and_do_not_stop_the_search(prefect_harness, fresh_uri):
    tracking_uri = fresh_uri
    # batch norm cannot train on batches of one row: those trials fail, the rest go on
    overrides = SMALL[:2] + [
        "search.space={optim.lr: 'loguniform(1e-3, 1e-2)', model.batchnorm: 'choice([false, true])', train.batch_size: 'choice([1])'}",
        "search.stages=[{name: coarse, trials: 6, epochs: 1}]",
        "search.final=null",
        "data.max_rows=300",  # batches of one row: a small set keeps the epoch short
    ]
    summary = search_flow(config="conf/search_digits.yaml", overrides=overrides)
    kids = children(tracking_uri, summary.parent_run_id)
    failed = [k for k in kids if k.info.status == "FAILED"]
    assert failed and all(k.data.tags["babysit.status"] == "failed" and k.data.tags["babysit.failure"] for k in failed)
    assert all(k.data.params["model.batchnorm"] == "True" for k in failed)
    assert summary.best_params["model.batchnorm"] is False
    assert tracking.get_run(tracking_uri, summary.parent_run_id).info.status == "FINISHED"


def test_worker_processes_run_the_trials_and_share_pruning(prefect_harness, fresh_uri):
    summary, kids = small_search(
        fresh_uri,
        "search.runner=processes",
        "search.space={optim.lr: 'loguniform(1e-5, 1e-1)'}",
        "search.stages=[{name: coarse, trials: 8, epochs: 3, prune: median}]",
        "search.final=null",
    )
    assert len(kids) == 8 and all(k.info.status == "FINISHED" for k in kids)
    assert all(k.data.params["train.threads"] == "1" for k in kids)  # 2 workers x 1 torch thread on 2 cores
    # each worker process sees the other's epochs through the shared pruner: some trials stop early
    pruned = [k for k in kids if k.data.tags["babysit.status"] == "pruned"]
    assert pruned and all(k.data.metrics["epochs_run"] < 3 for k in pruned)
    assert all(len(tracking.metric_history(fresh_uri, k.info.run_id, "val_acc")) == k.data.metrics["epochs_run"] for k in kids)
    # no final retrain: a worker process drew search.png while the flow wrote the rest
    artifacts = {a.path for a in tracking._client(fresh_uri).list_artifacts(summary.parent_run_id)}
    assert {"search.png", "trials.csv", "report.md"} <= artifacts


def test_babysit_report_on_a_search_prints_the_searchs_own_report(finished_search, tracking_uri, capsys):
    from babysit.cli import main

    assert main(["report", finished_search.parent_run_id, "--uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Search search_digits") and "- coarse: 4 trials" in out and "- fine: 3 trials" in out
    assert "No flags" not in out  # not a training run's report


def test_babysit_report_on_a_trial_names_its_search_and_outcome(finished_search, tracking_uri, capsys):
    from babysit.cli import main

    # QA: a trial's report said "no flags: next, tune the learning rate with a coarse-to-fine random search"
    for trial in children(tracking_uri, finished_search.parent_run_id):
        assert main(["report", trial.info.run_id, "--uri", tracking_uri]) == 0
        out = capsys.readouterr().out
        status, stage = trial.data.tags["babysit.status"], trial.data.tags["babysit.stage"]
        assert f"Trial of search run {finished_search.parent_run_id}, stage {stage}: {status}." in out
        assert "random search" not in out
        if "No flags: " in out and trial.info.status == "FINISHED":  # other tests leave interrupted trials in this store
            assert f"What to search next is in its search's report: `babysit report {finished_search.parent_run_id}`" in out


def test_babysit_report_on_a_search_stopped_before_it_ended_says_so_and_how_to_resume(fresh_uri, capsys):
    from babysit.cli import main

    parent = tracking.start_run(fresh_uri, "stopped", "search_digits", {}, {"babysit.kind": "search", "babysit.config_name": "search_digits"})
    tracking.set_tags(parent, {"babysit.failure": "interrupted"})
    tracking.end_run(parent, "FAILED")  # as Ctrl-C in the second stage leaves it: no report.md yet
    assert main(["report", parent.run_id, "--uri", fresh_uri]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "No report.md: the search stopped before it ended (MLflow status FAILED: interrupted); run the same search again to resume it" in text


def one_trial(uri: str, index: int = 0):
    """A tiny digits trial (16 hidden units, 1 epoch), its data and a parent run to log it under."""
    from tasks.data import load_dataset, split_dataset
    from tasks.preprocess import fit_preprocess
    from tasks.trial import make_spec

    base = load_config("conf/search_digits.yaml", ["model.hidden=[16]"], model=SearchExperiment).base_config()
    prepared = fit_preprocess(split_dataset(load_dataset(base.data, 0), 0.15, 0.15, 0), base.preprocess)
    parent = tracking.start_run(uri, "workers", "parent", {}, {})
    return make_spec(base.model_dump(mode="json"), "coarse", index, {"optim.lr": 3e-3}, 1, 1, "cpu"), prepared, parent


def exits_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # gone, and reaped
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("start_method", ["fork", "spawn"])  # spawn: macOS, Windows, or after CUDA started
def test_a_worker_process_trains_a_trial_into_the_parent_run(tmp_path, start_method):
    from tasks.trial import _trial_in_worker, worker_processes

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, prepared, parent = one_trial(uri)
    with worker_processes(1, prepared, start_method) as (pool, _):
        result = pool.submit(_trial_in_worker, spec, parent, None).result(timeout=120)
        worker = pool.submit(os.getpid).result(timeout=60)
    assert exits_within(worker, 60)  # not waited for on the way out, it ends on its own
    assert result.status == "finished" and result.val_acc > 0.5
    child = tracking.get_run(uri, result.run_id)
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert tracking.metric_history(uri, result.run_id, "val_acc") == [pytest.approx(result.val_acc)]


def test_leaving_the_worker_processes_early_ends_a_running_trial_as_failed_and_skips_queued_ones(tmp_path):
    import dataclasses

    from tasks.trial import _trial_in_worker, worker_processes

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, prepared, parent = one_trial(uri)
    long = dataclasses.replace(spec, config={**spec.config, "train": {**spec.config["train"], "epochs": 2000}})
    with pytest.raises(KeyboardInterrupt), worker_processes(1, prepared) as (pool, _):
        running, queued = pool.submit(_trial_in_worker, long, parent, None), pool.submit(_trial_in_worker, spec, parent, None)
        experiment = tracking.get_run(uri, parent.run_id).info.experiment_id
        while not tracking.find_runs(uri, experiment, {"mlflow.parentRunId": parent.run_id}):
            time.sleep(0.1)
        raise KeyboardInterrupt  # Ctrl-C in the flow's process, as a signal to it alone
    (child,) = tracking.find_runs(uri, experiment, {"mlflow.parentRunId": parent.run_id})
    assert child.info.status == "FAILED" and child.data.tags["babysit.failure"] == "interrupted"
    assert len(tracking.metric_history(uri, child.info.run_id, "val_acc")) < 2000  # it stopped at an epoch's end
    assert queued.cancelled() or isinstance(queued.exception(), KeyboardInterrupt)  # never trained: no second run
    assert isinstance(running.exception(), KeyboardInterrupt)


def test_worker_processes_leave_a_sigterm_to_the_flows_process_which_stops_them_between_epochs(tmp_path):
    import dataclasses
    import signal

    import psutil

    from tasks.trial import _trial_in_worker, worker_processes

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, prepared, parent = one_trial(uri)
    long = dataclasses.replace(spec, config={**spec.config, "train": {**spec.config["train"], "epochs": 2000}})
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(KeyboardInterrupt), worker_processes(1, prepared) as (pool, _):
        running = pool.submit(_trial_in_worker, long, parent, None)
        experiment = tracking.get_run(uri, parent.run_id).info.experiment_id
        while not tracking.find_runs(uri, experiment, {"mlflow.parentRunId": parent.run_id}):
            time.sleep(0.1)
        workers = [p for p in psutil.Process().children() if p.pid not in before]
        for worker in workers:  # as `timeout` or systemd signal the whole process group
            worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert workers and all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers) and not running.done()
        raise KeyboardInterrupt  # what the flow's process makes of its own SIGTERM
    (child,) = tracking.find_runs(uri, experiment, {"mlflow.parentRunId": parent.run_id})
    assert child.info.status == "FAILED" and child.data.tags["babysit.failure"] == "interrupted"


def test_leaving_the_stop_flag_early_ends_a_trial_training_in_a_thread_as_failed(tmp_path):
    import dataclasses
    import threading

    from tasks.trial import run_trial, stop_flag

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, prepared, parent = one_trial(uri)
    long = dataclasses.replace(spec, config={**spec.config, "train": {**spec.config["train"], "epochs": 2000}})
    ended: list[BaseException] = []

    def train(stop):
        try:
            run_trial(long, prepared, parent, stopped=stop.is_set)
        except BaseException as err:  # noqa: BLE001 - the test reads what ended the trial
            ended.append(err)

    experiment = tracking.get_run(uri, parent.run_id).info.experiment_id
    with pytest.raises(KeyboardInterrupt), stop_flag() as stop:
        thread = threading.Thread(target=train, args=(stop,))
        thread.start()
        while not tracking.find_runs(uri, experiment, {"mlflow.parentRunId": parent.run_id}):
            time.sleep(0.1)
        raise KeyboardInterrupt  # Ctrl-C in the flow's thread, with runner: threads
    thread.join(timeout=60)
    assert not thread.is_alive() and isinstance(ended[0], KeyboardInterrupt)
    (child,) = tracking.find_runs(uri, experiment, {"mlflow.parentRunId": parent.run_id})
    assert child.info.status == "FAILED" and child.data.tags["babysit.failure"] == "interrupted"
    assert len(tracking.metric_history(uri, child.info.run_id, "val_acc")) < 2000  # it stopped at an epoch's end


def test_forked_worker_processes_start_with_what_the_first_optimizer_imports():
    # a fresh interpreter: this one may have imported torch._dynamo already
    code = (
        "import sys\n"
        "from tasks.trial import worker_processes\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "with worker_processes(2, None, 'fork') as (pool, _):\n"
        "    print(all(pool.map(eval, [\"'torch._dynamo' in __import__('sys').modules\"] * 4)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"


def test_a_dead_worker_process_is_a_clear_error(tmp_path):
    import signal

    from babysit.errors import BabysitError
    from tasks.trial import trial_task, worker_processes

    spec, prepared, parent = one_trial(f"sqlite:///{tmp_path}/mlflow.db", index=3)
    with worker_processes(1, prepared) as (pool, _):
        worker_pid = pool.submit(os.getpid).result()
        os.kill(worker_pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
        with pytest.raises(BabysitError, match="coarse-003: a worker process of this search died"):
            trial_task.fn(spec, prepared, parent, pool=pool)


def test_diverged_trials_are_flagged_and_end_early(prefect_harness, fresh_uri):
    tracking_uri = fresh_uri
    summary, kids = small_search(
        fresh_uri,
        "optim.name=sgd",
        "search.space={optim.lr: 'loguniform(1e-2, 1e3)'}",
        "search.stages=[{name: coarse, trials: 6, epochs: 3}]",
        "search.final=null",
    )
    diverged = [k for k in kids if k.data.tags["babysit.status"] == "diverged"]
    assert diverged and all("diverged" in k.data.tags["babysit.flags"] for k in diverged)
    assert all(k.data.metrics["epochs_run"] < 3 for k in diverged)
    assert min(float(k.data.params["optim.lr"]) for k in diverged) > summary.best_params["optim.lr"]
    advice = tracking.read_text(tracking_uri, summary.parent_run_id, "report.md")
    assert "exploded" in advice and "optim.lr" in advice


def test_a_search_where_every_trial_diverges_is_a_clear_error_with_its_trials_logged(prefect_harness, fresh_uri):
    from babysit.errors import BabysitError

    with pytest.raises(BabysitError, match=r"none of its 3 trials finished with a score \(3 diverged, 0 failed\); lower optim.lr's range below"):
        small_search(fresh_uri, "optim.name=sgd", "search.space={optim.lr: 'loguniform(1e3, 1e4)'}",
                     "search.stages=[{name: coarse, trials: 3, epochs: 2}]", "search.final=null")
    client = tracking._client(fresh_uri)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()]) if r.data.tags.get("babysit.kind") == "search"]
    assert parent.info.status == "FAILED" and "none of its 3 trials" in parent.data.tags["babysit.failure"]
    trials = pd.read_csv(client.download_artifacts(parent.info.run_id, "trials.csv"))
    assert list(trials["status"]) == ["diverged"] * 3
    report = tracking.read_text(fresh_uri, parent.info.run_id, "report.md")
    assert "exploded" in report and "optim.lr: the last stage's range should move past its lower edge (every trial diverged" in report
    assert parent.data.tags["edge.optim.lr"] == "low" and parent.data.tags["babysit.flags"] == "edge:optim.lr=low"  # failed, the flag is still there


def test_a_tie_for_the_best_goes_to_the_latest_trial_in_the_search_its_report_and_its_ensemble(prefect_harness, fresh_uri):
    from flows.ensemble import top_trials

    # a rate far too low to learn in 1 epoch: every trial scores the same (chance)
    summary, kids = small_search(fresh_uri, "optim.name=sgd", "search.space={optim.lr: 'loguniform(1e-8, 1e-7)'}", "search.sampler=lhs",
                                 "search.stages=[{name: coarse, trials: 3, epochs: 1}, {name: fine, trials: 3, epochs: 1}]", "search.final=null")
    assert len({k.data.metrics["best_val_acc"] for k in kids}) == 1
    best = tracking.get_run(fresh_uri, summary.parent_run_id).data.tags["babysit.best_trial"]
    (best_run,) = [k for k in kids if k.data.tags["babysit.trial_key"] == best]
    assert (best_run.data.tags["babysit.stage"], best_run.data.tags["babysit.trial_index"]) == ("fine", "2")
    assert "(fine stage)" in tracking.read_text(fresh_uri, summary.parent_run_id, "report.md").split("best trial:")[1]
    assert top_trials(fresh_uri, summary.parent_run_id, 1)[0].data.tags["babysit.trial_key"] == best


def test_a_fields_edge_tag_is_the_side_its_range_moved_past_last():
    from flows.search import edge_tags, with_edge

    edges: list[str] = []
    for field, side in [("optim.lr", "high"), ("model.dropout", "low"), ("optim.lr", "low"), ("optim.lr", "high")]:  # stage by stage
        edges = with_edge(edges, field, side)
    assert edges == ["edge:model.dropout=low", "edge:optim.lr=low", "edge:optim.lr=high"]
    assert edge_tags(edges) == {"babysit.flags": ",".join(edges), "edge.model.dropout": "low", "edge.optim.lr": "high"}
    assert edge_tags([]) == {"babysit.flags": "none"}


def test_a_config_sampled_twice_in_a_stage_trains_once(prefect_harness, fresh_uri):
    summary, kids = small_search(fresh_uri, "search.space={model.activation: 'choice([relu, tanh])'}", "search.sampler=random",
                                 "search.stages=[{name: coarse, trials: 6, epochs: 1}]", "search.final=null")
    keys = [k.data.tags["babysit.trial_key"] for k in kids]
    assert len(keys) == len(set(keys)) == 2 and summary.trials_run == 2


def test_configs_that_differ_only_in_a_field_their_optimizer_does_not_read_train_once(prefect_harness, fresh_uri):
    # adam never reads momentum: 4 grid points (2 optimizers x 2 momenta), 3 distinct trainings
    summary, kids = small_search(fresh_uri, "search.space={optim.name: 'choice([adam, momentum])', optim.momentum: 'uniform(0.5, 0.99)'}",
                                 "search.sampler=grid", "search.stages=[{name: coarse, trials: 4, epochs: 1}]", "search.final=null")
    assert summary.trials_run == len(kids) == 3
    assert sorted(k.data.params["optim.name"] for k in kids) == ["adam", "momentum", "momentum"]
    assert summary.best_params["optim.name"] == "momentum" or "optim.momentum" not in summary.best_params  # what the best trial trained with


def test_searching_a_field_that_no_trial_reads_is_refused_at_load():
    with pytest.raises(BabysitError) as err:  # adam never reads momentum, and optim.name is not searched
        load_config("conf/search_digits.yaml", ["optim.name=adam", "search.space={optim.momentum: 'uniform(0.5, 0.99)'}"], model=SearchExperiment)
    assert "`optim.momentum` is read only when `optim.name` is momentum or nesterov" in str(err.value) and "'adam'" in str(err.value)
    with pytest.raises(BabysitError) as err:  # searched, but never to a value that reads it
        load_config("conf/search_digits.yaml", ["search.space={optim.gamma: 'uniform(0.1, 0.9)', optim.schedule: 'choice([constant, cosine])'}"], model=SearchExperiment)
    assert "searched over constant, cosine" in str(err.value)
    load_config("conf/search_digits.yaml", ["search.space={optim.gamma: 'uniform(0.1, 0.9)', optim.schedule: 'choice([constant, step])'}"], model=SearchExperiment)


def test_a_learning_rate_range_too_low_to_learn_moves_up(prefect_harness, fresh_uri):
    summary, kids = small_search(
        fresh_uri,
        "optim.name=sgd",
        "search.space={optim.lr: 'loguniform(1e-8, 1e-6)', model.dropout: 'uniform(0.0, 0.5)'}",
        "search.stages=[{name: coarse, trials: 4, epochs: 2}, {name: fine, trials: 2, epochs: 2}]",
        "search.final=null",
    )
    coarse = [k for k in kids if k.data.tags["babysit.stage"] == "coarse"]
    assert all("lr_too_low" in k.data.tags["babysit.flags"] for k in coarse)  # SGD at ≤ 1e-6: the loss barely moves
    assert "edge:optim.lr=high" in summary.edges
    fine = [float(k.data.params["optim.lr"]) for k in kids if k.data.tags["babysit.stage"] == "fine"]
    assert min(fine) >= max(float(k.data.params["optim.lr"]) for k in coarse) and max(fine) <= 1e-5
    assert summary.ranges["fine"]["model.dropout"] == summary.ranges["coarse"]["model.dropout"]  # chance-level scores narrow nothing
    advice = tracking.read_text(fresh_uri, summary.parent_run_id, "report.md")
    assert "lr_too_low in all 4 coarse trials" in advice and "learning-rate range is too low" in advice
    # still too slow at the last stage: nothing is left to move its range, so the advice says to move the file's
    assert "optim.lr: the last stage's range should move past its upper edge (" in advice and "raise its upper bound in the file" in advice


def test_the_log_says_why_a_range_moves_past_an_edge():
    from babysit.space import parse_dist
    from flows.search import edge_cause
    from tasks.trial import TrialResult

    lr = parse_dist("optim.lr", "loguniform(1e-5, 1e-1)")
    tree = load_config("conf/search_digits.yaml", model=SearchExperiment).base_config().model_dump(mode="json")

    def trial(value: float, acc: float | None) -> TrialResult:
        return TrialResult("key", "coarse", 0, {"optim.lr": value}, "finished" if acc is not None else "diverged", acc)

    assert edge_cause("optim.lr", "high", lr, [trial(0.09, 0.9), trial(1e-3, 0.5)], 0.1, tree) == "the best value, 0.09, sat at that edge"
    # moved up because the top trials barely learned: the best lr (a quarter of the way up) is named as such, not as an edge
    slow = edge_cause("optim.lr", "high", lr, [trial(1e-4, 0.2), trial(1e-3, 0.1)], 0.1, tree)
    assert slow.startswith("most of the best trials barely learned (lr_too_low), the best at 0.0001")
    assert edge_cause("optim.lr", "low", lr, [trial(0.05, None)], 0.1, tree).startswith("every trial diverged")
    fast = [trial(0.01, 0.6), trial(0.05, 0.4)]
    for result in fast:
        result.flags["lr_too_high"] = "training loss rose"
    assert edge_cause("optim.lr", "low", lr, fast, 0.1, tree) == "every trial that finished learned too fast (lr_too_high), the best at 0.01: the learning rate is too high"


def test_ensemble_of_the_top_trials_averages_their_probabilities(finished_search, tracking_uri):
    from flows.ensemble import config_from_params, ensemble_flow, ensemble_probabilities, top_trials

    members = top_trials(tracking_uri, finished_search.parent_run_id, 2)
    rebuilt = config_from_params(members[0].data.params)
    assert {k: str(v) for k, v in rebuilt.flat().items()} == members[0].data.params  # the config round-trips

    summary = ensemble_flow(search_run_id=finished_search.parent_run_id, top=2, epochs=2)
    assert summary.members == [m.info.run_id for m in members] and len(summary.member_test_acc) == 2
    run = tracking.get_run(tracking_uri, summary.run_id)
    assert run.data.tags["babysit.search_run_id"] == finished_search.parent_run_id
    assert run.data.metrics["ensemble_test_acc"] == pytest.approx(summary.ensemble_test_acc)
    assert summary.ensemble_test_acc > 0.5

    a, b = [[0.6, 0.4], [0.1, 0.9]], [[0.2, 0.8], [0.3, 0.7]]
    import numpy as np

    assert np.allclose(ensemble_probabilities([np.array(a), np.array(b)]), [[0.4, 0.6], [0.2, 0.8]])


def test_an_ensemble_takes_a_config_that_two_stages_trained_once(prefect_harness, fresh_uri):
    from babysit.errors import BabysitError
    from flows.ensemble import top_trials

    # the fine stage narrows to the better activation and trains it again, as the coarse stage did: same config, same model
    summary, kids = small_search(fresh_uri, "search.space={model.activation: 'choice([relu, tanh])'}", "search.sampler=grid", "search.top_k=1",
                                 "search.stages=[{name: coarse, trials: 2, epochs: 1}, {name: fine, trials: 2, epochs: 1}]", "search.final=null")
    assert len(kids) == 3
    members = top_trials(fresh_uri, summary.parent_run_id, 2)
    assert {m.data.params["model.activation"] for m in members} == {"relu", "tanh"}
    with pytest.raises(BabysitError, match="has 2 finished trials with distinct configs; --top 3 needs at least 3"):
        top_trials(fresh_uri, summary.parent_run_id, 3)


def test_a_trials_config_comes_back_from_its_mlflow_params_with_text_that_looks_like_a_number():
    from flows.ensemble import config_from_params

    cfg = load_config("conf/digits_mlp.yaml", ['name="2024"', 'tracking.experiment="007"', "model.hidden=[64, 32]", "train.early_stopping_patience=null"])
    assert config_from_params({key: str(value) for key, value in cfg.flat().items()}) == cfg  # as MLflow stores params: text


def test_ensemble_refuses_a_run_that_is_not_a_search(finished_search, tracking_uri):
    from babysit.errors import BabysitError
    from flows.ensemble import top_trials

    child = children(tracking_uri, finished_search.parent_run_id)[0]
    with pytest.raises(BabysitError, match="not a babysit search"):
        top_trials(tracking_uri, child.info.run_id, 2)
    with pytest.raises(BabysitError, match="no MLflow run"):
        top_trials(tracking_uri, "0" * 32, 2)


def test_a_search_can_start_with_the_tiny_subset_sanity_check(prefect_harness, fresh_uri):
    from babysit.errors import BabysitError

    small = SMALL[:2] + ["search.stages=[{name: coarse, trials: 2, epochs: 1}]", "search.final=null", "search.sanity_check=true"]
    summary = search_flow(config="conf/search_digits.yaml", overrides=small)
    assert tracking.get_run(fresh_uri, summary.parent_run_id).data.tags["babysit.sanity_check"].startswith("passed")
    # a searched lr is checked at the middle of its range (here ~3e-8: it cannot fit anything), not at the base lr
    with pytest.raises(BabysitError, match=r"optim.lr 3.16e-08, the middle of its searched range\) cannot overfit a tiny subset"):
        search_flow(config="conf/search_digits.yaml", overrides=[*small, "search.space.optim.lr=loguniform(1e-8, 1e-7)", "search.resume=false", "name=hopeless"])


def test_a_search_of_optimizers_at_their_default_rates_names_the_rate_the_best_trained_at(fresh_uri, prefect_harness):
    # QA: the parent run listed optim.lr 0.1 (the base sgd's default) while the best trial, rmsprop, trained at 1e-3
    summary, _ = small_search(fresh_uri, "optim.name=sgd", "optim.lr=null", "search.final=null", "search.sampler=grid",
                              "search.stages=[{name: coarse, trials: 2, epochs: 1}]", "search.space={optim.name: 'choice([sgd, rmsprop])'}")
    parent = tracking.get_run(fresh_uri, summary.parent_run_id).data
    assert parent.params["optim.lr"] == "unset: the default of each trial's optim.name"
    best = summary.best_params["optim.name"]
    assert summary.best_params["optim.lr"] == DEFAULT_LR[best] and parent.tags["best.optim.lr"] == str(DEFAULT_LR[best])


def test_an_unset_lr_follows_each_trials_optimizer():
    from flows.search import trial_base
    from tasks.trial import make_spec

    def trial_lrs(*overrides):
        exp = load_config("conf/search_digits.yaml", [*overrides, "search.space={optim.name: 'choice([sgd, momentum, adam])'}"], model=SearchExperiment)
        base = trial_base(exp)
        return {name: make_spec(base, "coarse", 0, {"optim.name": name}, 1, None, None).config["optim"]["lr"] for name in ("sgd", "momentum", "adam")}

    assert trial_lrs("optim.lr=null") == {name: DEFAULT_LR[name] for name in ("sgd", "momentum", "adam")}  # each optimizer at its own default
    assert trial_lrs("optim.lr=0.002") == {"sgd": 0.002, "momentum": 0.002, "adam": 0.002}  # a given lr holds for every trial


def test_the_search_figure_plots_each_field_by_stage_with_one_legend():
    from matplotlib.colors import to_hex

    from babysit import plots

    trials = pd.DataFrame({"stage": ["coarse"] * 4 + ["fine"] * 2, "val_acc": [0.2, 0.5, 0.9, None, 0.95, 0.93],
                           "param.optim.lr": [1e-4, 1e-3, 1e-2, 1e-1, 5e-3, 8e-3], "param.model.dropout": [0.1, 0.2, 0.3, 0.4, 0.25, 0.3],
                           "param.model.batchnorm": [True, False, True, False, True, True]})
    figure = plots.search_overview(trials, ["optim.lr", "model.dropout", "model.batchnorm"])
    try:
        lr, dropout, batchnorm, progress = figure.axes[:4]
        assert (lr.get_xscale(), dropout.get_xscale()) == ("log", "linear")  # a log axis only for a range over more than 20x
        assert [axis.get_legend() is not None for axis in (lr, dropout, batchnorm, progress)] == [True, False, False, False]
        assert [text.get_text() for text in lr.get_legend().get_texts()] == ["coarse", "fine"]
        colours = [[to_hex(points.get_facecolor()[0]) for points in axis.collections] for axis in (lr, dropout, batchnorm)]
        assert colours[0] == colours[1] == colours[2] and colours[0][0] != colours[0][1]  # the one legend holds for every panel
        figure.canvas.draw()
        assert "1e" in " ".join(label.get_text() for label in lr.get_xticklabels())  # plain text, not mathtext
        assert list(progress.get_lines()[0].get_ydata()) == [0.2, 0.5, 0.9, 0.9, 0.95, 0.95]  # best so far; a failed trial counts as 0
    finally:
        plots.close(figure)
    trials["param.model.dropout"] = [0.01, 0.2, 0.3, 0.4, 0.25, 0.3]  # a uniform range sampled near 0: 40x
    for linear, scale in (([], "log"), (["model.dropout"], "linear")):
        figure = plots.search_overview(trials, ["optim.lr", "model.dropout"], linear=linear)
        try:
            assert [axis.get_xscale() for axis in figure.axes[:2]] == ["log", scale]  # a field sampled on a linear scale keeps a linear axis
        finally:
            plots.close(figure)


def test_the_search_figure_draws_a_stage_whose_every_trial_diverged_beside_a_choice():
    from babysit import plots

    # a coarse stage with no score at all, then a fine one: the choice's panel crashed the figure, after the
    # whole search had run, and a rerun crashed again (QA)
    trials = pd.DataFrame({"stage": ["coarse"] * 4 + ["fine"] * 4, "val_acc": [None] * 4 + [0.5, 0.6, 0.7, 0.4],
                           "param.optim.lr": [100.0, 200.0, 300.0, 400.0, 30.0, 40.0, 50.0, 60.0], "param.model.activation": ["relu", "tanh"] * 4})
    figure = plots.search_overview(trials, ["optim.lr", "model.activation"])
    try:
        figure.canvas.draw()
        assert [len(points.get_offsets()) for points in figure.axes[1].collections] == [0, 4]  # the scored trials only
        assert {label.get_text() for label in figure.axes[1].get_xticklabels()} == {"relu", "tanh"}
    finally:
        plots.close(figure)


def test_the_search_figure_leaves_out_of_a_fields_panel_the_trials_that_did_not_train_with_it():
    from babysit import plots

    # QA: sgd and adam trials placed at momentum values they never read, looking like evidence against them
    trials = pd.DataFrame({"stage": "coarse", "val_acc": [0.9, 0.3, 0.8, 0.95], "param.optim.name": ["momentum", "sgd", "momentum", "adam"],
                           "param.optim.momentum": [0.9, 0.81, 0.6, 0.52], "read.optim.name": True, "read.optim.momentum": [True, False, True, False]})
    figure = plots.search_overview(trials, ["optim.name", "optim.momentum"])
    try:
        names, momentum = figure.axes[:2]
        assert sorted(momentum.collections[0].get_offsets()[:, 0]) == [0.6, 0.9] and len(names.collections[0].get_offsets()) == 4
    finally:
        plots.close(figure)


def test_the_search_figure_plots_a_null_option_of_a_choice_as_its_own_category():
    import numpy as np

    from babysit import plots

    # a choice of [null, 1]: the trials table holds NaN and 1.0
    trials = pd.DataFrame({"stage": "coarse", "val_acc": [0.9, 0.95, 0.8], "param.train.early_stopping_patience": [float("nan"), float("nan"), 1.0]})
    figure = plots.search_overview(trials, ["train.early_stopping_patience"])
    try:
        panel = figure.axes[0]
        assert sum(int(np.isfinite(points.get_offsets()).all(axis=1).sum()) for points in panel.collections) == 3  # the null trials too
        figure.canvas.draw()
        assert {label.get_text() for label in panel.get_xticklabels()} == {"null", "1"}
    finally:
        plots.close(figure)


def test_the_search_figure_drawn_row_by_row_stacks_into_one_picture():
    from babysit import plots
    from flows.search import figure_row, rows_for_workers

    trials = pd.DataFrame({"stage": ["coarse"] * 3, "val_acc": [0.2, 0.5, 0.9], "param.optim.lr": [1e-4, 1e-3, 1e-2],
                           "param.model.dropout": [0.1, 0.2, 0.3], "param.model.batchnorm": [True, False, True], "param.model.init": ["he", "he", "xavier"]})
    fields = ["optim.lr", "model.dropout", "model.batchnorm", "model.init"]
    assert plots.PANELS_PER_ROW == 2 and plots.overview_rows(fields) == 3 and plots.overview_rows(fields[:1]) == 1
    first, last = (plots.search_overview(trials, fields, row) for row in (0, 2))
    try:
        assert [ax.get_xlabel() for ax in first.axes if ax.get_visible()] == ["optim.lr", "model.dropout"]
        assert [ax.get_xlabel() for ax in last.axes if ax.get_visible()] == ["trials"]
        assert first.axes[0].get_legend() is not None and last.axes[0].get_legend() is None
    finally:
        plots.close(first), plots.close(last)
    rows = [figure_row(trials, fields, row, []) for row in range(3)]
    assert rows[0].shape == rows[1].shape == rows[2].shape == (350, 900, 4)  # same width: they stack into search.png
    # idle worker processes share the rows with the flow's process, which has its other writes to do (about a row's worth)
    assert [rows_for_workers(3, 2), rows_for_workers(3, 1), rows_for_workers(5, 1), rows_for_workers(1, 1), rows_for_workers(3, 0)] == [3, 2, 3, 1, 0]


def test_trials_share_the_gpus_round_robin_and_each_worker_process_keeps_to_one(monkeypatch, tmp_path):
    import dataclasses

    import torch

    from tasks.trial import gpu_for, on_slot, worker_processes

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # no GPU here: only the assignment is checked
    assert [gpu_for("auto", slot) for slot in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert gpu_for("cuda", 4) == "cuda:1" and gpu_for("cpu", 1) is None and gpu_for("cuda:2", 0) is None  # a GPU the config names stays
    spec, _, _ = one_trial(f"sqlite:///{tmp_path}/mlflow.db")
    auto = dataclasses.replace(spec, config={**spec.config, "train": {**spec.config["train"], "device": "auto"}})
    assert on_slot(auto, 5).config["train"]["device"] == "cuda:2" and on_slot(auto, 5).key == auto.key  # same trial, other hardware
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert on_slot(auto, 5) is auto
    with worker_processes(2, None) as (pool, _):  # each worker process has a number of its own
        slots = set(pool.map(worker_slot, [0.05] * 20))
    assert slots == {0, 1}


def worker_slot(pause: float) -> int:
    from tasks.trial import _WORKER

    time.sleep(pause)  # long enough that both workers take some
    return _WORKER["slot"]


def test_a_top_k_as_large_as_a_stage_and_a_warm_start_with_nothing_to_start_from_are_said(prefect_harness, fresh_uri, caplog):
    flow_log = logging.getLogger("prefect.flow_runs")  # Prefect's loggers do not propagate to caplog's
    flow_log.addHandler(caplog.handler)
    try:
        search_flow(config="conf/search_digits.yaml", overrides=[
            "model.hidden=[16]", "search.workers=1", "search.top_k=3", "search.warm_start=latest", "search.final=null", "search.sanity_check=false",
            "search.stages=[{name: coarse, trials: 3, epochs: 1}, {name: fine, trials: 2, epochs: 1}]"])
    finally:
        flow_log.removeHandler(caplog.handler)
    text = " ".join(caplog.text.split())
    assert "search.top_k 3: stage coarse has 3 trials, so every trial counts as a top one" in text
    assert "stage fine has" not in text  # the last stage narrows nothing
    assert "search.warm_start latest: no finished run of search search_digits yet" in text


def test_trial_threads_share_the_cores_out_among_the_workers_that_train_here():
    from flows.search import trial_threads
    from tasks.trial import forks_workers

    def threads(*overrides):
        return trial_threads(load_config("conf/search_digits.yaml", list(overrides), model=SearchExperiment))

    cores = os.cpu_count() or 1
    assert threads("search.runner=threads", "search.workers=1") == cores
    assert threads("search.runner=threads", f"search.workers={2 * cores}") == 1  # never zero
    assert threads("search.runner=processes", "search.workers=2") == (1 if forks_workers() else max(1, cores // 2))
    assert threads("search.runner=dask", "search.dask_address=tcp://10.0.0.5:8786") is None  # another machine's cores


def test_a_choice_of_numbers_is_said_to_search_those_values_only():
    from flows.search import numeric_choice_warnings

    def warnings(space):
        return numeric_choice_warnings(load_config("conf/search_digits.yaml", [f"search.space={space}"], model=SearchExperiment))

    said = warnings("{optim.lr: 'choice([1e-6, 1e-5])', model.activation: 'choice([relu, tanh])', model.batchnorm: 'choice([true, false])'}")
    assert len(said) == 1 and said[0].startswith("search.space `optim.lr` ~ choice([1.0e-06, 1.0e-05]): a choice of numbers searches those values only")
    assert warnings("{optim.lr: 'loguniform(1e-4, 1e-1)', train.batch_size: 'choice([64])'}") == []  # one value: nothing to narrow


def test_a_final_retrain_shorter_than_a_stage_is_said_to_test_a_weaker_model():
    from flows.search import final_warnings

    def warnings(*overrides):
        return final_warnings(load_config("conf/search_digits.yaml", list(overrides), model=SearchExperiment))

    said = warnings("search.final.epochs=3")  # the fine stage trains 8
    assert len(said) == 1 and said[0].startswith("search.final.epochs 3: stage fine trains its trials 8 epochs") and "at least 8" in said[0]
    assert warnings() == [] and warnings("search.final.epochs=8") == [] and warnings("search.final=null") == []


def test_trial_keys_and_search_hashes_stay_those_an_earlier_babysit_gave():
    # a config field added with a default (flags.overfit_loss_rise) changed every key: no search resumed (review).
    # A new field belongs in babysit.config.ADDED_LATER; these values were computed by babysit before that field.
    from flows.search import search_hash
    from tasks.trial import make_spec

    exp = SearchExperiment.model_validate({"name": "pinned", "seed": 3, "model": {"hidden": [32]}, "optim": {"name": "adam", "lr": 1e-3},
                                           "search": {"space": {"optim.lr": "loguniform(1e-4, 1e-1)", "model.dropout": "uniform(0.0, 0.5)"},
                                                      "stages": [{"name": "coarse", "trials": 4, "epochs": 2}]}})
    spec = make_spec(exp.base_config().model_dump(mode="json"), "coarse", 0, {"optim.lr": 0.01, "model.dropout": 0.25}, 2, 1, None, "v1")
    assert (spec.key, search_hash(exp), search_hash(exp, "v1")) == ("90bd909dbfc07074", "ae1b6924ea5d1c49", "547388b3120d3632")
    tighter = SearchExperiment.model_validate({**exp.model_dump(mode="json"), "flags": {**exp.flags.model_dump(), "overfit_loss_rise": 0.2}})
    assert search_hash(tighter) != search_hash(exp)  # set otherwise, it is part of the search's definition


def test_the_sanity_check_starts_from_the_transferred_weights(tmp_path, fresh_uri):
    """With model.init_from the tiny-subset check trains what the trials start from: the source's
    hidden layers (and a new head), which fit the subset sooner than random weights do."""
    from flows.search import check_before_searching, trial_base
    from tasks.train import train_and_test

    base = ["model.hidden=[32]", "train.threads=1", "train.diagnostics=false", "search.space.optim.lr=loguniform(1e-4, 1e-2)"]
    cfg = load_config("conf/digits_mlp.yaml", base[:3] + ["train.epochs=15"])
    prepared = fit_preprocess(load_data_task.fn(cfg.data, cfg.seed), cfg.preprocess)
    torch.save(train_and_test(cfg, prepared, test=False)[1].state_dict(), tmp_path / "trained.pt")
    epochs = {}
    for init_from in (None, tmp_path / "trained.pt"):
        exp = load_config("conf/search_digits.yaml", base + ([f"model.init_from={init_from}"] if init_from else []), model=SearchExperiment)
        parent = tracking.start_run(fresh_uri, "sanity", "parent", {}, {})
        check_before_searching(exp.name, trial_base(exp), {"optim.lr": parse_dist("optim.lr", exp.search.space["optim.lr"])}, prepared, parent)
        said = tracking.get_run(fresh_uri, parent.run_id).data.tags["babysit.sanity_check"]
        assert said.startswith(f"passed, from model.init_from {init_from}:" if init_from else "passed: ")
        epochs[init_from is not None] = int(said.split(" epochs (")[0].rsplit(" ", 1)[1])
    assert epochs[True] < epochs[False], epochs


def test_shared_pruning_has_room_for_the_fine_tuning_epochs(tmp_path):
    # worker processes' reports had room for the stage's epochs only: fine-tuning epochs, numbered after
    # them, were never pruned with runner processes, and were with threads (QA)
    from flows.search import most_epochs, trial_epochs
    from tasks.trial import make_spec

    torch.save({}, tmp_path / "source.pt")
    stages = "search.stages=[{name: coarse, trials: 4, epochs: 2}, {name: fine, trials: 2, epochs: 5}]"
    transfer = [stages, f"model.init_from={tmp_path / 'source.pt'}", "model.freeze=all", "train.unfreeze_epochs=3"]
    assert most_epochs(load_config("conf/search_digits.yaml", [stages], model=SearchExperiment)) == 5
    exp = load_config("conf/search_digits.yaml", transfer, model=SearchExperiment)
    assert most_epochs(exp) == 5 + 3
    assert trial_epochs(make_spec(exp.base_config().model_dump(mode="json"), "fine", 0, {}, 5, None, None)) == 8
    searched = load_config("conf/search_digits.yaml", [*transfer, "search.space.train.unfreeze_epochs=int(1, 6)"], model=SearchExperiment)
    assert most_epochs(searched) == 5 + 6
    chosen = load_config("conf/search_digits.yaml", [*transfer, "search.space.train.unfreeze_epochs=choice([0, 4])"], model=SearchExperiment)
    assert most_epochs(chosen) == 5 + 4


def test_a_trial_pruned_in_a_newer_run_does_not_hide_its_full_run_in_an_older_one(fresh_uri):
    # newest first, the pruned copy took the key and was then dropped: the full run was trained again (QA)
    from flows.search import finished_trials

    def parent_with(status: str) -> str:
        parent = tracking.start_run(fresh_uri, "reuse", "parent", {}, {})
        child = tracking.start_run(fresh_uri, "reuse", "coarse-000", {}, {"babysit.trial_key": "K", "babysit.status": status}, parent=parent)
        tracking.end_run(child)
        return parent.run_id, child.run_id

    (older, full), (newer, pruned) = parent_with("finished"), parent_with("pruned")
    experiment_id = tracking.open_store(fresh_uri, "reuse")
    assert finished_trials(fresh_uri, experiment_id, [newer, older])["K"].info.run_id == pruned  # a resumed run's own: kept
    assert finished_trials(fresh_uri, experiment_id, [newer, older], pruned=False)["K"].info.run_id == full


def test_the_last_stages_edge_is_not_reported_when_the_searchs_best_trial_lies_inside_its_range():
    # the fine stage's best (0.889) sat at its low lr edge, the search's best (0.956, coarse) at 0.027 mid-range:
    # report.md said to move the lr range down while the final retrained a rate 18x higher (QA)
    from flows.search import outranked_edge
    from tasks.trial import TrialResult

    lr = parse_dist("optim.lr", "loguniform(0.00116, 0.0537)")
    fine = [TrialResult("a", "fine", 0, {"optim.lr": 0.0012}, "finished", 0.889), TrialResult("b", "fine", 1, {"optim.lr": 0.02}, "finished", 0.85)]
    coarse_best = TrialResult("c", "coarse", 2, {"optim.lr": 0.0269}, "finished", 0.956)
    base = load_config("conf/search_digits.yaml", [], model=SearchExperiment).base_config().model_dump(mode="json")
    assert outranked_edge("optim.lr", "low", lr, fine, coarse_best, 0.1, base)
    assert not outranked_edge("optim.lr", "low", lr, fine, fine[0], 0.1, base)  # the search's best is the stage's own: its edge stands
    below = TrialResult("d", "coarse", 3, {"optim.lr": 0.0005}, "finished", 0.956)
    assert not outranked_edge("optim.lr", "low", lr, fine, below, 0.1, base)  # the search's best lies past that edge: it stands too
    assert not outranked_edge("optim.lr", "low", lr, fine, None, 0.1, base)


def test_a_trial_is_pruned_on_its_best_epoch_so_far_not_its_latest(tmp_path):
    # QA: a fine trial tied for the stage's best was pruned for one noisy epoch below the median
    import dataclasses

    from babysit.pruning import Pruner
    from tasks.trial import run_trial

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, prepared, parent = one_trial(uri)
    noisy = dataclasses.replace(spec, params={"optim.lr": 0.1}, config={**spec.config, "optim": {**spec.config["optim"], "lr": 0.1},
                                                                       "train": {**spec.config["train"], "epochs": 8}})
    alone = run_trial(noisy, prepared, parent)
    history = tracking.metric_history(uri, alone.run_id, "val_acc")
    dips = [e for e in range(1, len(history)) if history[e] < max(history[:e])]
    assert alone.status == "finished" and dips, history  # the lr is high enough that validation accuracy does not only rise
    dip = dips[0]
    pruner = Pruner("median", warmup=1)
    for _ in range(2):  # two stage-mates: far behind before the dip, between the trial's dip and its best at it
        pruner.replay([0.0] * dip + [(history[dip] + max(history[:dip])) / 2])
    judged = run_trial(dataclasses.replace(noisy, index=1), prepared, parent, pruner)
    assert judged.status == "finished" and judged.val_acc == alone.val_acc, judged.reason


def test_the_best_trial_is_named_by_the_values_it_trained_with(fresh_uri, prefect_harness):
    # QA: Adam's best trial was reported (report.md, the terminal, best.* tags) with the momentum it never read
    summary, _ = small_search(fresh_uri, "optim.lr=1e-3", "search.final=null", "search.sampler=grid", "search.stages=[{name: coarse, trials: 4, epochs: 2}]",
                              "search.space={optim.name: 'choice([adam, momentum])', optim.momentum: 'uniform(0.5, 0.6)'}")
    assert summary.best_params["optim.name"] == "adam", summary.best_params  # momentum SGD at 1e-3 barely moves in 2 epochs
    tags = tracking.get_run(fresh_uri, summary.parent_run_id).data.tags
    assert tags["best.optim.name"] == "adam" and "best.optim.momentum" not in tags
    best_line = next(line for line in summary.advice.splitlines() if "best trial" in line)
    assert "optim.name = adam" in best_line and "momentum" not in best_line
