"""Search spaces, samplers, narrowing and edges, pruning: pure functions on synthetic objectives."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

from babysit.config import SearchExperiment, load_config
from babysit.errors import BabysitError
from babysit.pruning import Pruner, SharedReports
from babysit.space import Dist, Narrowing, edge_band, edge_side, grid_shortfall, inside_declared, narrow, parse_dist, sample, top_count


def space_of(**specs):
    return {field.replace("__", "."): parse_dist(field, spec) for field, spec in specs.items()}


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("loguniform(1e-2, 1e-4)", "low must be below high"),
        ("loguniform(0, 1)", "0 < low"),
        ("uniform(1, 1)", "low must be below high"),
        ("normal(0, 1)", "expected loguniform"),
        ("uniform(a, b)", "two numbers"),
        ("int(1.5, 4)", "whole-number"),
        (0.001, "expected loguniform"),
    ],
)
def test_bad_distributions_are_refused(spec, problem):
    with pytest.raises(ValueError, match=problem):
        parse_dist("optim.lr", spec)


def write_search(tmp_path, space: str):
    path = tmp_path / "search.yaml"
    path.write_text(f"name: s\nsearch:\n  space:\n{space}\n  stages:\n    - {{name: coarse, trials: 2, epochs: 1}}\n")
    return path


@pytest.mark.parametrize(
    "space, named",
    [
        ("    optim.lrr: loguniform(1e-4, 1e-1)", "optim.lrr"),
        ("    optim.lr: choice([fast, slow])", "optim.lr"),
        ("    model.init: uniform(0, 1)", "model.init"),
        ("    model.dropout: uniform(0.1, 1.5)", "model.dropout"),
        ("    optim.lr: loguniform(-1, 1)", "optim.lr"),
        ("    optim.lrr: loguniform(1e-4, 1e-1)", "expected one of optim's fields: name, lr,"),
        ("    model: choice([a, b])", "`model` is a section"),
        ("    model.hidden.0: int(8, 64)", "`model.hidden` is a value"),
        # set once for the whole search: searched, they would be logged per trial and change nothing
        ("    preprocess.method: choice([standardize, pca])", "`preprocess.method` cannot be searched: a search preprocesses the data once"),
        ("    data.val_fraction: uniform(0.1, 0.3)", "`data.val_fraction` cannot be searched"),
        ("    train.epochs: int(2, 8)", "each stage sets its trials' epochs"),
        ("    tracking.experiment: choice([a, b])", "`tracking.experiment` cannot be searched"),
        ("    flags.overfit_gap: uniform(0.05, 0.2)", "`flags.overfit_gap` cannot be searched"),
        ("    train.batch_size: uniform(8, 64)", "train.batch_size takes whole numbers: use int(8, 64)"),
        ("    train.batch_size: loguniform(8, 256)", "use int(8, 256)"),
        # bounds whose third (the old probe) is whole: 16 + 48/3 = 32, 1 + 999/3 = 334, 0 + 3/3 = 1
        ("    train.batch_size: uniform(16, 64)", "use int(16, 64)"),
        ("    train.batch_size: loguniform(1, 1000)", "use int(1, 1000)"),
        ("    optim.warmup_epochs: uniform(0, 3)", "use int(0, 3)"),
        ("    optim.lr: loguniform(1e-4, .inf)", "bounds must be finite"),
        ("    optim.lr: loguniform(1e-4, 1e-1", "a ')' is missing"),
    ],
)
def test_invalid_search_files_fail_at_load_naming_the_field(tmp_path, space, named):
    path = write_search(tmp_path, space)
    with pytest.raises(BabysitError) as err:
        load_config(path, model=SearchExperiment)
    assert str(path) in str(err.value) and named in str(err.value) and "(top level)" not in str(err.value)


def test_a_nested_section_in_the_space_says_to_write_the_field_dotted():
    with pytest.raises(BabysitError, match=r"names each field in full, with dots, not as a nested section: `optim.lr: ...`"):
        load_config("conf/search_digits.yaml", ["search.space={optim: {lr: 'loguniform(1e-4, 1e-1)'}}"], model=SearchExperiment)


@pytest.mark.parametrize("item", ["search.space={optim.lr: choice([1e-3, 1e-2])}", "search.space={optim.lr: loguniform(1e-4, 1e-1)}"])
def test_an_unquoted_distribution_in_a_flow_mapping_says_to_quote_it(item):
    # YAML cuts a flow mapping at commas: one fails to parse, the other parses into 'loguniform(1e-4' and '1e-1)'
    with pytest.raises(BabysitError, match=r"quote a distribution, e.g. \{optim.lr: 'loguniform\(1e-4, 1e-1\)'\}"):
        load_config("conf/search_digits.yaml", [item], model=SearchExperiment)
    assert load_config("conf/search_digits.yaml", ["search.space={optim.lr: 'loguniform(1e-4, 1e-1)'}"], model=SearchExperiment).search.space


@pytest.mark.parametrize("stages, problem", [
    ("[{name: coarse 1, trials: 2, epochs: 1}]", "use letters, digits, - and _ (got 'coarse 1')"),
    ("[{name: a, trials: 2, epochs: 1}, {name: a, trials: 2, epochs: 2}]", "stage names must differ"),
    ("[{name: final, trials: 2, epochs: 1}]", "from 'final'"),
])
def test_stage_names_are_distinct_and_fit_run_names_tags_and_artifact_keys(stages, problem):
    with pytest.raises(BabysitError, match=re.escape(problem)):
        load_config("conf/search_digits.yaml", [f"search.stages={stages}"], model=SearchExperiment)


def test_set_reaches_one_field_of_the_search_space():
    exp = load_config("conf/search_digits.yaml", ["search.space.optim.lr=loguniform(1e-3, 1e-1)"], model=SearchExperiment)
    assert exp.search.space["optim.lr"] == "loguniform(1e-3, 1e-1)"
    assert exp.search.space.keys() == load_config("conf/search_digits.yaml", model=SearchExperiment).search.space.keys()


def test_a_training_file_given_to_search_says_what_a_search_file_needs():
    with pytest.raises(BabysitError, match=r"conf/digits_mlp.yaml: invalid config: no `search` section: .*conf/search_digits.yaml.*`babysit train`"):
        load_config("conf/digits_mlp.yaml", model=SearchExperiment)


@pytest.mark.parametrize("spec", ["choice([[32], [64, 64]])", "choice([null, 2])", "choice([false, true])", "choice([sgd, adam])", "loguniform(0.001, 0.1)"])
def test_a_described_range_reads_back_as_written(spec):  # range tags feed warm starts, and users paste them into files
    assert parse_dist("f", spec).describe() == spec and parse_dist("f", parse_dist("f", spec).describe()) == parse_dist("f", spec)


def test_shipped_search_config_loads():
    exp = load_config("conf/search_digits.yaml", model=SearchExperiment)
    assert exp.search.stages[0].name == "coarse" and exp.base_config().data.source == "digits"


def test_loguniform_random_samples_spread_evenly_over_decades():
    space = space_of(lr="loguniform(1e-5, 1e-1)")
    values = np.array([p["lr"] for p in sample(space, 4000, "random", seed=0)])
    assert values.min() >= 1e-5 and values.max() <= 1e-1
    per_decade = np.histogram(np.log10(values), bins=4, range=(-5, -1))[0] / len(values)
    assert np.allclose(per_decade, 0.25, atol=0.03)  # log-uniform: a quarter of the draws in each decade


@pytest.mark.parametrize("sampler", ["random", "sobol", "lhs"])
def test_samplers_stay_in_range_and_are_seeded(sampler):
    space = space_of(lr="loguniform(1e-4, 1e-1)", d="uniform(0, 0.5)", b="int(16, 128)", init="choice([he, xavier])")
    points = sample(space, 16, sampler, seed=3)
    assert points == sample(space, 16, sampler, seed=3) and points != sample(space, 16, sampler, seed=4)
    for p in points:
        assert 1e-4 <= p["lr"] <= 1e-1 and 0 <= p["d"] <= 0.5 and 16 <= p["b"] <= 128 and isinstance(p["b"], int)
        assert p["init"] in ("he", "xavier")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stage of 6 trials: no raw library warning in the user's terminal
        assert len(sample(space, 6, sampler, seed=3)) == 6


def test_grid_is_a_full_grid_within_budget():
    space = space_of(lr="loguniform(1e-4, 1e-0)", init="choice([he, xavier])")
    points = sample(space, 20, "grid", seed=0)
    lrs = sorted({p["lr"] for p in points})
    assert len(points) == 20 and len(lrs) == 10
    assert np.allclose(np.diff(np.log10(lrs)), 0.4)  # evenly spaced cell centres in log space
    assert {p["init"] for p in points} == {"he", "xavier"}


def test_grid_says_what_its_budget_leaves_out():
    two_numeric = space_of(lr="loguniform(1e-4, 1e-0)", dropout="uniform(0, 0.5)", init="choice([he, xavier])")
    assert grid_shortfall(two_numeric, 18) is None  # 2 choices × 3 × 3 levels: all 18 run
    assert len(sample(two_numeric, 20, "grid", seed=0)) == 18
    assert re.search(r"2 choice combination\(s\) × 3 level\(s\) .* is 18 points: 2 of the 20 trials are not run", grid_shortfall(two_numeric, 20))
    assert "(1 level: the middle of each range)" in grid_shortfall(two_numeric, 3)
    many_choices = space_of(lr="loguniform(1e-4, 1e-0)", act="choice([relu, tanh, elu])", init="choice([he, xavier])")
    assert len(sample(many_choices, 4, "grid", seed=0)) == 4
    said = grid_shortfall(many_choices, 4)
    assert "6 combinations, more than the 4 trials: only the first 4 run, with every numeric field at the middle" in said
    only_choices = space_of(act="choice([relu, tanh])", init="choice([he])")  # e.g. a stage after narrowing
    assert grid_shortfall(only_choices, 4) == "the choices make 2 combination(s), all of which run: 2 of the 4 trials would repeat one, and are not run"


def trials_for(points, objective, diverged=lambda p: False):
    return [{"params": p, "score": None if diverged(p) else objective(p), "diverged": diverged(p)} for p in points]


def test_a_grid_whose_best_sits_at_its_outermost_level_moves_the_range():
    # 9 grid trials, 3 levels per field at 1/6, 1/2 and 5/6 of each range: none within 10% of a bound
    space = space_of(batch="int(200, 256)", decay="loguniform(1e-6, 1e-4)")
    points = sample(space, 9, "grid", seed=0)
    trials = trials_for(points, lambda p: -p["batch"] - abs(math.log10(p["decay"]) + 5))  # smaller batches are better, decay best mid-range
    assert narrow(space, trials, Narrowing(top_k=2))[1] == {}  # the 10% band: no grid point is ever in it
    band = edge_band("grid", space, 9, 0.1)
    assert band == pytest.approx(1 / 6) and edge_band("random", space, 9, 0.1) == 0.1 and edge_band("grid", space, 4, 0.1) == 0.1  # 2 levels: no inside
    new, edges = narrow(space, trials, Narrowing(top_k=2, edge=band))
    assert edges == {"batch": "low"} and new["batch"].low < 200


def test_a_field_narrows_only_on_the_trials_that_read_it():
    from babysit.config import reads_field

    space = space_of(optim__name="choice([adam, momentum])", optim__momentum="uniform(0.5, 0.99)")
    spread = np.linspace(0.52, 0.97, 8)
    points = [{"optim.name": "adam", "optim.momentum": m} for m in spread] + [{"optim.name": "momentum", "optim.momentum": m} for m in spread]
    # Adam never reads momentum; with SGD momentum the best value is near 0.9
    trials = trials_for(points, lambda p: 0.95 - 0.001 * p["optim.momentum"] if p["optim.name"] == "adam" else 0.9 - abs(p["optim.momentum"] - 0.9))
    reads = lambda field, params: reads_field(field, params, {"optim": {"name": "adam"}})  # noqa: E731

    only_adam_on_top, _ = narrow(space, trials, Narrowing(top_k=4, pad=0.0), reads=reads)
    assert only_adam_on_top["optim.name"].options == ("adam",)
    assert only_adam_on_top["optim.momentum"] == space["optim.momentum"]  # no top trial read it: no evidence
    followed_noise, _ = narrow(space, trials, Narrowing(top_k=4, pad=0.0))
    assert followed_noise["optim.momentum"].high < 0.72  # the Adam trials' unread (lowest) values

    with_momentum_on_top, edges = narrow(space, trials, Narrowing(top_k=10, pad=0.0), reads=reads)
    momentum = with_momentum_on_top["optim.momentum"]
    assert 0.80 < momentum.low and momentum.high < 0.98 and not edges  # the 2 momentum trials nearest 0.9


def test_narrowing_to_one_value_neither_crashes_nor_leaves_the_fields_limits():
    from babysit.config import Config, field_problem

    base = Config().model_dump(mode="json")
    is_valid = lambda field, value: field_problem(base, field, value) is None  # noqa: E731
    narrowing = Narrowing(top_k=1, pad=0.0)
    space = space_of(train__batch_size="int(16, 128)")
    for _ in range(3):  # int(46, 46), then again: a one-value range stays put
        points = sample(space, 4, "random", seed=0)
        space, edges = narrow(space, trials_for(points, lambda p: -abs(p["train.batch_size"] - 46)), narrowing, is_valid)
    assert space["train.batch_size"].low == space["train.batch_size"].high and not edges
    # momentum < 1: the sliver kept around a single best value stops at the field's limit
    momentum = space_of(optim__momentum="loguniform(0.5, 0.99)")
    new, _ = narrow(momentum, trials_for([{"optim.momentum": 0.7}, {"optim.momentum": 0.8}], lambda p: p["optim.momentum"]), narrowing, is_valid)
    assert new["optim.momentum"].low < 0.8 <= new["optim.momentum"].high < 1  # 0.8 × 1.5 would be 1.2
    # on a linear scale, 5% of the range each side: in a sliver of ±1e-6 every value would sit at its edge (QA)
    linear = space_of(optim__momentum="uniform(0.0, 0.9999)")
    new, _ = narrow(linear, trials_for([{"optim.momentum": 0.269}, {"optim.momentum": 0.8}], lambda p: -p["optim.momentum"]), narrowing, is_valid)
    assert (new["optim.momentum"].low, new["optim.momentum"].high) == pytest.approx((0.269 - 0.05, 0.269 + 0.05), abs=1e-4)


def test_a_linear_range_whose_best_value_sits_at_its_edge_moves_as_far_as_the_field_allows():
    from babysit.config import Config, field_problem

    base = Config().model_dump(mode="json")
    is_valid = lambda field, value: field_problem(base, field, value) is None  # noqa: E731
    narrowing = Narrowing(top_k=2, pad=0.0)
    # one width down would be a batch of -300 rows, or a dropout of -0.35: they stop at 1 row, and at 0
    space = space_of(train__batch_size="int(300, 600)", model__dropout="uniform(0.3, 0.95)")
    points = [{"train.batch_size": b, "model.dropout": d} for b, d in [(304, 0.31), (450, 0.6), (590, 0.9), (320, 0.33)]]
    new, edges = narrow(space, trials_for(points, lambda p: -p["train.batch_size"] - p["model.dropout"]), narrowing, is_valid)
    assert edges == {"train.batch_size": "low", "model.dropout": "low"}
    assert new["train.batch_size"].low == 1 and new["model.dropout"].low == 0.0
    # at the limit already, nothing moves: no edge
    at_limit = space_of(model__dropout="uniform(0.0, 0.5)")
    _, edges = narrow(at_limit, trials_for([{"model.dropout": 0.01}, {"model.dropout": 0.4}], lambda p: -p["model.dropout"]), narrowing, is_valid)
    assert edges == {}
    # every trial diverged on a linear learning rate: the range moves down toward 0 (lr > 0), stopping
    # within 1e-4 of the way there (a bound of 1e-19 would read as nonsense)
    lr = space_of(optim__lr="uniform(1.0, 100.0)")
    moved, edges = narrow(lr, trials_for([{"optim.lr": v} for v in (5.0, 40.0, 90.0)], lambda p: 0.0, diverged=lambda p: True), narrowing, is_valid)
    assert edges == {"optim.lr": "low"} and 1e-4 < moved["optim.lr"].low < 0.01 and moved["optim.lr"].high == 5.0
    assert moved["optim.lr"].describe() == f"uniform({moved['optim.lr'].low:.4g}, 5)"


def test_a_stage_where_every_finished_trial_learned_too_fast_moves_the_learning_rate_down():
    space = space_of(optim__lr="loguniform(0.1, 10.0)", model__dropout="uniform(0.0, 0.5)")
    points = [{"optim.lr": lr, "model.dropout": d} for lr, d in [(0.3, 0.1), (0.5, 0.2), (2.0, 0.3), (8.0, 0.4)]]
    trials = [{"params": p, "score": 0.5 - p["optim.lr"] / 100, "diverged": p["optim.lr"] > 5, "too_fast": True} for p in points]
    moved, edges = narrow(space, trials, Narrowing(top_k=2, pad=0.0))
    assert edges == {"optim.lr": "low"}
    assert moved["optim.lr"].low == pytest.approx(0.01) and moved["optim.lr"].high == pytest.approx(0.3)  # a decade below, up to the lowest
    assert moved["model.dropout"] == space["model.dropout"]  # the scores of trials that all learned too fast rank nothing
    trials[0]["too_fast"] = False  # one learned at a sound pace: the usual narrowing, around the best
    narrowed, _ = narrow(space, trials, Narrowing(top_k=2, pad=0.0))
    assert narrowed["optim.lr"].low == pytest.approx(0.3) and narrowed["optim.lr"].high == pytest.approx(0.5)


def test_when_every_trial_learned_too_fast_the_lower_range_still_holds_the_best_trial():
    # all four flagged lr_too_high by their update ratio alone, the best (0.756) scoring 95.6%: the next
    # range went below 0.348, the lowest of them, and none of its trials did as well (QA)
    space = space_of(optim__lr="loguniform(0.03, 3.0)")
    trials = [{"params": {"optim.lr": lr}, "score": score, "diverged": False, "too_fast": True}
              for lr, score in [(0.348, 0.944), (0.756, 0.956), (1.5, 0.90), (2.5, 0.85)]]
    moved, edges = narrow(space, trials, Narrowing(top_k=2, pad=0.0))
    assert edges == {"optim.lr": "low"} and moved["optim.lr"].low < 0.03
    assert moved["optim.lr"].high == pytest.approx(0.756)


def test_a_choice_keeps_the_options_of_the_top_trials_and_those_no_trial_tried():
    space = space_of(model__activation="choice([relu, tanh, sigmoid, elu])")
    points = [{"model.activation": a} for a in ("relu", "relu", "tanh", "sigmoid")]  # elu never sampled
    new, _ = narrow(space, trials_for(points, lambda p: {"relu": 0.9, "tanh": 0.5, "sigmoid": 0.3}[p["model.activation"]]), Narrowing(top_k=2, pad=0.0))
    assert new["model.activation"].options == ("relu", "elu")


def test_a_best_trial_that_learned_too_fast_at_the_high_edge_does_not_move_the_learning_rate_up():
    space = space_of(optim__lr="loguniform(0.01, 1.0)")
    points = [{"optim.lr": lr} for lr in (0.9, 0.5, 0.05, 0.02)]
    trials = [{"params": p, "score": p["optim.lr"], "diverged": False, "too_fast": p["optim.lr"] > 0.8} for p in points]
    new, edges = narrow(space, trials, Narrowing(top_k=2, pad=0.0))
    assert edges == {} and new["optim.lr"].high == pytest.approx(0.9)
    trials[0]["too_fast"] = False  # the same best at a sound pace: past the edge
    _, edges = narrow(space, trials, Narrowing(top_k=2, pad=0.0))
    assert edges == {"optim.lr": "high"}


def test_a_range_reads_back_from_its_text_inside_the_fields_limits():
    from babysit.config import Config, field_problem

    base = Config().model_dump(mode="json")
    for field, dist in [("optim.momentum", Dist("uniform", 0.8185, 0.9999999999999999)), ("model.dropout", Dist("loguniform", 0.3, 0.99999999)),
                        ("optim.lr", Dist("loguniform", 1e-5, 0.1)), ("train.batch_size", Dist("int", 16, 12345))]:
        back = parse_dist(field, dist.describe())
        assert dist.low <= back.low < back.high <= dist.high  # never outside the range it describes
        assert field_problem(base, field, back.high) is None and field_problem(base, field, back.low) is None
    assert Dist("loguniform", 1e-5, 0.1).describe() == "loguniform(1e-05, 0.1)" and Dist("int", 16, 12345).describe() == "int(16, 12345)"


def test_narrowing_shrinks_around_the_top_trials_in_log_space():
    space = space_of(lr="loguniform(1e-6, 1e-0)")
    points = [{"lr": 10.0**e} for e in np.linspace(-5.5, -0.5, 11)]
    new, edges = narrow(space, trials_for(points, lambda p: -abs(math.log10(p["lr"]) + 3)), Narrowing(top_k=3, pad=0.0))
    assert edges == {}
    assert new["lr"].low == pytest.approx(10**-3.5) and new["lr"].high == pytest.approx(10**-2.5)


def test_top_k_is_a_count_or_a_share_of_the_finished_trials():
    assert [top_count(0.25, n) for n in (4, 8, 20, 40)] == [2, 2, 5, 10]  # a share: at least 2
    assert top_count(3, 40) == 3
    space = space_of(lr="loguniform(1e-6, 1e-0)")
    points = [{"lr": 10.0**e} for e in np.linspace(-5.5, -0.5, 11)]
    trials = trials_for(points, lambda p: -abs(math.log10(p["lr"]) + 3))
    by_share, _ = narrow(space, trials, Narrowing(top_k=0.25, pad=0.0))  # round(0.25 × 11) = 3 trials
    by_count, _ = narrow(space, trials, Narrowing(top_k=3, pad=0.0))
    assert (by_share["lr"].low, by_share["lr"].high) == (by_count["lr"].low, by_count["lr"].high)
    assert load_config("conf/search_digits.yaml", ["search.top_k=0.5"], model=SearchExperiment).search.top_k == 0.5
    for bad in ("0", "1.5", "-2"):
        with pytest.raises(BabysitError, match="search.top_k"):
            load_config("conf/search_digits.yaml", [f"search.top_k={bad}"], model=SearchExperiment)


def test_best_at_the_high_edge_moves_the_range_one_decade_past_it():
    space = space_of(lr="loguniform(1e-5, 1e-2)")
    points = [{"lr": v} for v in (1e-5, 1e-4, 1e-3, 5e-3, 9.5e-3)]
    new, edges = narrow(space, trials_for(points, lambda p: p["lr"]), Narrowing(top_k=2, widen=10))
    assert edges == {"lr": "high"}
    assert new["lr"].high == pytest.approx(1e-1) and new["lr"].low > 1e-5


def test_an_edge_that_narrowing_set_lies_inside_the_files_range():
    declared = space_of(lr="loguniform(1e-6, 1e-0)")
    points = [{"lr": 10.0**e} for e in np.linspace(-5.5, -0.5, 11)]
    fine, _ = narrow(declared, trials_for(points, lambda p: -abs(math.log10(p["lr"]) + 3)), Narrowing(top_k=3, pad=0.0))  # 10^-3.5 .. 10^-2.5
    # the fine stage's best sits at its high edge: a bound that narrowing set, with the file's range going on past it
    _, edges = narrow(fine, trials_for([{"lr": 10.0**e} for e in (-3.4, -3.0, -2.5)], lambda p: p["lr"]), Narrowing(top_k=1))
    assert edges == {"lr": "high"} and inside_declared(fine["lr"], declared["lr"], "high")
    assert inside_declared(fine["lr"], declared["lr"], "low")
    # the file's own bounds, and bounds moved past them, are not inside
    moved, edges = narrow(declared, trials_for([{"lr": v} for v in (1e-5, 1e-2, 0.9)], lambda p: p["lr"]), Narrowing(top_k=1, widen=10))
    assert edges == {"lr": "high"} and moved["lr"].high == pytest.approx(10.0)
    assert not inside_declared(declared["lr"], declared["lr"], "high") and not inside_declared(declared["lr"], declared["lr"], "low")
    assert not inside_declared(moved["lr"], declared["lr"], "high")
    dropout = parse_dist("model.dropout", "uniform(0.0, 0.5)")  # a linear range, its low bound at 0
    assert not inside_declared(dropout, dropout, "low") and inside_declared(parse_dist("model.dropout", "uniform(0.1, 0.3)"), dropout, "low")


def test_diverged_trials_cap_the_upper_bound():
    space = space_of(lr="loguniform(1e-5, 1e-1)")
    points = [{"lr": v} for v in (1e-5, 1e-4, 1e-3, 5e-3, 2e-2, 8e-2)]
    new, edges = narrow(space, trials_for(points, lambda p: p["lr"], diverged=lambda p: p["lr"] > 1e-2), Narrowing(top_k=2, pad=0.25, widen=10))
    assert edges == {}  # the best finished trial (5e-3) is inside the range
    assert new["lr"].high == pytest.approx(2e-2)  # the smallest diverged value above the top trials


def test_a_trial_that_diverged_at_a_higher_learning_rate_caps_only_the_learning_rate():
    space = space_of(optim__lr="loguniform(1e-5, 1e-1)", model__dropout="uniform(0.0, 0.5)")
    finished = [{"params": {"optim.lr": lr, "model.dropout": d}, "score": score, "diverged": False}
                for lr, d, score in ((1e-4, 0.1, 0.8), (1e-3, 0.2, 0.9), (3e-3, 0.3, 0.85), (1e-5, 0.05, 0.3))]
    too_fast = {"params": {"optim.lr": 5e-3, "model.dropout": 0.32}, "score": None, "diverged": True}
    new, _ = narrow(space, [*finished, too_fast], Narrowing(top_k=3, pad=0.1))
    assert new["optim.lr"].high == pytest.approx(5e-3)  # above the best ones (3e-3), inside their padding: it caps the rate
    assert new["model.dropout"].high == pytest.approx(0.3 + 0.1 * 0.5)  # the top span plus padding: its dropout is no evidence
    # a trial that diverged at a learning rate the best trials trained well with: something else did it
    unexplained = {"params": {"optim.lr": 1e-3, "model.dropout": 0.32}, "score": None, "diverged": True}
    new, _ = narrow(space, [*finished, unexplained], Narrowing(top_k=3, pad=0.1))
    assert new["model.dropout"].high == pytest.approx(0.32)


def test_edges_do_not_move_past_a_fields_hard_limit():
    space = space_of(model__dropout="uniform(0.0, 0.5)")
    points = [{"model.dropout": v} for v in (0.0, 0.1, 0.3, 0.45)]
    valid = lambda field, value: 0 <= value < 1  # noqa: E731 - the schema's rule for dropout
    new, edges = narrow(space, trials_for(points, lambda p: -p["model.dropout"]), Narrowing(top_k=2), valid)
    assert edges == {} and new["model.dropout"].low == 0.0  # no edge flag: the range could not move


def test_a_choice_reads_numbers_written_with_an_exponent_as_numbers():
    # YAML 1.1 reads 1e-4 as text, 1.0e-4 and 0.01 as numbers: all are numbers to a search
    assert parse_dist("optim.lr", "choice([1e-5, 3e-4, 0.01, 1.0e-1, 2])").options == (1e-5, 3e-4, 0.01, 0.1, 2)
    assert parse_dist("model.activation", "choice([relu, tanh])").options == ("relu", "tanh")


def test_choices_keep_only_what_the_top_trials_used():
    space = space_of(init="choice([small, he, xavier])", hidden="choice([[64], [128, 64]])")
    points = [{"init": i, "hidden": h} for i in ("small", "he", "xavier") for h in ((64,), (128, 64))]
    score = {"he": 2, "xavier": 1, "small": 0}
    trials = trials_for(points, lambda p: score[p["init"]] + (p["hidden"] == (64,)) * 0.5)
    new, _ = narrow(space, trials, Narrowing(top_k=2))  # top two: he with either width
    assert new["init"].options == ("he",) and set(new["hidden"].options) == {(64,), (128, 64)}
    new, _ = narrow(space, trials, Narrowing(top_k=1))
    assert new["init"].options == ("he",) and new["hidden"].options == ((64,),)


def test_tied_scores_are_no_evidence_to_narrow_on():
    space = space_of(init="choice([small, he, xavier])", dropout="uniform(0.0, 0.5)")
    points = [{"init": i, "dropout": d} for i, d in (("small", 0.01), ("he", 0.2), ("xavier", 0.45), ("he", 0.3))]
    new, edges = narrow(space, trials_for(points[:2], lambda p: 0.5), Narrowing(top_k=1))  # every trial at chance
    assert new == space and not edges  # the first one sampled is not the best one; xavier, never tried, stays
    lr = space_of(lr="loguniform(1e-4, 1e0)")
    lrs = [{"lr": v} for v in (1e-4, 1e-3, 1e-2, 0.3, 0.9)]
    new, _ = narrow(lr, trials_for(lrs, lambda p: 0.1, diverged=lambda p: p["lr"] > 0.1), Narrowing(top_k=1))
    assert (new["lr"].low, new["lr"].high) == pytest.approx((1e-4, 0.3))  # what diverged still caps the range
    # a tie at the cut keeps both; a best trial at the edge tied with one inside is no edge
    scores = {"small": 1.0, "he": 0.5, "xavier": 0.5}
    new, edges = narrow(space, trials_for(points, lambda p: scores[p["init"]]), Narrowing(top_k=2))
    assert set(new["init"].options) == {"small", "he", "xavier"} and edges == {"dropout": "low"}
    new, edges = narrow(space, trials_for(points, lambda p: 1.0 if p["init"] != "xavier" else 0.0), Narrowing(top_k=1))
    assert set(new["init"].options) == {"small", "he"} and edges == {}


def test_coarse_to_fine_reaches_an_optimum_outside_the_initial_range():
    # The objective peaks at lr = 1 and dropout = 0.2; the coarse lr range ends at 1e-2.
    def objective(p):
        return -((math.log10(p["lr"]) - 0.0) ** 2) - 4 * (p["dropout"] - 0.2) ** 2

    space = space_of(lr="loguniform(1e-5, 1e-2)", dropout="uniform(0, 0.5)")
    seen_edges = []
    for stage in range(6):
        trials = trials_for(sample(space, 20, "random", seed=stage), objective)
        best = max(trials, key=lambda t: t["score"])
        space, edges = narrow(space, trials, Narrowing())
        seen_edges.append(edges.get("lr"))
    assert "high" in seen_edges  # the search said the range was wrong...
    assert 0.3 < best["params"]["lr"] < 3.0  # ...and moved it until it found the optimum


def test_trials_whose_loss_barely_moved_move_the_learning_rate_range_up():
    space = space_of(lr="loguniform(1e-6, 1e-4)", dropout="uniform(0, 0.5)")
    points = [{"lr": 10.0**e, "dropout": d} for e, d in zip(np.linspace(-5.9, -4.1, 8), np.linspace(0.05, 0.45, 8))]
    noise = [0.36, 0.41, 0.33, 0.42, 0.35, 0.33, 0.38, 0.34]  # nothing learned: the scores are chance
    trials = [{**t, "too_slow": True} for t in trials_for(points, lambda p: noise[points.index(p)])]
    new, edges = narrow(space, trials, Narrowing(top_k=2, learning_rate="lr"))
    assert edges == {"lr": "high"}  # though the best trial sat mid-range
    assert new["lr"].low == pytest.approx(10**-4.1) and new["lr"].high == pytest.approx(1e-3)
    assert new["dropout"] == space["dropout"]  # chance-level scores narrow nothing else
    # a few slow trials below good ones only raise the floor
    space = space_of(lr="loguniform(1e-5, 1e-1)")
    points = [{"lr": v} for v in (1e-5, 3e-5, 1e-4, 1e-3, 1e-2, 3e-2)]
    trials = [{**t, "too_slow": t["params"]["lr"] < 1e-4} for t in trials_for(points, lambda p: -abs(math.log10(p["lr"]) + 2.5))]
    new, edges = narrow(space, trials, Narrowing(top_k=2, pad=0.5, learning_rate="lr"))
    assert edges == {} and new["lr"].low == pytest.approx(3e-5) and new["lr"].high == pytest.approx(1e-1)


def test_slow_trials_tied_at_chance_into_the_top_do_not_outvote_a_best_trial_that_learned():
    # 4 spiral trials, top_k 0.25 (at least 2): the cut, 0.549, is shared by two trials that barely learned
    space = space_of(lr="loguniform(1e-4, 1e-1)")
    trials = [{"params": {"lr": 8.1e-3}, "score": 0.81, "diverged": False, "too_slow": False},
              {"params": {"lr": 1.2e-4}, "score": 0.549, "diverged": False, "too_slow": True},
              {"params": {"lr": 1.3e-4}, "score": 0.549, "diverged": False, "too_slow": True},
              {"params": {"lr": 6e-2}, "score": 0.544, "diverged": False, "too_slow": False}]
    new, edges = narrow(space, trials, Narrowing(top_k=0.25, learning_rate="lr"))
    assert edges == {}  # it learned, mid-range: the rate is not too low
    assert 1.3e-4 < new["lr"].low < 8.1e-3 < new["lr"].high < 1e-1


def test_trials_that_barely_learned_narrow_nothing_when_the_learning_rate_is_not_searched():
    space = space_of(momentum="uniform(0.5, 0.95)", slope="uniform(0.5, 0.9)")
    points = [{"momentum": m, "slope": v} for m, v in zip(np.linspace(0.55, 0.9, 8), np.linspace(0.85, 0.55, 8))]
    noise = [0.54, 0.57, 0.55, 0.56, 0.54, 0.55, 0.57, 0.56]
    trials = [{**t, "too_slow": True} for t in trials_for(points, lambda p: noise[points.index(p)])]
    assert narrow(space, trials, Narrowing(top_k=2, learning_rate="lr")) == (space, {})


def test_a_best_trial_that_barely_learned_never_moves_the_learning_rate_range_down():
    # 2 trials at chance: the "best" by noise sits at the low edge, and its own flag says the rate is too low
    space = space_of(lr="loguniform(8e-3, 0.3)")
    trials = [{"params": {"lr": 8.5e-3}, "score": 0.107, "diverged": False, "too_slow": True},
              {"params": {"lr": 0.17}, "score": 0.100, "diverged": False, "too_slow": False}]
    new, edges = narrow(space, trials, Narrowing(learning_rate="lr"))
    assert edges == {} and new["lr"].low == pytest.approx(space["lr"].low)
    learned = [{**trials[0], "too_slow": False}, trials[1]]  # the same best trial, learning: the range does move down
    assert narrow(space, learned, Narrowing(learning_rate="lr"))[1] == {"lr": "low"}


def test_a_stage_where_every_trial_diverged_moves_the_learning_rate_range_down():
    space = space_of(lr="loguniform(1e-2, 10)", dropout="uniform(0, 0.5)")
    points = [{"lr": v, "dropout": 0.1} for v in (0.03, 0.2, 1.0, 5.0)]
    new, edges = narrow(space, trials_for(points, lambda p: 0.0, diverged=lambda p: True), Narrowing(learning_rate="lr"))
    assert edges == {"lr": "low"}
    assert new["lr"].low == pytest.approx(1e-3) and new["lr"].high == pytest.approx(0.03)
    assert new["dropout"] == space["dropout"]


def test_coarse_to_fine_climbs_out_of_a_range_where_nothing_learns():
    # below lr = 1e-3 the loss barely moves (val acc at chance, noise); above, it peaks at 1e-2
    rng = np.random.default_rng(0)

    def trial(p):
        slow = p["lr"] < 1e-3
        score = 0.33 + 0.05 * rng.random() if slow else 0.9 - (math.log10(p["lr"]) + 2) ** 2 / 10
        return {"params": p, "score": score, "diverged": False, "too_slow": slow}

    space = space_of(lr="loguniform(1e-7, 1e-5)")
    for stage in range(5):
        trials = [trial(p) for p in sample(space, 10, "random", seed=stage)]
        best = max(trials, key=lambda t: t["score"])
        space, _ = narrow(space, trials, Narrowing(learning_rate="lr"))
    assert 3e-3 < best["params"]["lr"] < 3e-2


def test_median_pruner_stops_trials_below_their_stage_median():
    pruner = Pruner("median", warmup=1)
    assert pruner.report(1, 0.9) is None and pruner.report(1, 0.8) is None  # too few peers yet
    assert pruner.report(1, 0.5) is not None  # below median(0.9, 0.8)
    assert pruner.report(1, 0.95) is None


def test_a_pruner_replays_reused_trials_without_judging_them():
    pruner = Pruner("median", warmup=1)
    pruner.replay([0.2, 0.1])  # a poor trial, as a resumed stage finds it in MLflow: recorded, never pruned
    pruner.replay([0.9, 0.95])
    assert pruner.report(1, 0.6) is None  # not below median(0.2, 0.9) = 0.55
    assert pruner.report(2, 0.3) is not None  # below median(0.1, 0.95) = 0.525
    none = Pruner("none")
    none.replay([0.9, 0.9])
    assert none.report(1, 0.0) is None


def _report_in_child(pruner: Pruner, reports: SharedReports, epoch: int, val_acc: float, out) -> None:
    out.put(pruner.attached(reports).report(epoch, val_acc))  # as a search's worker process does


def test_a_shared_pruner_sees_reports_from_other_processes():
    import multiprocessing
    import pickle

    context = multiprocessing.get_context("spawn")  # nothing inherited but what the children are given
    reports = SharedReports(context, epochs=2, trials=4)
    pruner = Pruner("median", warmup=1).shared(reports)
    assert pickle.loads(pickle.dumps(pruner)).detached  # trials carry the rule; shared memory passes only at a process's start
    out = context.Queue()
    for val_acc in (0.9, 0.8, 0.5):  # one trial per process, as a search's worker processes run them
        child = context.Process(target=_report_in_child, args=(pruner, reports, 1, val_acc, out))
        child.start()
        child.join()
    verdicts = [out.get(timeout=10) for _ in range(3)]
    assert verdicts[:2] == [None, None] and verdicts[2].startswith("pruned in epoch 1")
    assert reports.get(1) == [0.9, 0.8, 0.5]
    pruner = Pruner("median", warmup=1).shared(reports)  # the next stage starts with no reports
    assert reports.get(1) == [] and pruner.report(1, 0.1) is None
    for val_acc in (0.9, 0.8, 0.7):
        pruner.report(1, val_acc)
    assert reports.get(1) == [0.1, 0.9, 0.8, 0.7]  # full: room for 4 trials
    assert pruner.report(1, 0.2) is not None and reports.get(1) == [0.1, 0.9, 0.8, 0.7]  # judged, not stored
    assert pruner.report(5, 0.1) is None and reports.get(5) == []  # past the epochs it has room for: never pruned


def test_asha_keeps_the_top_third_at_each_rung():
    pruner = Pruner("asha", eta=3)
    assert pruner.report(1, 0.5) is None and pruner.report(1, 0.6) is None  # first eta-1 trials pass
    assert pruner.report(1, 0.4) is not None  # not in the top third of {0.5, 0.6, 0.4}
    assert pruner.report(1, 0.7) is None
    assert pruner.report(2, 0.1) is None  # epoch 2 is not a rung for eta = 3


def test_a_dropout_range_moved_up_stops_short_of_its_degenerate_limit():
    # QA: dropout uniform(0, 0.5), best at 0.4966, moved up one width to 0.9999: a trial at 0.969 scored 0.30
    space = space_of(model__dropout="uniform(0.0, 0.5)")
    points = [{"model.dropout": v} for v in (0.05, 0.2, 0.45, 0.4966)]
    valid = lambda field, value: 0 <= value < 1  # noqa: E731 - the schema's rule for dropout
    new, edges = narrow(space, trials_for(points, lambda p: p["model.dropout"]), Narrowing(top_k=2), valid)
    assert edges == {"model.dropout": "high"} and new["model.dropout"].high == pytest.approx(0.9)
    again, edges = narrow(new, trials_for([{"model.dropout": v} for v in (0.5, 0.89)], lambda p: p["model.dropout"]), Narrowing(top_k=1), valid)
    assert again["model.dropout"].high == pytest.approx(0.9) and edges == {}  # there already: nothing moves, no edge


def test_a_value_exactly_at_the_edge_band_counts_as_at_the_edge():
    # uniform(0, 4), edge 0.25: positions ≤ 0.25 (values ≤ 1) are at the low edge, ≥ 0.75 (≥ 3) at the high one
    dist = parse_dist("x", "uniform(0, 4)")
    assert [edge_side(dist, v, 0.25) for v in (0.0, 1.0, 1.01, 2.0, 2.99, 3.0, 4.0)] == ["low", "low", None, None, None, "high", "high"]
    logs = parse_dist("lr", "loguniform(1e-4, 1e0)")  # on its log scale: 1e-3 sits at 0.25, 1e-1 at 0.75
    assert edge_side(logs, 1e-3, 0.25) == "low" and edge_side(logs, 1e-1, 0.25) == "high"


def test_a_top_share_rounds_to_the_nearest_count():
    # a share of the scored trials is rounded, not truncated: 0.25 × 14 = 3.5 → 4, 0.3 × 9 = 2.7 → 3
    assert top_count(0.25, 14) == 4
    assert top_count(0.3, 9) == 3
    assert top_count(0.3, 11) == 3  # 3.3 → 3


def test_a_numeric_field_that_every_trial_shared_is_not_narrowed():
    # a grid of fewer trials than its choices' combinations puts every trial at each numeric range's middle:
    # the next stage narrowed lr from 3 decades to a sliver around that one value it never varied (QA)
    space = space_of(optim__lr="loguniform(1e-4, 1e-1)", model__activation="choice([relu, tanh, elu])")
    trials = [{"params": {"optim.lr": 3.16e-3, "model.activation": a}, "score": s} for a, s in (("relu", 0.9), ("tanh", 0.7), ("elu", 0.8))]
    narrowed, edges = narrow(space, trials, Narrowing(top_k=1))
    assert narrowed["optim.lr"] == space["optim.lr"] and not edges
    assert narrowed["model.activation"].options == ("relu",)  # the choice that varied still narrows
    trials[1]["params"]["optim.lr"] = 5e-2  # once the trials differ, it narrows as before
    assert narrow(space, trials, Narrowing(top_k=1))[0]["optim.lr"] != space["optim.lr"]


def test_trials_that_learned_too_fast_above_the_top_ones_lower_the_learning_rates_ceiling():
    # report.md said "lr_too_high in 6 of 16 trials, all with optim.lr >= 0.93: lower the upper bound", and the next
    # range still went up to 0.96 (QA): as too-slow trials below the top raise the floor, too-fast ones above it lower the ceiling
    space = space_of(optim__lr="loguniform(1e-4, 1.0)")
    trials = [{"params": {"optim.lr": lr}, "score": score, "too_fast": fast}
              for lr, score, fast in ((0.1, 0.95, False), (0.2, 0.94, False), (0.25, 0.6, True), (0.5, 0.5, True), (1e-3, 0.7, False), (1e-4, 0.5, False))]
    narrowed, edges = narrow(space, trials, Narrowing(top_k=2, pad=0.1))
    assert narrowed["optim.lr"].high == pytest.approx(0.25) and narrowed["optim.lr"].low < 0.1 and not edges
    trials[2]["too_fast"] = trials[3]["too_fast"] = False  # the same scores without the flag: padded past 0.25 as before
    assert narrow(space, trials, Narrowing(top_k=2, pad=0.1))[0]["optim.lr"].high > 0.25
