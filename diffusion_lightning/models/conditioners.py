"""Conditioners: what turns a training batch (images in [-1, 1], labels) into the condition the network receives
(:mod:`diffusion_lightning.diffusion.conditioning`). A recipe takes one as ``model.conditioner``; classifier-free
dropout of whatever they give happens once, in the recipe's base class.

A conditioner is called as ``conditioner(x, y)`` in training and as ``conditioner(None, y)`` when sampling from labels
alone; one that needs the image (:class:`LowResolution`) is given its condition by the caller instead (``cond=``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lightning.diffusion.conditioning import Cond, Condition


class ClassLabels(nn.Module):
    """The class labels themselves (the U-Net's label embedding reads them); label ``num_classes`` is the null class.
    ``num_classes=None``: an unconditional model (no condition)."""

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: Tensor | None, y: Tensor | None) -> Cond:
        return y if self.num_classes else None


class LabelTokens(nn.Module):
    """Each class as a learned sequence of ``length`` tokens of width ``dim`` (a stand-in for a text encoder: the
    network reads them through cross-attention, ``model.net.context_dim``), all attended."""

    def __init__(self, num_classes: int, length: int = 4, dim: int = 32) -> None:
        super().__init__()
        self.num_classes, self.length, self.dim = num_classes, length, dim
        self.embedding = nn.Embedding(num_classes, length * dim)

    def forward(self, x: Tensor | None, y: Tensor | None) -> Cond:
        if y is None:
            raise ValueError("LabelTokens needs class labels")
        context = self.embedding(y).reshape(len(y), self.length, self.dim)
        return Condition(context=context, context_mask=context.new_ones(context.shape[:2], dtype=bool))


class LowResolution(nn.Module):
    """The image at 1 / ``factor`` of its resolution (average pooling), resized (nearest) to ``size`` (None: back to
    the image's; a latent model: the latent's side) and concatenated to the network's input (SR3, Saharia et al.
    2021: ``model.net.cond_channels`` = the image channels). Training derives it from the batch; sampling takes it
    from the caller (``cond=Condition(image=...)``)."""

    num_classes = None

    def __init__(self, factor: int = 2, size: int | None = None) -> None:
        super().__init__()
        self.factor, self.size = int(factor), size

    def forward(self, x: Tensor | None, y: Tensor | None) -> Cond:
        if x is None:
            raise ValueError("a low-resolution condition is made from an image: pass cond=Condition(image=...)")
        low = F.avg_pool2d(x, self.factor)
        return Condition(image=F.interpolate(low, size=self.size or x.shape[-1], mode="nearest"))
