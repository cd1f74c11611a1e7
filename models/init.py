"""Weight-init schemes, applied once with `model.apply(...)`.

small       N(0, 0.01²): the CS231n "small random numbers"; activations shrink layer by layer
            in deep nets (the lecture's vanishing-activation demo).
xavier      Glorot & Bengio 2010, "Understanding the difficulty of training deep feedforward
            neural networks": Var(w) = 2 / (fan_in + fan_out); keeps tanh/linear nets' variance.
he          He et al. 2015, "Delving Deep into Rectifiers" (MSRA): Var(w) = 2 / fan_in, or
            2 / ((1 + a²) fan_in) for leaky ReLU with slope a: ReLU zeroes half the input.
lecun       LeCun et al. 1998, "Efficient BackProp": Var(w) = 1 / fan_in.
orthogonal  Saxe et al. 2014, "Exact solutions to the nonlinear dynamics of learning in deep
            linear networks": a random orthogonal matrix scaled by the activation's gain.
Biases start at zero; BatchNorm starts as the identity (scale 1, shift 0).
"""

from __future__ import annotations

import torch
from torch import nn

# torch.nn.init.calculate_gain knows no ELU/GELU; they behave like ReLU for positive inputs.
GAIN_NAME = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "leaky_relu": "leaky_relu", "elu": "relu", "gelu": "relu"}


def init_layer(module: nn.Module, scheme: str, activation: str = "relu", distribution: str = "normal", leaky_slope: float = 0.01,
               generator: torch.Generator | None = None) -> None:
    """Initialise one Linear/Conv layer in place; other modules keep torch's defaults. With
    `generator`, the weights come from it alone, not from torch's global generator, which trials
    training in other threads draw from too."""
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return
    w = module.weight
    uniform = distribution == "uniform"
    if scheme == "small":
        nn.init.normal_(w, 0.0, 0.01, generator=generator)
    elif scheme == "xavier":
        (nn.init.xavier_uniform_ if uniform else nn.init.xavier_normal_)(w, generator=generator)
    elif scheme == "he":
        slope = leaky_slope if activation == "leaky_relu" else 0.0
        (nn.init.kaiming_uniform_ if uniform else nn.init.kaiming_normal_)(w, a=slope, mode="fan_in", nonlinearity="leaky_relu", generator=generator)
    elif scheme == "lecun":
        (nn.init.kaiming_uniform_ if uniform else nn.init.kaiming_normal_)(w, mode="fan_in", nonlinearity="linear", generator=generator)
    elif scheme == "orthogonal":
        gain_name = GAIN_NAME[activation]
        gain = nn.init.calculate_gain(gain_name, leaky_slope if gain_name == "leaky_relu" else None)
        nn.init.orthogonal_(w, gain=gain, generator=generator)
    else:
        raise ValueError(f"unknown init scheme '{scheme}'")
    if module.bias is not None:
        nn.init.zeros_(module.bias)
