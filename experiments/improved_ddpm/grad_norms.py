"""Gradient norms of a recipe on real data, outside Lightning: the global norm of each step and, for iDDPM's
L_hybrid, the norms of its two parts (L_simple, and lambda L_vlb with the stop-gradient on the mean).

Answers two questions about a run: does ``trainer.gradient_clip_val`` ever bind after warm-up, and how large is
the L_vlb gradient next to L_simple's. Usage (CPU, ~1 s a step at batch 64 on 2 cores):
    python experiments/improved_ddpm/grad_norms.py experiment=iddpm_fmnist --steps 400 --split-every 10
Prints one summary line (median norms after --skip steps, the share of steps above the clip); --out writes every
step as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import diffusion_lightning  # noqa: F401  (registers the config resolvers)
from diffusion_lightning.models.base import weighted_mean

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=iddpm_fmnist")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--skip", type=int, default=100, help="steps left out of the summary (warm-up)")
    parser.add_argument("--split-every", type=int, default=10, help="measure the two parts of L_hybrid every N steps")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data.num_workers=0", *args.overrides])
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, _convert_="all")
    opt = model.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    params = list(model.parameters())

    def norm_of(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.nn.utils.get_total_norm([g for g in grads if g is not None]))

    rows: list[dict[str, float]] = []
    batches = iter(())
    for step in range(args.steps):
        batch = next(batches, None)
        if batch is None:
            batches = iter(datamodule.train_dataloader())
            batch = next(batches)
        x0, y = batch
        per_sample, terms = model.loss(x0, y)
        loss = weighted_mean((per_sample, terms))
        row = {"step": step, "loss": loss.item()}
        if "vlb" in terms and terms["mse"].requires_grad and step % args.split_every == 0:  # L_hybrid
            mse = terms["mse"].mean()
            row |= {"mse_grad_norm": norm_of(mse), "vlb_grad_norm": norm_of(loss - mse)}
        optimizer.zero_grad()
        loss.backward()
        row["grad_norm"] = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        optimizer.step()
        scheduler.step()
        rows.append(row)

    kept = rows[args.skip :]
    norms = [r["grad_norm"] for r in kept]
    summary = {
        "overrides": args.overrides, "steps": args.steps, "summary_from_step": args.skip,
        "median_grad_norm": statistics.median(norms), "max_grad_norm": max(norms),
        f"share_above_{args.clip:g}": sum(n > args.clip for n in norms) / len(norms),
    }  # fmt: skip
    split = [r for r in kept if "mse_grad_norm" in r]
    if split:
        summary["median_mse_grad_norm"] = statistics.median(r["mse_grad_norm"] for r in split)
        summary["median_vlb_grad_norm"] = statistics.median(r["vlb_grad_norm"] for r in split)
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f)


if __name__ == "__main__":
    main()
