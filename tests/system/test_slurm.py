"""Training through a real SLURM scheduler: a one-node cluster on this machine (scripts/slurm_cluster.sh), jobs
submitted by Hydra's submitit launcher (``-m hydra/launcher=slurm``), ranks started by ``srun``.

Where no cluster can be started here (no apt and no slurm-wlm, not root) the tests are skipped and say why, unless
``DL_REQUIRE_SLURM=1`` (CI sets it): then that is a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, TINY_NET, cli_env, folder_data, wait_for
from test_train import _assert_same_training_state

from diffusion_lightning.checkpoint import load_checkpoint

SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a running one-node cluster (its SLURM_CONF), stopped after the module's tests."""
    state = tmp_path_factory.mktemp("slurm")
    # a port of its own, so that a cluster a user started (6817) is left alone
    ports = {**os.environ, "SLURM_CLUSTER_PORT": "6937"}
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=600,
                          env=ports)  # fmt: skip
    if proc.returncode != 0:
        said = proc.stderr.strip().splitlines()
        reason = f"no local SLURM cluster: {said[-1] if said else f'exit code {proc.returncode}'}"
        if os.environ.get("DL_REQUIRE_SLURM") == "1":
            pytest.fail(reason + " (DL_REQUIRE_SLURM=1)")
        pytest.skip(reason)
    conf = proc.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    yield {**cli_env(), "SLURM_CONF": conf, "PATH": f"{os.environ['PATH']}:/usr/sbin"}
    subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=120, env=ports)


def _command(tmp_path: Path, images: Path, *extra: str) -> list[str]:
    """A multirun of a tiny model through the submitit SLURM launcher, one CPU per task."""
    return [
        sys.executable, "-m", "diffusion_lightning.train", "-m", "hydra/launcher=slurm", "trainer=slurm",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10", *folder_data(images, batch_size=2), *TINY_NET, "data.random_flip=true",
        "trainer.val_check_interval=null", "trainer.limit_val_batches=1", "callbacks.sample_grid.num_samples=4",
        "sampler.steps=2", "callbacks.ema.decay=0.9", "model.num_timesteps=50", "model.lr_scheduler.warmup_steps=2",
        "logger=csv", "callbacks.progress_bar=null", "callbacks.model_summary=null",
        f"paths.log_dir={tmp_path / 'out'}", *extra,
    ]  # fmt: skip


def _sweep(tmp_path: Path) -> Path:
    (sweep,) = (tmp_path / "out" / "train" / "multirun").iterdir()
    return sweep


def _logs(sweep: Path) -> str:
    """Everything the jobs' tasks printed (submitit's per-task stdout and stderr files)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.*")))


def _signal_mid_run(cmd: list[str], tmp_path: Path, env: dict[str, str], ready: str, job: str) -> tuple[str, str]:
    """Run the multirun ``cmd``; once ``<sweep>/<ready>`` exists, send USR2 to the job whose id ends with ``job``
    (``""``: the only one) and wait for the sweep to end. Its output and the signalled job's id."""
    sweeper = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(tmp_path / "out", f"train/multirun/*/{ready}", sweeper)
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
        (job_id,) = [j for j in queue if j.endswith(job)]
        subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True, timeout=30)
        out, _ = sweeper.communicate(timeout=300)
    finally:
        sweeper.kill()
    assert sweeper.returncode == 0, out[-3000:] + _logs(_sweep(tmp_path))[-4000:]
    return out, job_id


def test_a_two_task_ddp_job_ends_in_one_run_folder_and_survives_a_requeue(slurm, image_folder, tmp_path):
    """Two ranks from srun, one run folder; the warning signal reaches both, they agree on it at the next logging step
    (every 5th here), save, and the requeued job resumes there and finishes."""
    cmd = _command(tmp_path, image_folder, "hydra.launcher.tasks_per_node=2", "trainer.max_steps=20",
                   "trainer.log_every_n_steps=5", "callbacks.model_checkpoint.every_n_train_steps=4",
                   "+callbacks.slow._target_=rank_probe.Slow", "+callbacks.slow.seconds=0.25")  # fmt: skip
    _signal_mid_run(cmd, tmp_path, slurm, ready="0/checkpoints/step_00000004.ckpt", job="")
    sweep = _sweep(tmp_path)
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]
    assert json.loads((sweep / "0" / "finished.json").read_text())["global_step"] == 20
    logs = _logs(sweep)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs and "GLOBAL_RANK: 0, MEMBER: 1/2" in logs  # two ranks, from srun
    stops = [int(s.split(":")[0]) for s in logs.split("stopped by SIGUSR2 at step ")[1:]]
    assert stops and all(step % 5 == 0 and step < 20 for step in stops), stops  # both ranks, a logging step


@pytest.mark.fault("SLURM job signalled mid-run (scancel --signal=USR2)", "saves, requeues, resumes; final state "
                   "bitwise equal to an uninterrupted job")  # fmt: skip
def test_a_sweep_with_a_preempted_job_resumes_it_bitwise(slurm, image_folder, tmp_path, observed):
    """Two identical jobs of a sweep (``run_name=a,b``); job a gets the scheduler's warning signal (USR2, as before a
    time limit or a preemption) mid-run: it saves at the end of that batch, is requeued, resumes from its checkpoint
    and ends with the weights, EMA and optimizer state of job b, which ran uninterrupted."""
    cmd = _command(tmp_path, image_folder, "run_name=a,b", "trainer.max_steps=24",
                   "callbacks.model_checkpoint.every_n_train_steps=4", "+callbacks.slow._target_=rank_probe.Slow",
                   "+callbacks.slow.seconds=0.25")  # fmt: skip
    _, job_a = _signal_mid_run(cmd, tmp_path, slurm, ready="0/checkpoints/step_00000008.ckpt", job="_0")
    sweep = _sweep(tmp_path)
    logs = _logs(sweep)
    assert "stopped by SIGUSR2 at step" in logs and "ckpt_path=last: resuming from" in logs, logs[-4000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "finished.json").read_text())["global_step"] == 24
    stop = next(line for line in logs.splitlines() if "stopped by SIGUSR2 at step" in line)
    observed.append(f"job {job_a}: {stop[stop.index('stopped by'):][:40]}..., requeued, resumed, finished at step 24")
    _assert_same_training_state(
        load_checkpoint(sweep / "1" / "checkpoints" / "last.ckpt"),
        load_checkpoint(sweep / "0" / "checkpoints" / "last.ckpt"),
    )
    observed.append("weights, EMA, Adam state bitwise equal to the uninterrupted job's")
