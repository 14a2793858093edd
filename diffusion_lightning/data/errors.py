"""Exceptions raised by the data modules.

All of them derive from :class:`DatasetError`, so a training script can catch that single class early
(``datamodule.prepare_data()``) and print ``str(err)`` -- a single line -- instead of a stack trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class DatasetError(Exception):
    """Base class of every data-loading error of :mod:`diffusion_lightning.data`."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset files are not where they were expected and could not be downloaded.

    The message is one line naming the path(s) that were searched and the exact command(s) that put the data
    there. The same pieces are available as attributes: ``dataset``, ``paths``, ``commands``, ``reason`` and ``hint``.
    """

    def __init__(
        self,
        dataset: str,
        paths: Sequence[str | Path],
        commands: Sequence[str] = (),
        reason: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.dataset = dataset
        self.paths = [str(p) for p in paths]
        self.commands = list(commands)
        self.reason = reason
        self.hint = hint
        msg = f"{dataset} not found: looked in {' and '.join(self.paths)}"
        if reason:
            msg += f" ({reason})"
        if self.commands:
            msg += ". Get it with: " + "  OR  ".join(self.commands)
        if hint:
            msg += f". {hint}"
        super().__init__(msg)

    def __str__(self) -> str:  # FileNotFoundError's __str__ would prepend "[Errno ...]" for 2-arg forms
        return self.args[0]

    def __reduce__(self):  # keep it picklable (e.g. across DataLoader worker / DDP process boundaries)
        return type(self), (self.dataset, self.paths, self.commands, self.reason, self.hint)


class DatasetCorruptError(DatasetError, ValueError):
    """A dataset file exists but its content does not match the expected format."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"corrupt dataset file {self.path}: {problem} (delete it and get the data again)")

    def __reduce__(self):
        return type(self), (self.path, self.problem)
