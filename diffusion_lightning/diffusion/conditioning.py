"""What a network receives besides x and sigma: the condition, its null value and classifier-free dropout.

A condition is either a tensor of class labels (B,) or a :class:`Condition` with any of

* ``label`` (B,) long: a class; its null value is the label ``num_classes`` (the null class);
* ``context`` (B, L, D) and ``context_mask`` (B, L) bool: a token sequence for cross-attention (text); null: zero
  tokens, all attended (the null embedding of SGM's unconditional-guidance dropout);
* ``image`` (B, C, H, W): an image concatenated to the network's input (super-resolution, inpainting, ControlNet
  hints); null: zeros.

Every function here takes either form, so the denoiser adapters, :class:`~.denoisers.Guided` and the samplers pass a
condition through without knowing what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Condition:
    """A batch of conditions (module docstring); absent fields are None."""

    label: Tensor | None = None
    context: Tensor | None = None
    context_mask: Tensor | None = None
    image: Tensor | None = None

    def __post_init__(self) -> None:
        if self.context_mask is not None and self.context is None:
            raise ValueError("a context_mask needs its context")
        sizes = {f.name: len(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the condition's fields have different batch sizes: {sizes}")

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are set."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def map(self, fn) -> Condition:  # noqa: ANN001 - a Tensor -> Tensor function
        """Every set field through ``fn`` (e.g. ``.to(device)``, slicing)."""
        return replace(self, **{k: fn(v) for k, v in self.tensors().items()})


Cond = Tensor | Condition | None


def labels_of(cond: Cond) -> Tensor | None:
    """The class labels a condition holds (a bare tensor is labels)."""
    return cond.label if isinstance(cond, Condition) else cond


def cond_map(cond: Cond, fn) -> Cond:  # noqa: ANN001
    """``fn`` applied to every tensor of ``cond``."""
    if cond is None:
        return None
    return cond.map(fn) if isinstance(cond, Condition) else fn(cond)


def null_condition(cond: Cond, null_label: int | None) -> Cond:
    """The null value of every field of ``cond`` (module docstring); ``null_label`` is the null class."""
    if cond is None:
        return None
    if not isinstance(cond, Condition):
        return _null_label(cond, null_label)
    out = {}
    if cond.label is not None:
        out["label"] = _null_label(cond.label, null_label)
    if cond.context is not None:
        out["context"] = torch.zeros_like(cond.context)
        if cond.context_mask is not None:
            out["context_mask"] = torch.ones_like(cond.context_mask)
    if cond.image is not None:
        out["image"] = torch.zeros_like(cond.image)
    return Condition(**out)


def _null_label(y: Tensor, null_label: int | None) -> Tensor:
    if null_label is None:
        raise ValueError("a class label's null value is the null class: give null_label (the number of classes)")
    return torch.full_like(y, null_label)


def cond_where(keep: Tensor, cond: Cond, other: Cond) -> Cond:
    """Per sample: ``cond`` where ``keep`` (B,) is True, else ``other`` (of the same structure)."""
    if cond is None:
        return None

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(keep.reshape(-1, *[1] * (a.ndim - 1)).to(a.device), a, b)

    if not isinstance(cond, Condition):
        return pick(cond, other)
    theirs = other.tensors()
    return Condition(**{k: pick(v, theirs[k]) for k, v in cond.tensors().items()})


def cond_cat(conds: list[Cond]) -> Cond:
    """Conditions of the same structure stacked along the batch (the doubled batch of guidance)."""
    first = conds[0]
    if first is None:
        return None
    if not isinstance(first, Condition):
        return torch.cat(conds)
    return Condition(**{k: torch.cat([c.tensors()[k] for c in conds]) for k in first.tensors()})


def drop_condition(cond: Cond, p: float, null_label: int | None) -> Cond:
    """Classifier-free guidance's training dropout (Ho & Salimans 2022, Alg. 1): each sample's whole condition is
    replaced by its null value with probability ``p`` (one uniform draw per sample)."""
    if cond is None or p == 0:
        return cond
    first = next(iter(cond.tensors().values())) if isinstance(cond, Condition) else cond
    drop = torch.rand(first.shape[:1], device=first.device) < p
    return cond_where(~drop, cond, null_condition(cond, null_label))
