"""Checkpoints of every training recipe from before the LightningModule refactor load, sample as they did and resume.

``tests/fixtures/recipes/`` was written by ``make_fixtures.py`` at commit c7dd512: one tiny checkpoint per recipe
(DDPM, improved DDPM, the stage-1 autoencoder and latent diffusion on it, the continuous-time v model, progressive
distillation, consistency distillation and tuning from it, CT and iCT), written with the teacher / first stage in a
folder deleted before sampling, and ``samples.pt``: per recipe the overrides it was trained with, its global step,
fixed noise and labels, and ``model.sample`` outputs for a few sampler settings (for the autoencoder, reconstructions).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import folder_data

from diffusion_lightning.checkpoint import load_checkpoint, model_from_checkpoint
from diffusion_lightning.train import train

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "recipes"
RECIPES = ["ddpm", "iddpm", "vdiff", "pd", "cd", "ect", "ct", "ict", "ae", "ldm"]

# What a resume adds after the overrides the fixture was trained with (samples.pt): the checkpoint a recipe builds on,
# under the model config key that takes it. "{vdiff}" / "{ae}" are copies of those fixtures in the test's tmp_path.
# Since issue 29 the teacher and the first stage are components whose loaders take the checkpoint's path.
RESUME_OVERRIDES: dict[str, list[str]] = {
    "ddpm": [],
    # `experiment=ddpm_fmnist model=iddpm` now takes the experiment's network whole (conf/net/unet_small); at
    # c7dd512 the iDDPM model's own net keys were merged into it
    "iddpm": ["model.net.use_scale_shift_norm=true", "model.net.num_heads=4"],
    "vdiff": [],
    "pd": ["model.teacher.path={vdiff}"],
    "cd": ["model.teacher.path={vdiff}"],
    "ect": ["model.teacher.path={vdiff}"],
    # recorded under ddpm_fmnist's sampler.steps=100, which no consistency model can take (refused before training
    # since issue 30; the recording had no grids, so it never sampled with it)
    "ct": ["sampler.steps=1"],
    "ict": [],
    "ae": [],
    "ldm": ["model.first_stage.path={ae}"],
}
# Config keys of the stored overrides renamed since c7dd512: {old key: new key}, for "old key=..." and "old key.x=..."
RENAMED: dict[str, str] = {"model.scale_batches": "model.first_stage.scale_batches"}
# The fixtures a recipe's resume reads (the placeholders of RESUME_OVERRIDES)
PRIORS = {"pd": "vdiff", "cd": "vdiff", "ect": "vdiff", "ldm": "ae"}
ATOL = 1e-5


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return torch.load(FIXTURES / "samples.pt", weights_only=True)


def renamed(override: str) -> str:
    for old, new in RENAMED.items():
        prefix = override[1:] if override.startswith("+") else override
        if prefix.startswith((f"{old}=", f"{old}.")):
            return override.replace(old, new, 1)
    return override


def test_the_fixtures_cover_every_recipe_and_were_written_without_their_teachers(recorded):
    assert recorded["commit"] == "c7dd512" and sorted(recorded["recipes"]) == sorted(RECIPES)
    for name, entry in recorded["recipes"].items():
        assert (FIXTURES / f"{name}.ckpt").is_file(), name
        if entry["prior"]:  # the teacher / first stage the recipe was trained from is gone
            fixture, key = entry["prior"]
            stored = torch.load(FIXTURES / f"{name}.ckpt", weights_only=True)["run_config"]  # as written
            for part in key.split("."):
                stored = stored[part]
            assert fixture == PRIORS[name] and not Path(stored).exists(), (name, stored)


@pytest.mark.parametrize("name", RECIPES)
def test_old_checkpoint_samples_as_recorded(name, recorded):
    entry = recorded["recipes"][name]
    path = FIXTURES / f"{name}.ckpt"
    model = model_from_checkpoint(path, generative=name != "ae")  # EMA weights
    assert model.checkpoint_meta["global_step"] == entry["global_step"]
    noise, y = entry["noise"], entry["y"]
    assert entry["samples"]
    for label, kwargs, seed, expected in entry["samples"]:
        if label == "reconstruct":
            out = model.reconstruct(noise)
        else:
            out = model.sample(noise=noise, y=y, generator=torch.Generator().manual_seed(seed), **kwargs)
        assert out.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=ATOL, msg=lambda m, label=label: f"{name}/{label}: {m}")


@pytest.mark.parametrize("name", RECIPES)
def test_old_checkpoint_resumes_training(name, recorded, compose_train, image_folder, tmp_path):
    entry = recorded["recipes"][name]
    before = (FIXTURES / f"{name}.ckpt").stat()
    ckpt = tmp_path / f"{name}.ckpt"  # resumed from a copy: the fixture folder is never written
    shutil.copy(FIXTURES / f"{name}.ckpt", ckpt)
    priors = {}
    if name in PRIORS:
        priors[PRIORS[name]] = tmp_path / f"prior_{PRIORS[name]}.ckpt"
        shutil.copy(FIXTURES / f"{PRIORS[name]}.ckpt", priors[PRIORS[name]])
    steps = entry["global_step"] + 2
    # the recorded batch (a resume keeps its run's global batch); the recipe sets its own channels
    data = [o for o in folder_data(image_folder, batch_size=8) if not o.startswith("model.")]
    overrides = [*data, *map(renamed, recorded["common"]), *map(renamed, entry["overrides"]),
                 *(o.format(**priors) for o in RESUME_OVERRIDES[name]), f"ckpt_path={ckpt}",
                 f"trainer.max_steps={steps}"]  # fmt: skip
    out = train(compose_train(overrides))
    assert out["trainer"].global_step == steps
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file() and load_checkpoint(last)["global_step"] == steps
    after = (FIXTURES / f"{name}.ckpt").stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
