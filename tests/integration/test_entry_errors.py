"""Every entry point and component slot against every checkpoint kind and every kind of bad file (issue 30): each
invocation works or fails in one line with exit status 2, never a traceback, and changes no file outside its own
run folder; a failed one leaves no folder. The command-line checks before Hydra composes (a value of the wrong type,
``sampler.<key>=`` without ``sampler=``), and the settings that would fail at the final grid, refused before the first
step."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUIET, ROOT, TINY_NET, folder_data

from diffusion_lightning.errors import UserError, prepare_overrides
from diffusion_lightning.train import train

FIXTURES = ROOT / "tests" / "fixtures" / "recipes"
KINDS = ("ddpm", "iddpm", "vdiff", "pd", "ct", "ict", "cd", "ect", "ae", "ldm")
sys.path.insert(0, str(FIXTURES))
from make_fixtures import COMMON, RECIPES, TINY, blobs, data_overrides  # noqa: E402


def _bad_files(folder: Path) -> dict[str, Path]:
    """A text file, an empty file, random bytes, a cut-off checkpoint, a folder, a checkpoint with a pickled object."""
    folder.mkdir()
    files = {name: folder / f"{name}.ckpt" for name in ("text", "empty", "random", "truncated", "pickled")}
    files["text"].write_text("hello\n")
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                                .to(torch.uint8).numpy().tobytes())  # fmt: skip
    files["truncated"].write_bytes((FIXTURES / "ddpm.ckpt").read_bytes()[:50_000])
    torch.save({"state_dict": {}, "payload": Path("x")}, files["pickled"])  # unpickling it would build a Path
    files["folder"] = folder / "a_folder"
    files["folder"].mkdir()
    return files


def _hashes(*roots: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every file under ``roots`` outside ``skip``."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.parents)}  # fmt: skip


def _stats(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file under ``root`` outside ``skip`` (between two invocations)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and skip not in p.parents}  # fmt: skip


def _invoke(module: str, argv: list[str]) -> tuple[int, str]:
    """``python -m diffusion_lightning.<module> *argv`` in this process: its exit status and its output."""
    out = io.StringIO()
    old_argv, old_env = sys.argv, dict(os.environ)
    sys.argv = [str(ROOT / "diffusion_lightning" / f"{module}.py"), *argv]
    code = 0
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            if module == "report":
                from diffusion_lightning.report import main

                main(argv)
            else:
                runpy.run_module(f"diffusion_lightning.{module}", run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(old_env)
    return code, out.getvalue()


def _slots(data: Path, log_dir: Path) -> dict[str, tuple[str, object]]:
    """Entry point and slot -> (module, argv for an input file and a run folder)."""
    pixels = [*data_overrides(data), *COMMON, f"paths.log_dir={log_dir}", "trainer.max_steps=9"]
    teacher = ["experiment=pd_fmnist", "model.start_steps=4", "model.end_steps=2", "model.steps_per_round=1"]
    return {
        "train ckpt_path": ("train", lambda f, run: [*pixels, *RECIPES["ddpm"][0], f"ckpt_path={f}",
                                                     f"hydra.run.dir={run}"]),  # fmt: skip
        "train model.teacher.path": ("train", lambda f, run: [*pixels, *teacher, f"model.teacher.path={f}",
                                                              "trainer.max_steps=1", f"hydra.run.dir={run}"]),
        "train model.first_stage.path": ("train", lambda f, run: [
            *pixels, "experiment=ldm_fmnist", *TINY, "model.net.image_size=4", "model.net.in_channels=2",
            "model.first_stage.scale_batches=2", f"model.first_stage.path={f}", "trainer.max_steps=1",
            f"hydra.run.dir={run}"]),  # fmt: skip
        "sample": ("sample", lambda f, run: [f"ckpt={f}", "num_samples=2", f"hydra.run.dir={run}"]),
        "evaluate": ("evaluate", lambda f, run: [f"ckpt={f}", "metric=nll", "nll.num_images=2", "nll.num_strata=2",
                                                 f"paths.data_dir={data}", f"results={run}/results.jsonl",
                                                 f"hydra.run.dir={run}"]),  # fmt: skip
        "export": ("export", lambda f, run: [f"ckpt={f}", f"out={run}/pipeline", f"hydra.run.dir={run}"]),
        "report": ("report", lambda f, run: ["--run", str(run), "--results", str(run / "none.jsonl")]),
    }


@pytest.mark.slow
@pytest.mark.fault("every checkpoint kind and bad file (text, empty, random, truncated, folder, pickled) at every "
                   "entry point and slot", "works, or one line and exit 2; no file outside its run folder changes; "
                   "a failure leaves no folder")  # fmt: skip
def test_every_entry_point_and_slot_takes_every_file_in_one_line(tmp_path, observed):
    data = tmp_path / "data"
    blobs(data)
    inputs = {kind: FIXTURES / f"{kind}.ckpt" for kind in KINDS} | _bad_files(tmp_path / "bad")
    # a finished run that no invocation may touch, beside the invoked ones
    bystander = tmp_path / "outputs" / "train" / "ddpm_fmnist" / "finished_run"
    (bystander / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURES / "ddpm.ckpt", bystander / "checkpoints" / "last.ckpt")
    worked, failed, problems = [], 0, []
    inputs_before = _hashes(tmp_path, FIXTURES)  # the inputs, the bystander run, the data: compared at the end
    for slot, (module, argv) in _slots(data, tmp_path / "outputs").items():
        for name, path in inputs.items():
            run = tmp_path / "runs" / f"{slot.replace(' ', '_')}-{name}"
            if module == "report":  # a run folder whose checkpoint is the file
                (run / "checkpoints").mkdir(parents=True)
                target = run / "checkpoints" / "last.ckpt"
                shutil.copytree(path, target) if path.is_dir() else shutil.copy(path, target)
            before = _stats(tmp_path, skip=run)
            code, out = _invoke(module, argv(path, run))
            lines = [line for line in out.splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("error:")]
            if "Traceback" in out or code not in (0, 2) or code == 2 and (len(errors) != 1 or errors[0] != lines[-1]):
                problems.append(f"{slot} <- {name}: exit {code}\n{out[-1500:]}")
            if _stats(tmp_path, skip=run) != before:
                problems.append(f"{slot} <- {name}: changed files outside {run}")
            if code == 2 and module != "report" and run.exists():
                problems.append(f"{slot} <- {name}: left {sorted(p.name for p in run.iterdir())} after failing")
            if code == 0:
                worked.append(f"{slot} <- {name}")
            else:
                failed += 1
    assert not problems, "\n\n".join(problems)
    after = _hashes(tmp_path, FIXTURES, skip=tmp_path / "runs")
    assert after == inputs_before, "an input, the bystander run or the data changed"
    # the kinds each slot is for work through it
    for expected in ("train ckpt_path <- ddpm", "train model.teacher.path <- vdiff", "sample <- pd", "sample <- ect",
                     "train model.first_stage.path <- ae", "evaluate <- ddpm", "sample <- ldm", "report <- ddpm"):
        assert expected in worked, worked
    observed.append(f"{len(worked) + failed} invocations: {len(worked)} worked, {failed} refused in one line (exit "
                    "2), no traceback, no file outside the run folder changed, no empty folder left")


def test_the_command_line_is_checked_before_hydra_composes():
    with pytest.raises(UserError, match=r"trainer.max_steps=abc: trainer.max_steps is an integer"):
        prepare_overrides(["trainer.max_steps=abc"], "train")
    with pytest.raises(UserError, match=r"test=maybe: test is true or false"):
        prepare_overrides(["test=maybe"], "train")
    with pytest.raises(UserError, match=r"model.optimizer.lr=fast: model.optimizer.lr is a number"):
        prepare_overrides(["model.optimizer.lr=fast"], "train")
    fine = ["trainer.devices=auto", "seed=1,2", "trainer.max_steps=null", "sampler.steps=ddim25", "+x=y"]
    assert prepare_overrides(fine, "train") == fine
    # the checkpoint's own sampler, changed by a key: sample and evaluate have no sampler unless one is chosen
    assert prepare_overrides(["ckpt=a", "sampler.steps=8"], "sample") == ["ckpt=a", "+sampler.steps=8"]
    assert prepare_overrides(["ckpt=a", "sampler.steps=4,8"], "evaluate") == ["ckpt=a", "+sampler.steps=4,8"]
    # a sweep over samplers: Hydra composes the multirun's primary config without the swept group, so its keys are
    # forced in (a single value, sampler.steps=5, failed there with "Could not override 'sampler.steps'")
    assert prepare_overrides(["-m", "ckpt=a", "sampler=ddim,dpmpp", "sampler.steps=5"], "evaluate") == [
        "-m", "ckpt=a", "sampler=ddim,dpmpp", "++sampler.steps=5"]  # fmt: skip
    assert prepare_overrides(["ckpt=a", "sampler=heun", "sampler.steps=8"], "evaluate")[-1] == "sampler.steps=8"
    assert prepare_overrides(["sampler.steps=8"], "train") == ["sampler.steps=8"]


def test_sampler_keys_without_a_sampler_change_the_checkpoints_own(tmp_path):
    code, out = _invoke("sample", [f"ckpt={FIXTURES / 'ddpm.ckpt'}", "num_samples=1", "sampler.steps=3",
                                   f"out={tmp_path / 's.png'}", f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert code == 0 and "(ddpm, steps=3, 3 NFE)" in out, out  # the fixture's own: ddpm


@pytest.mark.fault("settings the final grid would fail on: guidance without condition dropout; a consistency model "
                   "under sampler=ddpm", "refused before the first step, in one line")  # fmt: skip
def test_what_the_grids_would_fail_on_is_refused_before_the_first_step(compose_train, image_folder, tmp_path,
                                                                          observed):  # fmt: skip
    base = folder_data(image_folder) + TINY_NET + QUIET + ["trainer.max_steps=2", "logger=csv"]
    cases = {
        "guidance=3 with class_dropout=0": (base + ["model.net.num_classes=2", "guidance=3"],
                                            r"guidance=3.* model.class_dropout=0"),
        "a consistency model under sampler=ddpm": (base + ["model=ict", "sampler=ddpm", "model.lr_scheduler=null"],
                                                   r"sampler=ddpm does not sample a ConsistencyTraining model"),
    }  # fmt: skip
    for name, (overrides, message) in cases.items():
        with pytest.raises(UserError, match=message) as err:
            train(compose_train(overrides))
        assert not (tmp_path / "run" / "checkpoints").exists()  # no step was taken
        observed.append(f"{name}: {str(err.value)[:70]}...")
