"""The pixel convention of the package: uint8 <-> float in [-1, 1], the one rule for every image that is
loaded, scored or saved.

Model outputs live in [-1, 1]. :func:`to_uint8` clamps, maps to [0, 1] and then applies exactly the arithmetic of
``torchvision.utils.save_image`` (``x.mul(255).add_(0.5).clamp_(0, 255).to(uint8)``, i.e. floor(255 x + 1/2),
round-half-up). So the uint8 tensor fed to the feature extractors is bit-identical to what a PNG written with
``save_image(x, normalize=True, value_range=(-1, 1))`` (or ``save_image((x + 1) / 2)``) holds, and hence to what
torch-fidelity reads back from such PNGs (it only accepts uint8 and reads files with PIL + ``pil_to_tensor``).
``((x + 1) * 127.5).round()`` would differ at exact ties: ``round`` is round-half-to-even.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (any float dtype, any shape) -> uint8 in [0, 255] by floor(255 (x + 1) / 2 + 1/2).

    Out-of-range values are clamped first; half-precision inputs are computed in float32. NaN maps to 0.
    """
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"expected a float or uint8 tensor, got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x01 = (x.clamp(-1, 1) + 1) / 2  # what save_image(normalize=True, value_range=(-1, 1)) computes
    return torch.nan_to_num(x01.mul(255).add(0.5).clamp(0, 255), nan=0.0).to(torch.uint8)


def from_uint8(images: Tensor) -> Tensor:
    """uint8 -> float32 in [-1, 1] as x / 127.5 - 1 (0 -> -1, 255 -> 1); inverse of :func:`to_uint8`."""
    return images.to(torch.float32) / 127.5 - 1.0
