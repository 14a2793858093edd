"""Training draws made for the global batch under DDP, so that W ranks with batch B train as one process with batch W B.

A recipe draws its per-sample randomness (t or sigma, the noise, label dropout, level pairs) with plain torch calls
(``torch.randn_like(x0)``, ``torch.randint(0, T, (B,))``, ...). Inside :class:`GlobalBatchDraws` every such draw whose
first dimension is this rank's batch size B is made for W B samples from a generator that all ranks share (same seed,
same state), and rank r keeps rows [r B, (r + 1) B). With the data split the same way (rank r takes the r-th B of
every global batch, :class:`~diffusion_lightning.data.base.EpochSampler`), each sample of the global batch meets the
t and noise it meets in a one-process run with batch W B, which draws the same numbers from its default generator:
the two runs' losses and (DDP averages the gradients) updates agree to float tolerance. Per-rank noise still differs
(other rows), and the global seed alone fixes the run. Draws of another first dimension (a network's dropout masks)
use the rank's own default generator, which is seeded per rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_LIKE = {torch.randn_like: torch.randn, torch.rand_like: torch.rand}


def _size(args: tuple[Any, ...]) -> tuple[int, ...]:
    """The size of ``torch.randn(2, 3)`` or ``torch.randn((2, 3))`` (a size given as ``size=`` is not matched)."""
    return tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else tuple(args)


class GlobalBatchDraws(TorchFunctionMode):
    """While active, ``randn``/``rand`` (and their ``_like``), ``randint`` and ``multinomial`` draws of ``batch_size``
    rows are drawn for ``world_size * batch_size`` rows from ``generators`` (one per device type, the same state on
    every rank) and sliced to rank ``rank``'s rows; other calls run unchanged."""

    def __init__(self, batch_size: int, world_size: int, rank: int, generators: dict[str, torch.Generator]) -> None:
        super().__init__()
        self.batch_size, self.world_size, self.rank, self.generators = batch_size, world_size, rank, generators

    def _generator(self, device: torch.device | str | None) -> torch.Generator:
        kind = torch.device(device if device is not None else "cpu").type
        return self.generators[kind]

    def _slice(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        kwargs.pop("generator", None)
        b, global_b = self.batch_size, self.batch_size * self.world_size
        if func in _LIKE and args[0].shape[:1] == (b,):
            x = args[0]
            dtype, device = kwargs.pop("dtype", None) or x.dtype, kwargs.pop("device", None) or x.device
            kwargs.pop("memory_format", None)
            out = _LIKE[func]((global_b, *x.shape[1:]), dtype=dtype, device=device,
                              generator=self._generator(device), **kwargs)  # fmt: skip
            return self._slice(out)
        if func in (torch.randn, torch.rand) and (size := _size(args))[:1] == (b,):
            out = func((global_b, *size[1:]), generator=self._generator(kwargs.get("device")), **kwargs)
            return self._slice(out)
        if func is torch.randint and args and not isinstance(args[-1], int) and tuple(args[-1])[:1] == (b,):
            size, bounds = tuple(args[-1]), args[:-1]
            out = func(*bounds, (global_b, *size[1:]), generator=self._generator(kwargs.get("device")), **kwargs)
            return self._slice(out)
        if func is torch.multinomial and len(args) > 1 and args[1] == b:
            out = func(args[0], global_b, *args[2:], generator=self._generator(args[0].device), **kwargs)
            return self._slice(out)
        return func(*args, **kwargs)
