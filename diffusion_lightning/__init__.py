"""diffusion-lightning: PyTorch Lightning + Hydra experiment framework for image diffusion models."""

import os

from omegaconf import OmegaConf

# ${dl_cwd:} is the directory a run was started from. Unlike ${hydra:runtime.cwd} it resolves before
# HydraConfig exists (multirun resolves hydra.sweep.dir first), and unlike $PWD it is right for
# processes started by other programs.
OmegaConf.register_new_resolver("dl_cwd", os.getcwd, replace=True)
