"""End-to-end training through the Hydra configs: experiments, resume, checkpoints, bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUIET, ROOT, TINY_NET, cli_env, folder_data
from hydra.errors import ConfigCompositionException, InstantiationException
from omegaconf import open_dict

from diffusion_lightning.checkpoint import load_checkpoint, model_from_checkpoint
from diffusion_lightning.errors import CheckpointError, UserError
from diffusion_lightning.train import train


def _fit_overrides(folder: Path, **trainer: object) -> list[str]:
    return (
        folder_data(folder)
        + TINY_NET
        + QUIET
        + [f"trainer.{k}={v}" for k, v in trainer.items()]
        + [
            "trainer.val_check_interval=null",
            "trainer.limit_val_batches=1",
            "callbacks.sample_grid.num_samples=4",
            "sampler.steps=2",
            "callbacks.ema.decay=0.9",
            "model.num_timesteps=50",
            "model.lr_scheduler.warmup_steps=2",
            "logger=csv",
        ]
    )


def test_ddpm_fmnist_experiment_trains(compose_train):
    cfg = compose_train(
        ["experiment=ddpm_fmnist", "trainer.max_steps=3", "data.batch_size=8", "data.num_workers=0",
         "callbacks.model_checkpoint.every_n_train_steps=2",
         "trainer.val_check_interval=null", "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4",
         "sampler.steps=2", *QUIET]
    )
    out = train(cfg)
    trainer = out["trainer"]
    assert trainer.global_step == 3
    run = Path(cfg.paths.output_dir)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "grids" / "final.png").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")  # weights_only=True
    assert ckpt["global_step"] == 3  # the final step, not the last periodic save (step 2)
    assert load_checkpoint(run / "checkpoints" / "step_00000002.ckpt")["global_step"] == 2
    assert ckpt["run_config"]["model"]["net"]["in_channels"] == 1
    assert {"state_dict", "current_model_state", "averaging_state"} <= set(ckpt)


def test_ddpm_cifar_experiment_trains_paper_model(compose_train, tmp_path):
    """The paper's 35.7M network on a tiny CIFAR-10 fixture written in CIFAR's own format."""
    from test_data import write_cifar

    write_cifar(tmp_path / "data")
    # No checkpoints: the paper model's (weights, EMA, Adam) would write 547 MB for nothing.
    cfg = compose_train(
        ["experiment=ddpm_cifar", f"paths.data_dir={tmp_path / 'data'}", "trainer.max_steps=1", "data.batch_size=2",
         "data.num_workers=0", "trainer.limit_val_batches=0", "callbacks.sample_grid=null",
         "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false", *QUIET]
    )
    assert cfg.model.optimizer.lr == 2e-4 and cfg.model.lr_scheduler.warmup_steps == 5000 and cfg.data.batch_size == 2
    assert cfg.callbacks.ema.decay == 0.9999 and cfg.trainer.gradient_clip_val == 1.0 and cfg.data.random_flip
    out = train(cfg)
    n_params = sum(p.numel() for p in out["model"].net.parameters())
    assert round(n_params / 1e6, 1) == 35.7
    assert out["trainer"].global_step == 1
    assert not list(tmp_path.rglob("*.ckpt"))


def test_resume_continues_exactly(compose_train, image_folder, tmp_path):
    """Two epochs in one go == one epoch, then resume from last.ckpt for the second."""
    base = _fit_overrides(image_folder, max_epochs=2, max_steps=-1)
    full = train(compose_train(base))
    steps_per_epoch = full["trainer"].global_step // 2
    # one grid per epoch, except the last epoch's, which would repeat final.png (same weights)
    assert sorted(p.name for p in (tmp_path / "run" / "grids").glob("*.png")) == ["epoch_0000.png", "final.png"]

    first_cfg = compose_train(_fit_overrides(image_folder, max_epochs=1, max_steps=-1))
    with open_dict(first_cfg):
        first_cfg.paths.output_dir = str(tmp_path / "first")
    train(first_cfg)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed_cfg = compose_train(base + [f"ckpt_path={last}"])
    with open_dict(resumed_cfg):
        resumed_cfg.paths.output_dir = str(tmp_path / "resumed")
    resumed = train(resumed_cfg)

    assert resumed["trainer"].global_step == full["trainer"].global_step == 2 * steps_per_epoch
    a = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    _assert_same_training_state(a, b)


def _assert_same_training_state(a: dict, b: dict) -> None:
    for key in ("state_dict", "current_model_state", "averaging_state"):  # EMA, raw weights, EMA count
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_b[i][k], opt_a[i][k], rtol=0, atol=0)


@pytest.mark.parametrize("resume_step", [3, 6])
def test_resume_mid_epoch_continues_exactly(compose_train, image_folder, tmp_path, resume_step):
    """A preempted run resumed from a periodic checkpoint written mid-epoch (4 batches per epoch; step 3 is in
    epoch 0, step 6 in epoch 1), with random flips and validation inside the epoch, ends exactly where the
    uninterrupted run ends: same weights, EMA and optimizer state."""
    base = _fit_overrides(image_folder, max_epochs=2, max_steps=-1, val_check_interval=2) + [
        "data.random_flip=true", "callbacks.model_checkpoint.every_n_train_steps=3",
    ]
    full = train(compose_train(base))
    assert full["trainer"].global_step == 8
    periodic = tmp_path / "run" / "checkpoints" / f"step_{resume_step:08d}.ckpt"
    assert load_checkpoint(periodic)["global_step"] == resume_step

    resumed_cfg = compose_train(base + [f"ckpt_path={periodic}"])
    with open_dict(resumed_cfg):
        resumed_cfg.paths.output_dir = str(tmp_path / "resumed")
    resumed = train(resumed_cfg)
    assert resumed["trainer"].global_step == 8
    _assert_same_training_state(
        load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt"),
        load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt"),
    )


@pytest.mark.parametrize("first_chunk", [3, 4], ids=["mid-epoch", "epoch-end"])
@pytest.mark.parametrize("recipe", [[], ["model=iddpm", "model.net.out_channels=2"]], ids=["ddpm", "iddpm"])
def test_training_in_chunks_continues_exactly(compose_train, image_folder, tmp_path, recipe, first_chunk):
    """A run that *ended* at max_steps=3 (mid-epoch) or 4 (the end of epoch 0), continued from its last.ckpt with
    max_steps=8, ends where a straight 8-step run ends. This is how experiments/improved_ddpm/fmnist_ddpm_vs_iddpm.sh
    trains in chunks (UNTIL=...) that fit time-limited jobs; a periodic checkpoint of the same run is tested above."""
    base = _fit_overrides(image_folder, max_epochs=-1, val_check_interval=2, log_every_n_steps=1) + recipe + [
        "data.random_flip=true"
    ]
    straight = train(compose_train(base + ["trainer.max_steps=8"]))
    assert straight["trainer"].global_step == 8

    first_cfg = compose_train(base + [f"trainer.max_steps={first_chunk}"])
    with open_dict(first_cfg):
        first_cfg.paths.output_dir = str(tmp_path / "chunk")
    train(first_cfg)
    last = tmp_path / "chunk" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == first_chunk
    # The same run folder, as the script does, and another checkpoint interval (the script's grows with STEPS):
    # last.ckpt must still be overwritten, not left stale beside a last-v1.ckpt.
    continued_cfg = compose_train(
        base + ["trainer.max_steps=8", f"ckpt_path={last}", "callbacks.model_checkpoint.every_n_train_steps=5"]
    )
    with open_dict(continued_cfg):
        continued_cfg.paths.output_dir = str(tmp_path / "chunk")
    assert train(continued_cfg)["trainer"].global_step == 8
    # Both chunks' metrics survive in the run folder (Lightning deletes a metrics.csv it would write over).
    files = (tmp_path / "chunk" / "csv").rglob("metrics.csv")
    logged = {int(row["step"]) for f in files for row in csv.DictReader(f.open())}
    assert min(logged) < first_chunk <= max(logged), logged
    _assert_same_training_state(
        load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt"),
        load_checkpoint(tmp_path / "chunk" / "checkpoints" / "last.ckpt"),
    )


def test_grad_norm_is_logged_before_clipping(compose_train, image_folder, tmp_path):
    """train/grad_norm is the global norm before clipping: with a clip of 1e-6 it still shows the real size."""
    cfg = compose_train(
        _fit_overrides(image_folder, max_steps=3, gradient_clip_val=1e-6, log_every_n_steps=1)
    )
    train(cfg)
    with open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv") as f:
        norms = [float(r["train/grad_norm"]) for r in csv.DictReader(f) if r.get("train/grad_norm")]
    assert len(norms) == 3
    assert all(1e-3 < n < 1e3 for n in norms), norms


def test_sample_entry_from_checkpoint(compose_train, image_folder, tmp_path):
    from diffusion_lightning.sample import sample_from_config

    train(compose_train(_fit_overrides(image_folder, max_steps=2)))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        [f"ckpt={ckpt}", "sampler=ddpm", "sampler.steps=5", "num_samples=6", "batch_size=4", "save_npz=true",
         f"out={tmp_path / 'grid.png'}"],
        config_name="sample",
    )
    out = sample_from_config(cfg)
    assert out.is_file()
    import numpy as np

    samples = np.load(out.with_suffix(".npz"))["samples"]
    assert samples.shape == (6, 8, 8, 1) and samples.dtype == np.uint8
    ema = model_from_checkpoint(ckpt, ema=True)
    raw = model_from_checkpoint(ckpt, ema=False)
    assert any(not torch.equal(p, q) for p, q in zip(ema.parameters(), raw.parameters(), strict=True))


@pytest.mark.fault("NaN loss (nonfinite=stop)", "stops naming the step; the last good checkpoint stays")
def test_nan_loss_stops_with_step_and_keeps_checkpoint(compose_train, image_folder, tmp_path, observed):
    class PoisonAtStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    next(pl_module.net.parameters()).fill_(float("nan"))

    every_step = ["callbacks.model_checkpoint.every_n_train_steps=1"]
    cfg = compose_train(_fit_overrides(image_folder, max_steps=10) + every_step)
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": f"{__name__}.PoisonAtStep"}
    globals()["PoisonAtStep"] = PoisonAtStep
    with pytest.raises(FloatingPointError, match="global step 3") as info:
        train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["current_model_state"].values())
    observed.append(f"{str(info.value)[:60]}...; last.ckpt at step 3, finite")


@pytest.mark.fault("unknown config key, unknown experiment, image size the net cannot take",
                   "a clear error at composition or build")
def test_bad_config_errors(compose_train, image_folder, observed):
    with pytest.raises(ConfigCompositionException, match="not_a_key"):
        compose_train(["trainer.not_a_key=1"])
    with pytest.raises(ConfigCompositionException, match="no_such_experiment"):
        compose_train(["experiment=no_such_experiment"])
    cfg = compose_train(folder_data(image_folder) + TINY_NET + QUIET + ["data.image_size=9"])
    with pytest.raises(InstantiationException, match="divisible"):
        train(cfg)
    # the default experiment's scheduler keys over a model without a scheduler (iCT): named, not "not callable"
    cfg = compose_train(folder_data(image_folder) + TINY_NET + QUIET + ["model=ict"])
    with pytest.raises(InstantiationException, match=r"model.lr_scheduler is \{'warmup_steps': 100\}, with no"):
        train(cfg)
    observed.append("ConfigCompositionException naming not_a_key / no_such_experiment; image_size=9: 'divisible'; "
                    "a scheduler's keys without its _target_: named")


@pytest.mark.fault("bad checkpoints: other model, other schedule, truncated, pickled code, not Lightning",
                   "a clear error each, before any step")
def test_checkpoint_errors(compose_train, image_folder, tmp_path, observed):
    train(compose_train(_fit_overrides(image_folder, max_steps=1)))
    good = tmp_path / "run" / "checkpoints" / "last.ckpt"
    # another architecture
    wider = ["model.net.model_channels=12", f"ckpt_path={good}"]
    other = compose_train(_fit_overrides(image_folder, max_steps=2) + wider)
    with pytest.raises(CheckpointError, match=r"other settings than these: model.net.model_channels: \d+ -> 12"):
        train(other)  # continuing the run with another network
    other = compose_train(_fit_overrides(image_folder, max_steps=2) + [*wider, "branch=true"])
    with open_dict(other):
        other.paths.output_dir = str(tmp_path / "wider")
    with pytest.raises(CheckpointError, match=r"different model.* written by experiment=ddpm_fmnist \(diffusion_"):
        train(other)  # a new run from it: the weights do not fit
    # the same network under another forward process: refused before any step (the weights would fit)
    other_t = compose_train(_fit_overrides(image_folder, max_steps=2) + [f"ckpt_path={good}", "model.num_timesteps=60",
                                                                          "branch=true"])
    with open_dict(other_t):
        other_t.paths.output_dir = str(tmp_path / "other_t")
    with pytest.raises(CheckpointError, match="another noise schedule"):
        train(other_t)
    # corrupt file
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(1000 bytes, not the zip archive .* cut off\)"):
        load_checkpoint(bad)
    # a foreign pickle that would run code is refused by weights_only loading
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "payload": Path("x")}, foreign)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(foreign)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_checkpoint(plain)
    observed.append("CheckpointError for each: other settings ... model.net.model_channels / (branch=true) different "
                    "model ... written by experiment=ddpm_fmnist / another noise schedule / not a checkpoint (1000 "
                    "bytes ... cut off) / cannot read ... unsafe unpickling / not a Lightning checkpoint")  # fmt: skip


@pytest.mark.fault("missing data set", "exit 2, no traceback, says where to put it")
def test_cli_missing_cifar_is_a_clear_error(tmp_path, observed):
    env = {**os.environ, "DIFFUSION_LIGHTNING_OFFLINE": "1", "DL_ROOT_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_lightning.train", "experiment=ddpm_cifar"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "data") in proc.stderr and "cifar-10" in proc.stderr.lower()
    said = next(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    observed.append(f"exit 2: {said[:100]}...")


def test_progress_bar_counts_steps_of_step_limited_runs():
    from diffusion_lightning.callbacks import ProgressBar

    bar = ProgressBar()
    bar._trainer = L.Trainer(max_steps=5000, max_epochs=-1, logger=False, enable_checkpointing=False, callbacks=[bar])
    assert bar._get_train_description(3).strip() == "Epoch 3 · step 0/5000"  # Lightning alone: "Epoch 3/-2"
    bar._trainer = L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, callbacks=[bar])
    assert bar._get_train_description(3).strip() == "Epoch 3/3"


def test_progress_lines_reach_a_file_and_train_log_while_the_run_goes(image_folder, tmp_path):
    """stdout to a file (a SLURM job, nohup): plain progress lines with step, img/s, loss, elapsed and ETA, and the
    run's train.log holds them before the run ends."""
    import re
    import time

    cmd = [sys.executable, "-m", "diffusion_lightning.train", *TINY_NET, *folder_data(image_folder),
           f"paths.log_dir={tmp_path / 'outputs'}", "trainer.max_steps=300", "trainer.val_check_interval=null",
           "trainer.limit_val_batches=1", "callbacks.progress_bar.every_s=0.2", "callbacks.sample_grid.num_samples=4",
           "sampler.steps=2", "callbacks.model_summary=null", "logger=csv"]  # fmt: skip
    env = cli_env()
    with open(tmp_path / "stdout.txt", "w") as stdout:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT)
        seen_while_running = False
        while proc.poll() is None and not seen_while_running:
            logs = list((tmp_path / "outputs").glob("train/*/*/train.log"))
            seen_while_running = bool(logs) and "img/s" in logs[0].read_text() and proc.poll() is None
            time.sleep(0.05)
        assert proc.wait(timeout=300) == 0, (tmp_path / "stdout.txt").read_text()[-3000:]
    assert seen_while_running
    text = (tmp_path / "stdout.txt").read_text()
    line = r"step \d+/300 · [\d.]+ img/s · loss [\d.]+ · elapsed \d+m\d\ds · ETA \d+m\d\ds"
    assert len(re.findall(line, text)) >= 2, text[-3000:]
    assert "step 300/300" in text
    # one line per report, and none of the third-party notes that say nothing about the run (srun exists on the CI
    # machine: its SLURM tests start a cluster)
    assert "\r" not in text
    noise = [ln for ln in text.splitlines() if re.search(r"`srun` command|exists and is not empty|Tip:|LeafSpec", ln)]
    assert not noise, noise


@pytest.mark.parametrize("bad", ["model.optimizer.lrr=1", "data.image_size=9"])
def test_a_failed_run_leaves_no_run_folder(bad, image_folder, tmp_path):
    """A config error (a mistyped key, a wrong image size) exits with its message and no empty run folder."""
    cmd = [sys.executable, "-m", "diffusion_lightning.train", *TINY_NET, *folder_data(image_folder),
           f"paths.log_dir={tmp_path / 'outputs'}", bad]  # fmt: skip
    env = cli_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and ("lrr" in proc.stderr or "8 or 10" in proc.stderr), proc.stderr[-2000:]
    assert not list((tmp_path / "outputs").glob("train/*/*")), list((tmp_path / "outputs").rglob("*"))


@pytest.mark.fault("mistyped key on the command line", "exits naming the nearest existing key")
def test_a_mistyped_key_gets_the_nearest_keys_suggested(image_folder, tmp_path, observed):
    from diffusion_lightning.errors import near_keys

    assert near_keys(["experiment=ddpm_fmnist", "model.optimizer.lrr=1"], "train") == {"model.optimizer.lrr": [
        "model.optimizer.lr"]}  # fmt: skip
    # an experiment's own keys count; valid overrides are not reported
    assert near_keys(["experiment=ect_fmnist", "model.steps_per_stag=3", "trainer.max_steps=5"], "train") == {
        "model.steps_per_stag": ["model.steps_per_stage"]}  # fmt: skip
    env = cli_env()
    proc = subprocess.run([sys.executable, "-m", "diffusion_lightning.train", "model.optimizer.lrr=1",
                           f"paths.log_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "the config has no key model.optimizer.lrr: did you mean model.optimizer.lr?" in proc.stderr, proc.stderr
    observed.append(proc.stderr.strip().splitlines()[-1])


def test_a_wrong_image_size_names_the_nearest_sizes_that_work():
    from diffusion_lightning.nets import UNet

    with pytest.raises(ValueError, match=r"the nearest sizes that work are 28 or 32 \(data.image_size=...\)"):
        UNet(image_size=30, channel_mult=[1, 2, 2], attention_resolutions=[])
    with pytest.raises(ValueError, match=r"nearest sizes that work are 8 or 16"):
        UNet(image_size=10, channel_mult=[1, 2, 2, 2], attention_resolutions=[])


def test_data_of_another_size_than_the_model_is_named_before_any_step(compose_train, image_folder, tmp_path):
    """A model whose image size is not the data's (e.g. a student of a teacher trained at 28x28 given 32x32 data) is
    refused at fit start with the key to set, and no checkpoint is written."""
    cfg = compose_train(_fit_overrides(image_folder, max_steps=2) + ["model.net.image_size=16"])
    with pytest.raises(UserError, match=r"the data gives 1x8x8 images but DDPM makes 1x16x16: set data.image_size=16"):
        train(cfg)
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


def test_resuming_continues_in_the_checkpoints_run_folder_with_its_curves(image_folder, tmp_path):
    """ckpt_path=<run>/checkpoints/last.ckpt with a larger max_steps: one run folder, whose TensorBoard loss curve
    runs on without a gap or a repeated step and whose train.log holds both parts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = [sys.executable, "-m", "diffusion_lightning.train", *TINY_NET, *folder_data(image_folder), *QUIET,
            f"paths.log_dir={tmp_path / 'outputs'}", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
            "trainer.val_check_interval=null",
            "callbacks.sample_grid.num_samples=4", "sampler.steps=2"]  # fmt: skip
    env = cli_env()
    first = subprocess.run([*base, "trainer.max_steps=6"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("train/*/*")
    second = subprocess.run([*base, "trainer.max_steps=12", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert list((tmp_path / "outputs").glob("train/*/*")) == [run]  # no second run folder
    assert f"run folder: {run}" in second.stdout
    steps = []
    for events in sorted((run / "tensorboard").glob("events.out.tfevents*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("train/loss")]
    assert len(list((run / "tensorboard").glob("events.out.tfevents*"))) == 2
    assert sorted(steps) == list(range(12)), steps  # steps 0..5, then 6..11
    assert "resuming in the run folder" in (run / "train.log").read_text()
    assert list((run / ".hydra").glob("resumed_*/overrides.yaml"))
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 12


@pytest.mark.fault("checkpoint write interrupted (in-process)", "last.ckpt unchanged; no stray temporaries")
def test_a_checkpoint_write_that_dies_midway_leaves_the_previous_one_whole(compose_train, image_folder, tmp_path,
                                                                          observed):  # fmt: skip
    """Checkpoints go to <name>.tmp and are renamed: a write cut off (here: half the bytes, then an error, as a kill
    would leave it) never replaces last.ckpt."""
    out = train(compose_train(_fit_overrides(image_folder, max_steps=2)))
    trainer = out["trainer"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    callback = trainer.checkpoint_callback

    def dies_midway(filepath, weights_only=False):
        Path(filepath).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt("killed while writing")

    trainer.save_checkpoint = dies_midway
    with pytest.raises(KeyboardInterrupt):
        callback._save_checkpoint(trainer, str(last))
    assert last.read_bytes() == before and load_checkpoint(last)["global_step"] == 2
    assert not list(last.parent.glob("*.ckpt.tmp")) or (last.parent / "last.ckpt.tmp").stat().st_size < len(before)
    assert not any(p.suffix == ".tmp" for p in last.parent.glob("step_*"))  # finished writes leave no temporaries
    observed.append("write cut off at half the bytes: last.ckpt byte-identical, loads at step 2")


def test_ckpt_path_last_and_folders_resolve_to_the_newest_checkpoint(tmp_path, monkeypatch):
    import time

    from diffusion_lightning.train import resolve_ckpt_path

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resolve_ckpt_path("last", run) is None  # nothing yet: a fresh start
    assert resolve_ckpt_path(None, run) is None
    with pytest.raises(UserError, match="folder without checkpoints"):
        resolve_ckpt_path(str(run), run)
    for name in ("step_00000003.ckpt", "last.ckpt", "step_00000006.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"x")
        time.sleep(0.01)
    (run / "checkpoints" / "last.ckpt.tmp").write_bytes(b"half")  # a write that was cut off is never picked
    newest = str(run / "checkpoints" / "step_00000006.ckpt")
    assert resolve_ckpt_path("last", run) == newest
    assert resolve_ckpt_path(str(run), tmp_path / "elsewhere") == newest
    assert resolve_ckpt_path(str(run / "checkpoints"), tmp_path / "elsewhere") == newest
    assert resolve_ckpt_path(str(run / "checkpoints" / "last.ckpt"), run) == str(run / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job resumes by itself
    assert resolve_ckpt_path(None, run) == newest


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.fault("resume from an earlier checkpoint of a finished run", "refused in one line naming branch=true; "
                   "with branch=true a new run folder; the finished run's files byte-identical")  # fmt: skip
def test_resuming_an_earlier_checkpoint_of_a_run_never_changes_that_run(
    compose_train, image_folder, tmp_path, observed
):
    """Issue 30's data loss: an earlier checkpoint of a finished run, resumed with another batch size, used to
    continue in that run's folder and overwrite its later checkpoints, last.ckpt, grid and finished.json. It is now
    refused in one line, or with branch=true trains in a new run folder recorded as branched from it; either way
    every file of the finished run stays byte-identical."""
    base = _fit_overrides(image_folder, max_steps=6) + ["callbacks.model_checkpoint.every_n_train_steps=2"]
    train(compose_train(base))
    run = tmp_path / "run"
    (run / ".hydra").mkdir(exist_ok=True)  # a run folder as the CLI makes it
    assert (run / "finished.json").is_file()
    before = _hashes(run)
    earlier = run / "checkpoints" / "step_00000002.ckpt"

    for extra, message in ((["data.batch_size=2"], r"other settings than these: global batch .*: 4 -> 2.*branch=true"),
                           ([], r"is step 2 of .*newest checkpoint is step 6 .*branch=true")):
        cfg = compose_train(base + [f"ckpt_path={earlier}", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "resumed")
        with pytest.raises(UserError, match=message) as err:
            train(cfg)
        assert _hashes(run) == before
        observed.append(f"refused: {str(err.value)[:70]}...; {len(before)} files of the run unchanged")

    cfg = compose_train(base + [f"ckpt_path={earlier}", "branch=true", "data.batch_size=2"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "branch")
    assert train(cfg)["trainer"].global_step == 6
    assert _hashes(run) == before
    import json

    branched = json.loads((tmp_path / "branch" / "branched_from.json").read_text())
    assert branched["global_step"] == 2
    assert list(branched["changed"].values()) == [{"then": 4, "now": 2}]
    assert load_checkpoint(tmp_path / "branch" / "checkpoints" / "last.ckpt")["global_step"] == 6
    observed.append("branch=true trained 2 -> 6 in a new folder (branched_from.json); the run unchanged")

    # the newest checkpoint itself (last.ckpt and the step-6 one were written at the same step) resumes in place
    cfg = compose_train(base + [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=8"])
    assert train(cfg)["trainer"].global_step == 8


@pytest.mark.fault("resume a DDPM checkpoint under iCT (same network keys)", "refused in one line naming both recipes "
                   "and the experiment to use")  # fmt: skip
def test_a_checkpoint_of_another_recipe_is_refused_in_one_line(compose_train, image_folder, tmp_path, observed):
    """A DDPM checkpoint has the same network keys as an iCT model (no target network): it used to train on silently
    under the consistency experiment, in the DDPM run's folder."""
    train(compose_train(_fit_overrides(image_folder, max_steps=2)))
    ddpm = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ddpm)["identity"] == {"recipe": "DDPM", "first_stage": "PixelSpace", "teacher": None}
    cfg = compose_train(folder_data(image_folder) + TINY_NET + QUIET + [
        "model=ict", "sampler=consistency", f"ckpt_path={ddpm}", "trainer.max_steps=4"])  # fmt: skip
    with pytest.raises(CheckpointError, match=r"is a DDPM checkpoint .* cannot resume the ConsistencyTraining") as err:
        train(cfg)
    observed.append(str(err.value).split(": ", 1)[-1][:90])
