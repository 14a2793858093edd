"""Faults a long run meets: processes killed (SIGKILL mid-epoch, SIGKILL during a checkpoint write), the scheduler's
warning signal, non-finite losses skipped, a run folder that cannot be written or a disk too small. Each is a
`make faults` scenario (see conftest.py); the others are in test_train.py and test_slurm.py."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUIET, TINY_NET, cli_env, folder_data, make_image_folder, wait_for
from omegaconf import open_dict
from test_train import _assert_same_training_state, _fit_overrides

from diffusion_lightning.checkpoint import load_checkpoint
from diffusion_lightning.errors import UserError
from diffusion_lightning.train import train

STEPS = 10  # 5 batches of 4 per epoch (20 images): the kills below come in the middle of epoch 1


def _cli(run: Path, images: Path, *extra: str) -> list[str]:
    """A CLI training run of a tiny model in the run folder ``run``, slowed to 0.3 s a step."""
    return [
        sys.executable, "-m", "diffusion_lightning.train", *folder_data(images), *TINY_NET, *QUIET,
        "data.random_flip=true", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=null",
        "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4", "sampler.steps=2",
        "callbacks.ema.decay=0.9", "model.num_timesteps=50", "model.lr_scheduler.warmup_steps=2", "logger=csv",
        "trainer.precision=32-true", "callbacks.model_checkpoint.every_n_train_steps=3",
        "+callbacks.slow._target_=rank_probe.Slow", "+callbacks.slow.seconds=0.3", f"hydra.run.dir={run}", *extra,
    ]  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def straight(image_folder_module: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The last checkpoint of the same run, uninterrupted."""
    tmp = tmp_path_factory.mktemp("straight")
    _run(_cli(tmp / "run", image_folder_module), tmp)
    return load_checkpoint(tmp / "run" / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def image_folder_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images")


@pytest.mark.slow
@pytest.mark.fault("SIGKILL mid-epoch, then ckpt_path=last", "resumes from the newest checkpoint; final state bitwise "
                   "equal to an uninterrupted run")  # fmt: skip
def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(straight, image_folder_module, tmp_path, observed):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run, image_folder_module), cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(run, "checkpoints/step_00000006.ckpt", proc)
    time.sleep(0.5)  # into step 7 or 8: work after the checkpoint is lost with the process
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    observed.append(f"killed (exit {proc.returncode}) with last.ckpt at step "
                    f"{load_checkpoint(run / 'checkpoints' / 'last.ckpt')['global_step']}")  # fmt: skip
    resumed = _run(_cli(run, image_folder_module, "ckpt_path=last"), tmp_path)
    assert "ckpt_path=last: resuming from" in resumed.stderr + resumed.stdout or (run / "train.log").read_text()
    final = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == STEPS
    _assert_same_training_state(straight, final)
    observed.append(f"resumed to step {final['global_step']}; weights, EMA, Adam state bitwise equal")


@pytest.mark.slow
@pytest.mark.fault("SIGKILL during a checkpoint write", "the previous checkpoint still loads; the run resumes from "
                   "it to the uninterrupted result")  # fmt: skip
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(straight, image_folder_module, tmp_path, observed):
    run, marker = tmp_path / "run", tmp_path / "writing"
    # writes 1 and 2 are step_00000003.ckpt and last.ckpt; write 3 (step_00000006.ckpt) is cut off
    cmd = _cli(run, image_folder_module, "+callbacks.stall._target_=rank_probe.StallSave",
               f"+callbacks.stall.marker={marker}", "+callbacks.stall.call=3")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    wait_for(tmp_path, "writing", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = sorted(p.name for p in (run / "checkpoints").glob("*.tmp"))
    assert partial, "the write that was cut off left no temporary file"
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3
    observed.append(f"killed while writing ({', '.join(partial)} half written); last.ckpt loads (step 3)")
    _run(_cli(run, image_folder_module, "ckpt_path=last"), tmp_path)
    final = load_checkpoint(run / "checkpoints" / "last.ckpt")
    _assert_same_training_state(straight, final)
    observed.append(f"resumed to step {final['global_step']}, bitwise equal to the uninterrupted run")


@pytest.mark.slow
@pytest.mark.fault("USR2 (SLURM's warning signal) outside SLURM", "saves last.ckpt at the batch end, stops (exit 0) "
                   "with how to resume; resuming gives the uninterrupted result")  # fmt: skip
def test_the_warning_signal_saves_and_stops_and_the_run_resumes_bitwise(straight, image_folder_module, tmp_path,
                                                                         observed):  # fmt: skip
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run, image_folder_module), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip  (the log's console handler: stdout)
    wait_for(run, "checkpoints/step_00000003.ckpt", proc)
    proc.send_signal(signal.SIGUSR2)
    err, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped by SIGUSR2 at step" in err, err[-3000:]  # stopped as asked: no error
    step = load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 3 <= step < STEPS and not (run / "finished.json").exists()
    observed.append(f"stopped at step {step}: {err.strip().splitlines()[-1][:90]}...")
    _run(_cli(run, image_folder_module, "ckpt_path=last"), tmp_path)
    _assert_same_training_state(straight, load_checkpoint(run / "checkpoints" / "last.ckpt"))
    observed.append("resumed: bitwise equal to the uninterrupted run")


class PoisonBatch(L.Callback):
    """NaN in the images of the batch at global step 3."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            batch[0].fill_(float("nan"))


@pytest.mark.fault("NaN loss with nonfinite=skip", "the update is skipped and counted; the run finishes with "
                   "finite weights")  # fmt: skip
def test_a_non_finite_step_is_skipped_and_counted(compose_train, image_folder, tmp_path, observed):
    cfg = compose_train(_fit_overrides(image_folder, max_steps=6, log_every_n_steps=1) + ["nonfinite=skip"])
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": f"{__name__}.PoisonBatch"}
    out = train(cfg)
    assert out["trainer"].global_step == 6 and out["model"].skipped_steps == 1
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["current_model_state"].values())
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "version_0" / "metrics.csv").open()))
    skipped = {int(r["step"]): float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")}
    assert skipped == {3: 1.0}, skipped
    observed.append(f"step 3 skipped (train/skipped_steps={skipped[3]:.0f}); finished at step 6, weights finite")


@pytest.mark.fault("run folder cannot be written", "a clear error before training, naming the folder and the fix")
def test_an_unwritable_run_folder_is_refused_before_training(compose_train, image_folder, tmp_path, observed):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = compose_train(_fit_overrides(image_folder, max_steps=2))
    with open_dict(cfg):
        cfg.paths.output_dir = str(blocker / "run")
    with pytest.raises(UserError, match="cannot write the run folder .*paths.log_dir") as info:
        train(cfg)
    observed.append(str(info.value)[:110] + "...")


@pytest.mark.fault("too little disk space", "a clear error before training with the space needed")
def test_too_little_disk_space_is_refused_before_training(compose_train, image_folder, tmp_path, observed, monkeypatch):
    import shutil

    import diffusion_lightning.run_folder as entry

    monkeypatch.setattr(entry.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(UserError, match="1 MiB free .* needs about") as info:
        train(compose_train(_fit_overrides(image_folder, max_steps=2)))
    assert not (tmp_path / "run" / "checkpoints").exists()
    observed.append(str(info.value)[:110] + "...")
