"""The lecture's activation functions, by config name."""

from torch import nn

ACTIVATIONS = {
    "sigmoid": lambda slope: nn.Sigmoid(),
    "tanh": lambda slope: nn.Tanh(),
    "relu": lambda slope: nn.ReLU(),
    "leaky_relu": lambda slope: nn.LeakyReLU(slope),
    "elu": lambda slope: nn.ELU(),
    "gelu": lambda slope: nn.GELU(),
}


def make_activation(name: str, leaky_slope: float = 0.01) -> nn.Module:
    return ACTIVATIONS[name](leaky_slope)
