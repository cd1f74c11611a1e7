"""Convolutional nets for image data, with the MLP's activation / init / BatchNorm choices.

ConvNet:  [conv3x3 → (BN) → act → maxpool2] per width, then global average pool → Linear.
ResNet:   a CIFAR-style residual net (He et al. 2016): stem conv, then per width a basic block
          (two conv3x3 with BN and a skip connection; stride 2 from the second width on),
          global average pool → Linear.
Both accept (batch, channels, height, width) and also expose `hidden_activations` per block.
"""

from __future__ import annotations

import torch
from torch import nn

from babysit.config import ModelConfig
from models.activations import make_activation
from models.dropout import Dropout, Dropout2d


def conv_block(c_in: int, c_out: int, cfg: ModelConfig, stride: int = 1) -> list[nn.Module]:
    # A bias before BatchNorm is cancelled by its mean subtraction; BN's shift replaces it.
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not cfg.batchnorm)]
    if cfg.batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(make_activation(cfg.activation, cfg.leaky_slope))
    return layers


class ConvNet(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, cfg: ModelConfig):
        super().__init__()
        blocks, c_in = [], in_channels
        for width in cfg.channels:
            layers = conv_block(c_in, width, cfg)
            if cfg.dropout > 0:
                layers.append(Dropout2d(cfg.dropout))
            layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil: 8x8 digits survive 3 pools
            blocks.append(nn.Sequential(*layers))
            c_in = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, cfg: ModelConfig):
        super().__init__()
        self.body = nn.Sequential(*conv_block(c_in, c_out, cfg, stride), *conv_block(c_out, c_out, cfg)[:-1])
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        self.act = make_activation(cfg.activation, cfg.leaky_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, cfg: ModelConfig):
        super().__init__()
        widths = cfg.channels
        self.stem = nn.Sequential(*conv_block(in_channels, widths[0], cfg))
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(c_in, width, 1 if i == 0 else 2, cfg))
            c_in = width
        self.blocks = nn.ModuleList(blocks)
        self.dropout = Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.dropout(x.mean(dim=(2, 3))))

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = [x := self.stem(x)]
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs
