"""Data augmentation for image batches, done batch-wise on the device (airbench-style), not per
sample on the CPU: a random half of the batch mirrored, every image shifted by whole pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_batch(x: torch.Tensor, flip: bool, translate: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, channels, height, width) -> same shape; shifts pad with zeros (the mean after
    per-channel standardisation)."""
    batch = x.shape[0]
    if flip:
        mirrored = torch.rand(batch, device=x.device, generator=generator) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    if translate:
        # one integer shift per image and axis, applied with a single grid_sample call
        shifts = torch.randint(-translate, translate + 1, (batch, 2), device=x.device, generator=generator).to(x.dtype)
        theta = torch.zeros(batch, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = -2.0 * shifts[:, 0] / x.shape[-1]  # normalised coordinates: 2 / width per pixel
        theta[:, 1, 2] = -2.0 * shifts[:, 1] / x.shape[-2]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x
