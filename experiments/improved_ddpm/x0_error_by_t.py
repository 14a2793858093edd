"""How well checkpoints predict x_0 and eps at chosen timesteps, on real test images.

Usage: python experiments/improved_ddpm/x0_error_by_t.py CKPT [CKPT ...] [--t 0 100 500 900 980 995 999] [--images 256]
       python experiments/improved_ddpm/x0_error_by_t.py CKPT [CKPT ...] --alpha-bar 0.5 0.1 0.02 0.005
       python experiments/improved_ddpm/x0_error_by_t.py CKPT [CKPT ...] --chain 50 --t 20 41 61 102 245 510 754
Prints, per checkpoint and t: alpha_bar_t, the eps MSE, the RMSE of the predicted x_0 (before any clipping; an
eps error is multiplied by sqrt((1 - alpha_bar) / alpha_bar) there), its mean signed error (the bias: positive
means too bright), the RMSE after clipping to [-1, 1], and its largest magnitude. With --alpha-bar, each
checkpoint is probed at its own t nearest to each alpha_bar, which compares schedules at equal noise levels.

The variance columns are for the sampling chain of --chain steps (respaced as the samplers do; default: all T,
and each t snaps to the chain's nearest step): opt_frac is the interpolation frac of iDDPM eq. 15 (0: beta~,
1: beta of that chain) whose variance beta~ + coef1^2 mean((x0_hat - x_0)^2) minimises the step's KL term
given this network's mean (tests/unit/test_vlb.py), and frac the one a learned-variance network outputs, (v + 1) / 2.
The data set is the one the checkpoint was trained on (its run config).
"""

from __future__ import annotations

import argparse
import math

import torch
from hydra.utils import instantiate

import diffusion_lightning  # noqa: F401  (registers the config resolvers)
from diffusion_lightning.checkpoint import load_checkpoint, model_from_checkpoint
from diffusion_lightning.diffusion import space_timesteps
from diffusion_lightning.diffusion.vlb import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpts", nargs="+")
    parser.add_argument("--t", type=int, nargs="+", default=[0, 100, 500, 900, 980, 995, 999])
    parser.add_argument("--alpha-bar", type=float, nargs="+", help="probe at the t nearest these alpha_bar")
    parser.add_argument("--chain", type=int, help="steps of the sampling chain for the variance columns")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in args.ckpts:
        data_cfg = load_checkpoint(path)["run_config"]["data"]
        datamodule = instantiate({**data_cfg, "num_workers": 0})
        datamodule.prepare_data()
        dataset = datamodule.dataset("test")
        x0 = torch.stack([dataset[i][0] for i in range(min(args.images, len(dataset)))])
        model = model_from_checkpoint(path, ema=True).eval()
        diffusion, denoiser = model.diffusion, model.denoiser()
        chain_t = torch.tensor(space_timesteps(diffusion.num_timesteps, args.chain or diffusion.num_timesteps))
        chain = diffusion.respace(chain_t.tolist())
        g = torch.Generator().manual_seed(args.seed)
        print(f"{path} (variance columns on a chain of {len(chain_t)} steps)")
        ts = args.t
        if args.alpha_bar:  # nearest in log alpha_bar
            log_ab = diffusion.alphas_cumprod.double().log()
            ts = [int((log_ab - math.log(a)).abs().argmin()) for a in args.alpha_bar]
        for t in ts:
            i = int((chain_t - t).abs().argmin())  # the chain's step nearest t
            t = int(chain_t[i])
            tt = torch.full((len(x0),), t, dtype=torch.long)
            eps = torch.randn(x0.shape, generator=g)
            with torch.no_grad():
                pred = predict(denoiser, diffusion, diffusion.q_sample(x0, tt, eps), tt)
            x0_mse = float(((pred.x0 - x0) ** 2).mean())
            line = (
                f"  t={t:5d}  alpha_bar={float(diffusion.alphas_cumprod[t]):.2e}  "
                f"eps_mse={float(((pred.eps - eps) ** 2).mean()):.4f}  x0_rmse={math.sqrt(x0_mse):.2f}  "
                f"x0_bias={float((pred.x0 - x0).mean()):+.3f}  "
                f"clipped_rmse={float(((pred.x0.clamp(-1, 1) - x0) ** 2).mean().sqrt()):.3f}  "
                f"x0_absmax={float(pred.x0.abs().max()):.1f}"
            )
            if i > 0:
                beta, beta_tilde = float(chain.betas[i]), float(chain.posterior_variance[i])
                optimum = beta_tilde + float(chain.posterior_mean_coef1[i]) ** 2 * x0_mse
                line += f"  beta/beta~={beta / beta_tilde:.3g}"
                line += f"  opt_frac={math.log(optimum / beta_tilde) / math.log(beta / beta_tilde):.3f}"
            if pred.var_values is not None:
                line += f"  frac={float((pred.var_values + 1).mean() / 2):.3f}"
            print(line)


if __name__ == "__main__":
    main()
