"""FID of a learned-variance checkpoint sampled with the KL-optimal variance of each step of the chain.

Usage: python experiments/improved_ddpm/oracle_variance_fid.py ckpt=PATH sampler=ddpm sampler.steps=50
[--oracle-images=256] [any evaluate override]

An ablation, not a sampler: it asks how much of a respaced chain's sample quality is lost to the variance
alone. Before sampling, each step i > 0 of the respaced chain (``steps``) gets the frac of iDDPM eq. 15 (0: that
chain's beta~, 1: its beta) whose variance beta~ + coef1^2 E[(clip(x0_hat) - x_0)^2] minimises the step's KL
term given the network's own mean, measured on --oracle-images test images (the estimate of
experiments/improved_ddpm/x0_error_by_t.py, here with the clipped x_0 the sampler uses). The network's mean is kept; its
variance output v is replaced by 2 frac - 1. The rest is ``diffusion_lightning.evaluate`` (same overrides, same
JSON line, with ``oracle_frac`` added to it).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

import diffusion_lightning.evaluate as evaluate_entry
from diffusion_lightning.checkpoint import load_checkpoint, model_from_checkpoint
from diffusion_lightning.diffusion import space_timesteps
from diffusion_lightning.diffusion.vlb import predict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@torch.no_grad()
def optimal_fracs(model: torch.nn.Module, x0: torch.Tensor, steps: int | str, seed: int = 0) -> dict[int, float]:
    """{original t: KL-optimal frac} for every step i > 0 of the respaced chain."""
    diffusion, denoiser = model.diffusion, model.denoiser()
    chain_t = space_timesteps(diffusion.num_timesteps, steps)
    chain = diffusion.respace(chain_t)
    g = torch.Generator().manual_seed(seed)
    fracs = {}
    for i, t in enumerate(chain_t):
        if i == 0:
            continue  # the decoder step: sampling returns its mean
        tt = torch.full((len(x0),), t, dtype=torch.long)
        x_t = diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        mse = float(((predict(denoiser, diffusion, x_t, tt).x0.clamp(-1, 1) - x0) ** 2).mean())
        beta, beta_tilde = float(chain.betas[i]), float(chain.posterior_variance[i])
        optimum = beta_tilde + float(chain.posterior_mean_coef1[i]) ** 2 * mse
        fracs[t] = math.log(optimum / beta_tilde) / math.log(beta / beta_tilde)
    return fracs


def oracle_model(path: str, ema: bool, images: int, steps: int | str):
    model = model_from_checkpoint(path, ema=ema).eval()
    if model.variance_type != "learned_range":
        raise SystemExit(f"{path}: not a learned-variance (learned_range) checkpoint")
    data_cfg = load_checkpoint(path)["run_config"]["data"]
    datamodule = instantiate({**data_cfg, "num_workers": 0})
    datamodule.prepare_data()
    dataset = datamodule.dataset("test")
    x0 = torch.stack([dataset[i][0] for i in range(min(images, len(dataset)))])
    fracs = optimal_fracs(model, x0, steps)
    print("oracle frac by t:", {t: round(f, 3) for t, f in fracs.items()})
    table = torch.full((model.diffusion.num_timesteps,), float("nan"))
    for t, f in fracs.items():
        table[t] = f
    forward = model.forward
    channels = model.image_shape[0]

    def forward_with_oracle_variance(x_t, t, y=None):
        out = forward(x_t, t, y)
        frac = table.to(out.device)[t]
        known = ~torch.isnan(frac)  # t = 0 (and any t off the chain) keeps the network's own v
        v = torch.where(known[:, None, None, None], (2 * frac.nan_to_num() - 1)[:, None, None, None], out[:, channels:])
        return torch.cat([out[:, :channels], v.to(out.dtype)], dim=1)

    model.forward = forward_with_oracle_variance
    model.oracle_fracs = fracs
    return model


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--oracle-images=")]
    images = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--oracle-images=")), 256)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=args, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(cfg.results).parent)
        del cfg["hydra"]
    if cfg.get("sampler") is None or cfg.sampler.name != "ddpm":
        raise SystemExit("give sampler=ddpm sampler.steps=N: the oracle replaces the ancestral sampler's variance")
    evaluate_entry.model_from_checkpoint = lambda path, ema=True: oracle_model(path, ema, images, cfg.sampler.steps)
    evaluate_fid = evaluate_entry.evaluate_fid
    evaluate_entry.evaluate_fid = lambda cfg, model, device: {
        **evaluate_fid(cfg, model, device), "oracle_frac": model.oracle_fracs, "oracle_images": images
    }
    evaluate_entry.evaluate(cfg)


if __name__ == "__main__":
    main()
