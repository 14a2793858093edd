"""DDP on CPU (gloo): two ranks with batch B train as one process with batch 2B, in one run folder.

The metric side (FID/KID/IS over ranks equal to one process on the same images) is tested in test_metrics_callback.py
(``test_ddp_two_processes_give_the_single_process_numbers``, ``test_callback_under_lightning_ddp``)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_NET, cli_env, folder_data

from diffusion_lightning.models.global_batch import GlobalBatchDraws


def test_global_batch_draws_are_slices_of_one_draw_for_the_global_batch():
    """Ranks 0..W-1 together draw exactly what one process with the global batch draws from the same state."""
    world, b = 3, 4
    x = torch.zeros(b, 2, 5)
    probs = torch.tensor([0.1, 0.2, 0.7])

    def draws() -> list[torch.Tensor]:
        return [torch.randn_like(x), torch.rand(b, dtype=torch.float64), torch.randint(0, 9, (b,)),
                torch.multinomial(probs, b, replacement=True), torch.randn(b, 3), torch.rand((b,)),
                torch.randn(7)]  # fmt: skip

    torch.manual_seed(5)
    one = [torch.randn_like(torch.zeros(world * b, 2, 5)), torch.rand(world * b, dtype=torch.float64),
           torch.randint(0, 9, (world * b,)), torch.multinomial(probs, world * b, replacement=True),
           torch.randn(world * b, 3), torch.rand((world * b,)), torch.randn(7)]  # fmt: skip
    per_rank = []
    for rank in range(world):
        shared = {"cpu": torch.Generator().manual_seed(5)}
        torch.manual_seed(100 + rank)  # the rank's own stream: used only by draws of other sizes
        torch.randn(7)
        with GlobalBatchDraws(b, world, rank, shared):
            per_rank.append(draws())
    for i, whole in enumerate(one[:-1]):
        joined = torch.cat([r[i] for r in per_rank])
        assert joined.dtype == whole.dtype and torch.equal(joined, whole), i
    # a draw of another size comes from the rank's own generator, untouched by the shared one
    torch.manual_seed(100)
    torch.randn(7)
    assert torch.equal(per_rank[0][-1], torch.randn(7))


def _train(tmp_path: Path, images: Path, name: str, *extra: str) -> Path:
    """One CLI training run (6 steps, tiny net, no dropout, random flips) in ``<tmp>/out/train/<name>/<time>``
    (``-m`` in ``extra``: a multirun, its folder)."""
    overrides = (
        folder_data(images) + TINY_NET + [
            "data.random_flip=true", "trainer.max_steps=6", "trainer.val_check_interval=null",
            "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4", "sampler.steps=2",
            "callbacks.ema.decay=0.9",
            "logger=csv", "trainer.log_every_n_steps=2", "trainer.precision=32-true",
            "callbacks.progress_bar=null", "callbacks.model_summary=null", f"paths.log_dir={tmp_path / 'out'}",
            f"run_name={name}", "+callbacks.probe._target_=rank_probe.SaveRankState",
            f"+callbacks.probe.dirpath={tmp_path / name}",
        ]
        + [e for e in extra if e != "-m"]
    )  # fmt: skip
    overrides = ["-m"] * ("-m" in extra) + overrides
    proc = subprocess.run([sys.executable, "-m", "diffusion_lightning.train", *overrides], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    runs = list((tmp_path / "out" / "train" / ("multirun" if "-m" in extra else name)).iterdir())
    assert len(runs) == 1, runs  # one run folder, whatever the number of ranks
    return runs[0]


def _losses(run: Path) -> dict[int, float]:
    rows = [r for f in run.glob("csv/*/metrics.csv") for r in csv.DictReader(f.open())]
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [
    ["model.num_timesteps=50"],  # DDPM: t ~ U{0..T-1} (randint), eps (randn_like)
    # importance-sampled t (multinomial), the loss history gathered over ranks
    ["model=iddpm", "model.net.out_channels=2", "model.loss_type=vlb", "model.num_timesteps=50"],
    ["experiment=ict_fmnist", "model.s0=2", "model.s1=8"],  # iCT: lognormal level pairs (multinomial)
    ["model=vdiff"],  # continuous time: t ~ U[0, 1] (rand, float64)
    # flow matching with OT pairing: logit-normal t (randn), the assignment solved on the gathered global batch
    ["model=fm", "model.coupling=ot", "sampler=euler"],
], ids=["ddpm", "iddpm-vlb", "ict", "vdiff", "fm-ot"])  # fmt: skip
def test_two_ranks_train_as_one_process_with_the_global_batch(image_folder, tmp_path, recipe):
    one = _train(tmp_path, image_folder, "one", "data.batch_size=4", *recipe)
    two = _train(tmp_path, image_folder, "two", "data.batch_size=2", "trainer=ddp", "trainer.accelerator=cpu",
                 "trainer.devices=2", *recipe)  # fmt: skip
    # the same loss curve (DDP logs the mean over ranks)
    curve_one, curve_two = _losses(one), _losses(two)
    assert sorted(curve_one) == sorted(curve_two) == [1, 3, 5]  # every 2nd step: the others are not logged
    for step, loss in curve_one.items():
        assert curve_two[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    # identical weights and EMA on both ranks, and those of the one process up to float rounding
    rank0, rank1 = (torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    for kind in ("raw", "ema"):
        for name, value in rank0[kind].items():
            assert torch.equal(rank1[kind][name], value), (kind, name)
            torch.testing.assert_close(value, single[kind][name], rtol=1e-4, atol=1e-5, msg=f"{kind}.{name}")
    # rank 1 wrote no folder of its own and no second config; rank 0 wrote the checkpoints and grids
    assert (two / ".hydra" / "config.yaml").is_file() and (two / "checkpoints" / "last.ckpt").is_file()
    assert (two / "grids" / "final.png").is_file()


@pytest.mark.slow
def test_a_multirun_of_ddp_jobs_makes_one_folder_per_job(image_folder, tmp_path):
    """Lightning re-runs ``sys.argv`` for the other ranks: for ``-m`` that was the whole sweep again, per rank."""
    sweep = _train(tmp_path, image_folder, "sweep", "-m", "seed=1,2", "data.batch_size=2", "trainer=ddp",
                   "model.num_timesteps=50",
                   "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2")  # fmt: skip
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "finished.json").is_file() and (sweep / job / "train_ddp_process_1.log").is_file()
