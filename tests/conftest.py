"""Shared fixtures: Hydra composition of the real configs, tiny image folders."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Never download in tests; torch threads kept at the machine's size.
os.environ.setdefault("DIFFUSION_LIGHTNING_OFFLINE", "1")

# A tiny U-Net for 8x8 images: trains a step in milliseconds.
TINY_NET = [
    "model.net.model_channels=8",
    "model.net.channel_mult=[1,2]",
    "model.net.num_res_blocks=1",
    "model.net.attention_resolutions=[]",
    "model.net.num_groups=4",
    "model.net.dropout=0.0",
]
QUIET = [
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


@pytest.fixture
def compose_train(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml as the CLI would, with outputs under tmp_path."""

    def _compose(overrides: list[str], config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.root_dir = str(ROOT)
            cfg.paths.output_dir = str(tmp_path / "run")
            del cfg["hydra"]
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """20 smooth 8x8 grayscale images (random blobs) in a folder."""
    return make_image_folder(tmp_path / "images")


def make_image_folder(folder: Path) -> Path:
    """Write the 20 images of :func:`image_folder` into ``folder``."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:8, 0:8]
    for i in range(20):
        cy, cx = rng.uniform(2, 6, 2)
        img = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4)
        Image.fromarray(img.astype(np.uint8), mode="L").save(folder / f"{i:02d}.png")
    return folder


def cli_env() -> dict[str, str]:
    """The environment of a training process a test starts: one OpenMP thread, offline, and tests/ on PYTHONPATH
    (the processes import rank_probe's callbacks)."""
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSION_LIGHTNING_OFFLINE": "1", "PYTHONPATH": path}


def wait_for(folder: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until ``folder.glob(pattern)`` finds a file, failing if ``proc`` ends or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        if proc.poll() is not None:
            said = proc.communicate()  # whichever of stdout / stderr was piped
            raise AssertionError(f"the process ended before {pattern} appeared: {(said[1] or said[0] or '')[-3000:]}")
        assert time.monotonic() < deadline, f"{pattern} never appeared"
        time.sleep(0.1)


def folder_data(folder: Path, batch_size: int = 4) -> list[str]:
    return [
        "data=folder",
        f"data.root={folder}",
        "data.image_size=8",
        "data.channels=1",
        f"data.batch_size={batch_size}",
        "data.num_workers=0",
        "data.random_flip=false",
        "model.net.in_channels=1",
    ]


# ---------------------------------------------------------------------------------------------- make faults
# Tests marked ``@pytest.mark.fault(scenario, expected)`` are the fault scenarios; they note what they saw with the
# ``observed`` fixture, and `make faults` (pytest -m fault) prints them as a table.
_FAULTS: list[tuple[str, str, str, str]] = []


@pytest.fixture
def observed(request: pytest.FixtureRequest) -> list[str]:
    """What a fault test saw, in words (one entry per check), for the `make faults` table."""
    request.node.observed = []
    return request.node.observed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is None or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    seen = "; ".join(getattr(item, "observed", []))
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        seen = f"{seen}; " * bool(seen) + (crash.message.splitlines()[0] if crash else "failed")
    elif report.skipped:
        seen = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else "skipped"
    status = "pass" if report.passed else "skipped" if report.skipped else "FAIL"
    _FAULTS.append((marker.args[0], marker.args[1], seen, status))


def pytest_terminal_summary(terminalreporter: object) -> None:
    if not _FAULTS:
        return
    write = terminalreporter.write_line  # type: ignore[attr-defined]
    write("")
    write("| scenario | expected | observed | result |")
    write("|---|---|---|---|")
    for row in _FAULTS:
        write("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
