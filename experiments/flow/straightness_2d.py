"""Straightness of learned flows on 2-D data (issue 32, must-hold 2): I-CFM, OT-CFM and 2-rectified flow (reflow of
I-CFM) from 8 Gaussians to two moons, 3+ seeds. Normalised path energy (Tong et al. 2024, Sec. 5.1):
NPE = |E int_0^1 ||v(x_t, t)||^2 dt - W2^2(q0, q1)| / W2^2(q0, q1), the path energy of the learned ODE from the
source against the squared Wasserstein-2 distance of the two distributions (zero for straight, optimal paths); and
the W2 distance of one Euler step's samples to the target (a straighter flow needs fewer steps).

The math is the package's (diffusion_lightning/diffusion/flow.py: the straight path x_t = (1 - t) x0 + t x1 with t = 1
the source, the velocity x1 - x0, the exact minibatch OT pairing); the network is a small MLP trained by a plain loop.
``python experiments/flow/straightness_2d.py [--seeds 0,1,2] [--steps 4000] [--out outputs/flow2d.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from diffusion_lightning.diffusion.flow import ot_pairing


def eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    """The source q1: 8 Gaussians (std 0.1) on a circle of radius 2 (Tong et al.'s 8gaussians, scaled)."""
    k = torch.randint(0, 8, (n,), generator=g)
    centres = torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1) * 2
    return centres + 0.1 * torch.randn(n, 2, generator=g)


def moons(n: int, g: torch.Generator) -> torch.Tensor:
    """The target q0: two interleaved half circles with noise 0.05, centred (sklearn's make_moons, re-drawn)."""
    a = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(a), 1 - torch.cos(a))
    y = torch.where(upper, torch.sin(a), 0.5 - torch.sin(a))
    return (torch.stack([x, y], 1) - torch.tensor([0.5, 0.25])) * 1.5 + 0.05 * torch.randn(n, 2, generator=g)


class MLP(nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SELU(), nn.Linear(width, width), nn.SELU(),
                                 nn.Linear(width, width), nn.SELU(), nn.Linear(width, 2))  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], 1))


def train(pairs, steps: int, batch: int, ot: bool, seed: int) -> MLP:
    """Flow matching on x_t = (1 - t) x0 + t x1, t ~ U(0, 1), target v = x1 - x0; ``pairs(n, g)`` draws (x0, x1)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1000)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x0, x1 = pairs(batch, g)
        if ot:
            x1 = x1[ot_pairing(x0, x1)]
        t = torch.rand(batch, generator=g)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
        loss = (model(x_t, t) - (x1 - x0)).square().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def integrate(model: MLP, x1: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Euler from t = 1 (source) to t = 0 (target); returns the end points and the path energy E int ||v||^2 dt."""
    x, energy, dt = x1.clone(), 0.0, 1.0 / steps
    for i in range(steps, 0, -1):
        v = model(x, torch.full((len(x),), i / steps))
        energy += float(v.square().sum(1).mean()) * dt
        x = x - dt * v
    return x, energy


def w2_squared(a: torch.Tensor, b: torch.Tensor) -> float:
    """The squared W2 distance of two equal-size empirical samples (exact assignment)."""
    cost = torch.cdist(a.double(), b.double()).square()
    row, col = linear_sum_assignment(cost.numpy())
    return float(cost[row, col].mean())


def run(seed: int, steps: int, batch: int, n_eval: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(10_000 + seed)
    source, target = eight_gaussians(n_eval, g), moons(n_eval, g)
    w2 = w2_squared(source, target)

    def independent(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return moons(n, gen), eight_gaussians(n, gen)

    models = {"I-CFM": train(independent, steps, batch, False, seed),
              "OT-CFM": train(independent, steps, batch, True, seed)}  # fmt: skip
    # 2-rectified flow: pairs (x0 = the I-CFM flow's end point, x1 = its source point), a fixed coupling
    pool_x1 = eight_gaussians(20 * batch, g)
    pool_x0, _ = integrate(models["I-CFM"], pool_x1, 100)

    def reflow(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(pool_x1), (n,), generator=gen)
        return pool_x0[i], pool_x1[i]

    models["2-RF"] = train(reflow, steps, batch, False, seed)
    out = {}
    for name, model in models.items():
        end, energy = integrate(model, source, 100)
        one_step, _ = integrate(model, source, 1)
        out[name] = {"npe": abs(energy - w2) / w2, "w2_100_steps": math.sqrt(w2_squared(end, target)),
                     "w2_1_step": math.sqrt(w2_squared(one_step, target)), "path_energy": energy,
                     "w2_sq": w2}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--eval", type=int, default=2000, help="samples of the evaluation (the W2 assignment)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    start = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {seed: run(seed, args.steps, args.batch, args.eval) for seed in seeds}
    summary = {}
    for name in runs[seeds[0]]:
        summary[name] = {}
        for key in ("npe", "w2_1_step", "w2_100_steps"):
            values = [runs[s][name][key] for s in seeds]
            summary[name][key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        print(f"{name:7s} NPE {summary[name]['npe'][0]:.3f} ± {summary[name]['npe'][1]:.3f}   "
              f"W2 1 step {summary[name]['w2_1_step'][0]:.3f} ± {summary[name]['w2_1_step'][1]:.3f}   "
              f"W2 100 steps {summary[name]['w2_100_steps'][0]:.3f} ± {summary[name]['w2_100_steps'][1]:.3f}")
    result = {"args": vars(args), "seconds": round(time.time() - start), "runs": runs, "summary": summary}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
