"""The MLP and its init schemes, checked against the papers' variance formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from babysit.config import ModelConfig
from models.mlp import MLP, Affine, build_model
from tasks.build import inspect_init

FAN_IN, FAN_OUT = 512, 256  # a hidden layer of 131,072 weights: its sample std is within ~0.5%

# The references, written out: Glorot & Bengio 2010, He et al. 2015, LeCun et al. 1998, Saxe et al. 2014.
RELU_GAIN, TANH_GAIN = math.sqrt(2.0), 5.0 / 3.0
REFERENCE_STD = {
    ("small", "relu"): 0.01,
    ("xavier", "relu"): math.sqrt(2.0 / (FAN_IN + FAN_OUT)),
    ("xavier", "tanh"): math.sqrt(2.0 / (FAN_IN + FAN_OUT)),
    ("he", "relu"): math.sqrt(2.0 / FAN_IN),
    ("he", "leaky_relu"): math.sqrt(2.0 / ((1 + 0.2**2) * FAN_IN)),  # leaky_slope 0.2 below
    ("lecun", "relu"): math.sqrt(1.0 / FAN_IN),
    ("lecun", "tanh"): math.sqrt(1.0 / FAN_IN),
    ("orthogonal", "relu"): RELU_GAIN / math.sqrt(FAN_IN),
    ("orthogonal", "tanh"): TANH_GAIN / math.sqrt(FAN_IN),
}


def first_layer(model: MLP) -> nn.Linear:
    return model.blocks[0][0]


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
@pytest.mark.parametrize(("scheme", "activation"), list(REFERENCE_STD))
def test_init_std_matches_formula(scheme, activation, distribution):
    cfg = ModelConfig(hidden=[FAN_OUT], activation=activation, init=scheme, init_distribution=distribution, leaky_slope=0.2)
    layer = first_layer(build_model(cfg, FAN_IN, 3, seed=0))
    w = layer.weight.detach().double()
    reference = REFERENCE_STD[(scheme, activation)]
    assert w.std().item() == pytest.approx(reference, rel=0.05)
    assert abs(w.mean().item()) < 0.05 * reference
    torch.testing.assert_close(layer.bias, torch.zeros(FAN_OUT))
    if scheme in ("xavier", "he", "lecun") and distribution == "uniform":
        # a uniform of std s lives in [-s√3, s√3], and reaches close to both ends
        bound = reference * math.sqrt(3.0)
        assert w.abs().max().item() <= bound * 1.0001 and w.abs().max().item() > 0.99 * bound
    elif scheme != "orthogonal":
        # a normal's 131,072 draws go well beyond 3 std
        assert w.abs().max().item() > 3.0 * reference


def test_orthogonal_rows_are_orthogonal():
    cfg = ModelConfig(hidden=[64], activation="tanh", init="orthogonal")
    w = first_layer(build_model(cfg, 256, 3, seed=0)).weight.detach().double()
    torch.testing.assert_close(w @ w.T, TANH_GAIN**2 * torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)


def test_default_model_is_relu_he_without_batchnorm():
    cfg = ModelConfig()
    assert (cfg.activation, cfg.init, cfg.batchnorm, cfg.dropout) == ("relu", "he", False, 0.0)
    model = build_model(cfg, 64, 10, seed=0)
    kinds = [type(m) for m in model.modules()]
    assert nn.ReLU in kinds and nn.BatchNorm1d not in kinds and nn.Dropout not in kinds
    assert [first_layer(model).in_features, *(b[0].out_features for b in model.blocks), model.head.out_features] == [64, 256, 256, 10]
    for block in model.blocks:
        assert block[0].bias is not None


def test_batchnorm_removes_the_linear_bias():
    model = build_model(ModelConfig(hidden=[32, 16], batchnorm=True), 8, 3, seed=0)
    for block in model.blocks:
        assert isinstance(block[0], nn.Linear) and block[0].bias is None
        assert isinstance(block[1], nn.BatchNorm1d) and block[1].num_features == block[0].out_features
    assert model.head.bias is not None  # the classifier keeps its bias


@pytest.mark.parametrize(("p", "present"), [(0.0, False), (0.3, True)])
def test_dropout_layer_when_p_positive(p, present):
    model = build_model(ModelConfig(hidden=[32, 16], dropout=p), 8, 3, seed=0)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == (2 if present else 0)
    assert all(d.p == p for d in dropouts)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu"])
def test_activation_is_the_configured_one(activation):
    model = build_model(ModelConfig(hidden=[16], activation=activation, leaky_slope=0.2), 4, 2, seed=0)
    x = torch.linspace(-3, 3, 61)
    reference = {
        "sigmoid": torch.sigmoid(x), "tanh": torch.tanh(x), "relu": x.clamp(min=0),
        "leaky_relu": torch.where(x > 0, x, 0.2 * x), "elu": torch.where(x > 0, x, torch.expm1(x)),
        "gelu": 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    }[activation]
    act = model.blocks[0][-1]
    torch.testing.assert_close(act(x), reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.1, 0.01])
def test_head_weights_are_scaled(scale):
    cfg = ModelConfig(hidden=[FAN_IN], init="he", head_init_scale=scale)
    model = build_model(cfg, 8, 400, seed=0)
    w = model.head.weight.detach().double()
    assert w.std().item() == pytest.approx(scale * math.sqrt(2.0 / FAN_IN), rel=0.05)
    torch.testing.assert_close(model.head.bias, torch.zeros(400))
    # hidden layers are not scaled
    assert first_layer(model).weight.std().item() == pytest.approx(math.sqrt(2.0 / 8), rel=0.05)


def test_same_seed_same_weights_other_seed_other_weights():
    cfg = ModelConfig(hidden=[32, 32], init="xavier")
    a, b, c = build_model(cfg, 10, 3, seed=5), build_model(cfg, 10, 3, seed=5), build_model(cfg, 10, 3, seed=6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_initial_logits_are_small():
    # head_init_scale=0.1 on standardized inputs: softmax is near uniform, loss ≈ ln(classes)
    model = build_model(ModelConfig(), 64, 10, seed=0).eval()
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (512,), generator=torch.Generator().manual_seed(1)))
    assert loss.item() == pytest.approx(math.log(10), abs=0.05)


def test_hidden_activations_are_block_outputs():
    model = build_model(ModelConfig(hidden=[8, 6]), 4, 3, seed=0).eval()
    x = torch.randn(5, 4)
    h1, h2 = model.hidden_activations(x)
    torch.testing.assert_close(h1, torch.relu(x @ model.blocks[0][0].weight.T + model.blocks[0][0].bias))
    torch.testing.assert_close(h2, torch.relu(h1 @ model.blocks[1][0].weight.T + model.blocks[1][0].bias))
    torch.testing.assert_close(model(x), h2 @ model.head.weight.T + model.head.bias)


def test_affine_is_x_w_plus_b():
    W, b, x = torch.randn(4, 3), torch.randn(3), torch.randn(7, 4)
    torch.testing.assert_close(Affine(W, b)(x), x @ W + b)
    scales = torch.randn(4)  # per feature (centering, standardizing): a vector, not a diagonal matrix
    torch.testing.assert_close(Affine(scales, b[:1].expand(4))(x), x @ torch.diag(scales) + b[:1].expand(4))


def test_inspect_init_reports_relu_activation_stats():
    X = np.random.default_rng(0).normal(size=(256, 20)).astype(np.float32)
    report = inspect_init(ModelConfig(hidden=[400, 400], init="he"), 20, 4, 0, X)
    assert report.n_params == 20 * 400 + 400 + 400 * 400 + 400 + 400 * 4 + 4
    assert report.architecture == "20 -> 400 -> 400 -> 4"
    # ReLU zeroes about half the units at init
    assert all(0.4 < f < 0.6 for f in report.layer_stats["act_frac_zero"])
    assert report.layer_stats["act_frac_saturated"] == [0.0, 0.0]
    # "small" init: activations shrink layer by layer (the lecture's vanishing-activation demo)
    small = inspect_init(ModelConfig(hidden=[400, 400, 400], init="small", activation="tanh"), 20, 4, 0, X)
    stds = small.layer_stats["act_std"]
    assert stds[0] > stds[1] > stds[2]


def test_weights_at_init_ignore_other_threads_drawing_random_numbers():
    import threading

    cfg = ModelConfig(hidden=[128, 128])
    reference = build_model(cfg, 64, 10, seed=3).state_dict()
    stop = threading.Event()

    def draw() -> None:  # another trial's thread, sampling dropout masks meanwhile
        while not stop.is_set():
            torch.rand(10_000)

    other = threading.Thread(target=draw)
    other.start()
    try:
        for _ in range(20):
            rebuilt = build_model(cfg, 64, 10, seed=3).state_dict()
            assert all(torch.equal(rebuilt[name], weights) for name, weights in reference.items())
    finally:
        stop.set()
        other.join()


def dropout_masks(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Whether each dropout layer zeroed each unit it got non-zero (ReLU zeroes some before it), in one training-mode forward pass."""
    masks = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: masks.append((out == 0)[inputs[0] != 0]))
             for m in model.modules() if isinstance(m, nn.Dropout)]
    model.train()(x)
    for hook in hooks:
        hook.remove()
    return masks


def test_dropout_masks_come_from_the_model_seed_not_the_global_generator():
    cfg, x = ModelConfig(hidden=[256, 256], dropout=0.3), torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = dropout_masks(build_model(cfg, 64, 10, seed=5), x)
    torch.manual_seed(2)  # another trial's draws in between: nn.Dropout's masks would change
    torch.rand(1000)
    again = dropout_masks(build_model(cfg, 64, 10, seed=5), x)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other_seed = dropout_masks(build_model(cfg, 64, 10, seed=6), x)
    assert not torch.equal(first[0], other_seed[0])
    layers = [m for m in build_model(cfg, 64, 10, seed=5).modules() if isinstance(m, nn.Dropout)]
    ones = torch.ones(64, 256)
    assert not torch.equal(layers[0].train()(ones), layers[1].train()(ones))  # each layer draws masks of its own
    dropped = torch.cat([m.flatten() for m in first]).float().mean().item()
    assert 0.27 < dropped < 0.33  # p = 0.3 of the units


def test_dropout_scales_kept_units_and_is_off_in_eval():
    from models.dropout import Dropout, Dropout2d

    x = torch.ones(32, 8, 5, 5)
    out = Dropout2d(0.5).train()(x)
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    per_channel = out.flatten(2)
    assert torch.equal(per_channel.amin(dim=2), per_channel.amax(dim=2))  # whole channels, as nn.Dropout2d
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_dropout_masks_survive_pickling_as_their_seed():
    import pickle

    model = build_model(ModelConfig(hidden=[32], dropout=0.5), 8, 3, seed=0)
    x = torch.randn(16, 8)
    first = dropout_masks(model, x)
    copy = pickle.loads(pickle.dumps(model))  # a logged model: its generator restarts from the seed
    assert torch.equal(dropout_masks(copy, x)[0], first[0])


def test_tanh_saturation_counts_both_flat_tails():
    from tasks.build import saturated_mask

    # |tanh| > 0.99 is flat on either side: −1 saturates as much as +1
    assert saturated_mask(torch.tensor([-0.999, -0.5, 0.0, 0.5, 0.999]), "tanh").tolist() == [True, False, False, False, True]
    # inputs 30× too large drive a tanh layer into both tails about equally: the reported share is
    # that of |h| > 0.99, nearly all units, not the half on the positive side
    X = 30 * np.random.default_rng(0).normal(size=(256, 20)).astype(np.float32)
    cfg = ModelConfig(hidden=[64], activation="tanh", init="xavier")
    report = inspect_init(cfg, 20, 4, 0, X)
    (h,) = build_model(cfg, 20, 4, seed=0).eval().hidden_activations(torch.as_tensor(X))
    assert report.layer_stats["act_frac_saturated"][0] == pytest.approx((h.abs() > 0.99).float().mean().item())
    assert report.layer_stats["act_frac_saturated"][0] > 0.8
    assert (h < -0.99).float().mean().item() > 0.3  # precondition: the negative tail holds a good share


def test_dead_unit_probe_counts_a_unit_alive_if_any_chunk_saw_it_fire():
    from babysit.diagnostics import dead_unit_probe
    from tasks.train import evaluate

    # validation in two chunks: the first all-zero rows (zero biases at init: every ReLU outputs 0),
    # the second real inputs. A unit that fires only in the second chunk is alive; the dead share
    # is that of the second chunk alone, not every unit
    model = build_model(ModelConfig(hidden=[32, 16]), 20, 4, seed=0)
    real = torch.as_tensor(np.random.default_rng(0).normal(size=(64, 20)).astype(np.float32))
    X, y = torch.cat([torch.zeros(64, 20), real]), torch.zeros(128, dtype=torch.long)
    with dead_unit_probe(model) as dead:
        evaluate(model, X, y, chunk=64)
    with dead_unit_probe(model) as dead_in_real:
        evaluate(model, real, y[:64])
    assert dead == dead_in_real
    assert all(fraction < 0.5 for fraction in dead), dead
