"""The run report (make report RUN=...): one self-contained page with a run's curves, grids over time, the
evaluations of its checkpoints and its config."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import QUIET, TINY_NET, folder_data

from diffusion_lightning.report import main, read_scalars, write_run_report
from diffusion_lightning.train import train


def test_run_report_holds_curves_grids_evaluations_and_config(compose_train, image_folder, tmp_path):
    cfg = compose_train([*folder_data(image_folder), *TINY_NET, *QUIET, "trainer.max_steps=6",
                         "trainer.val_check_interval=null", "trainer.limit_val_batches=1",
                         "trainer.log_every_n_steps=1", "callbacks.sample_grid.num_samples=4",
                         "callbacks.sample_grid.every_n_train_steps=3",
                         "callbacks.model_checkpoint.every_n_train_steps=3", "sampler.steps=2",
                         "model.num_timesteps=50"])  # fmt: skip
    train(cfg)
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- trainer.max_steps=6\n")
    scalars = read_scalars(run)
    assert [s for s, _ in scalars["train/loss"]] == list(range(6)) and "train/loss_q3" in scalars

    # two evaluations of its checkpoints and one of another run's, as evaluate appends them
    results = tmp_path / "results.jsonl"
    base = {"metric": "fid", "experiment": "ddpm_fmnist", "global_step": 6, "ema": True, "sampler": "ddim",
            "num_samples": 16, "fid": 50.0, "kid": 0.1, "kid_std": 0.01, "is": None, "wall_s": 1.0}  # fmt: skip
    lines = [{**base, "ckpt": str(run / "checkpoints" / "last.ckpt"), "steps": n, "nfe": n, "fid": 100.0 / n}
             for n in (2, 4)]  # fmt: skip
    lines.append({**base, "ckpt": str(tmp_path / "other" / "checkpoints" / "last.ckpt"), "steps": 2, "nfe": 2})
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))

    page = write_run_report(run, results=results)
    assert page == run / "report" / "report.md"
    md = page.read_text()
    for figure in ("curves.png", "fid_vs_nfe.png"):
        assert f"]({figure})" in md and (page.parent / figure).stat().st_size > 1000
    grids = ["step_00000003", "final"]  # in step order, copied into the report folder
    assert f"| {' | '.join(grids)} |" in md
    assert all((page.parent / "grids" / f"{g}.png").is_file() for g in grids)
    assert md.count("| ddpm_fmnist | 6 | yes | ddim |") == 2  # its own two evaluations only
    assert "- trainer.max_steps=6" in md and "max_steps: 6" in md  # overrides and the resolved config
    assert "Finished at step 6" in md

    out = main(["--run", str(run), "--out", str(tmp_path / "elsewhere"), "--results", str(results)])
    assert out["markdown"] == tmp_path / "elsewhere" / "report.md"
