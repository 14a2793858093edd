"""The recipes the benchmark measures, built as ``make train`` builds them: an experiment (with overrides) composed
from ``conf/``, its model instantiated with fresh weights. A recipe's prior stages are built the same way, untrained:
a student's teacher from ``teacher.experiment`` and a latent recipe's first stage from ``first_stage.experiment``
(with scale factor 1), so that no checkpoint is needed to time a distillation or latent recipe."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from ..errors import CONF_DIR
from ..models import Autoencoder
from ..models.run_module import RunModule


def fmnist_experiments() -> list[str]:
    """Every ``*_fmnist`` experiment of ``conf/experiment``, sorted."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*_fmnist.yaml"))


def cifar_experiments() -> list[str]:
    """Every ``*_cifar`` experiment of ``conf/experiment``, sorted."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*_cifar.yaml"))


@functools.cache
def scratch() -> Path:
    """A folder of this process for what a recipe writes while measured (reflow's pairs), removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="dl_bench_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def bench_overrides(experiment: str) -> list[str]:
    """What the benchmark changes in a recipe so that measuring it takes seconds, not what a step costs: reflow's
    pair set (generated once per process into :func:`scratch`, before any timed step) is 64 pairs at 2 steps."""
    if run_target(experiment).endswith(".Reflow"):
        return ["model.num_pairs=64", "model.pair_sampler={name: euler, steps: 2}",
                f"model.pairs_path={scratch() / experiment}_pairs.pt"]  # fmt: skip
    return []


def _compose(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


@functools.cache
def run_target(experiment: str) -> str:
    return str(_compose([f"experiment={experiment}"]).model._target_)


@functools.cache
def run_config(spec: str) -> DictConfig:
    """The training config of ``spec`` = ``"<experiment> [override ...]"``, composed as the training entry does (with
    :func:`bench_overrides`)."""
    experiment, *overrides = spec.split()
    return _compose([f"experiment={experiment}", *bench_overrides(experiment), *overrides])


def _prior_spec(cfg: DictConfig, slot: str) -> str | None:
    prior = cfg.get(slot)
    if not prior or not prior.get("experiment") or slot not in cfg.model or cfg.model[slot].get("path"):
        return None
    return " ".join([prior.experiment, *prior.get("overrides", [])])


def build(spec: str, *, channels_last: bool = False, compile: bool = False, seed: int = 0) -> RunModule:
    """``spec``'s LightningModule with fresh weights (seeded), its teacher or first stage built untrained."""
    cfg = run_config(spec)
    components: dict[str, Any] = {}
    if teacher := _prior_spec(cfg, "teacher"):
        components["teacher"] = build(teacher, seed=seed + 1)
    if first_stage := _prior_spec(cfg, "first_stage"):
        autoencoder = build(first_stage, seed=seed + 2)
        assert isinstance(autoencoder, Autoencoder), first_stage
        components["first_stage"] = autoencoder.latent_space(scale_factor=1.0)
    speed = {k: v for k, v in (("channels_last", channels_last), ("compile", compile)) if k in cfg.model}
    torch.manual_seed(seed)
    return instantiate(cfg.model, **components, **speed, _convert_="all")


def random_batches(model: RunModule, batch: int, steps: int, pin_memory: bool = False) -> DataLoader:
    """``steps`` batches of (images in [-1, 1], labels) cycled from a pool of 8 random ones (data loading is not what
    is measured); labels are drawn among the model's classes (zeros for an unconditional one)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8 * batch, *model.image_shape, generator=g) * 2 - 1
    classes = getattr(model, "num_classes", None) or 1
    labels = torch.randint(0, classes, (8 * batch,), generator=g)
    order = [i % len(images) for i in range(batch * steps)]
    return DataLoader(TensorDataset(images, labels), batch_size=batch, sampler=order, pin_memory=pin_memory)


def describe(spec: str, model: RunModule) -> dict[str, Any]:
    """What a row of the tables says about a recipe: its experiment, recipe class, trainable and frozen parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"experiment": spec, "recipe": type(model).__name__, "params": trainable, "frozen_params": frozen}


def ema_callbacks(spec: str) -> list[Any]:
    """The run's EMA callback as its config builds it (none where the experiment sets ``callbacks.ema=null``)."""
    ema = run_config(spec).callbacks.get("ema")
    return [instantiate(ema)] if ema else []


def gradient_clip(spec: str) -> float | None:
    return run_config(spec).trainer.get("gradient_clip_val")


def net_config(spec: str) -> dict[str, Any]:
    """The network keyword arguments of ``spec`` (its ``model.net``), without ``_target_``."""
    net = OmegaConf.to_container(run_config(spec).model.net, resolve=True)
    net.pop("_target_", None)
    return net


def rotations(names: list[str], repeats: int) -> Iterator[str]:
    """Each name ``repeats`` times, the order rotated every round, so drifts in machine load hit all alike."""
    for r in range(repeats):
        k = r % len(names)
        yield from names[k:] + names[:k]
