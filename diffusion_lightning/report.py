"""Reports: ``python -m diffusion_lightning.report --results outputs/evaluate/results.jsonl --out DIR`` and
``python -m diffusion_lightning.report --run <run folder> [--out DIR]`` (``make report`` / ``make report RUN=...``).

The evaluation report reads the JSON lines that ``python -m diffusion_lightning.evaluate`` appends and writes
``DIR/report.md`` (one table row per evaluation: sample quality, then likelihood) and ``DIR/fid_vs_nfe.png`` (FID
against network evaluations per sample, log x, one line per checkpoint and sampler).

The run report (:func:`write_run_report`) is one self-contained page about one training run, ``<run>/report/`` by
default: its overrides and resolved config, its curves from TensorBoard (loss overall and per quarter of t, learning
rate, gradient norm, FID/KID/IS over steps when the metrics callback ran), its sample grids over time side by side,
and the evaluations of its checkpoints found in the results file (a table and FID against NFE per sampler).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import UserError

QUALITY_COLUMNS = ("experiment", "step", "EMA", "sampler", "steps", "NFE", "samples", "features", "FID",
                   "KID (raw MMD², not ×1000)", "IS", "wall time")  # fmt: skip
NLL_COLUMNS = ("experiment", "step", "EMA", "estimator", "split", "images", "bits/dim", "wall time")


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file, in file order (blank lines skipped; a bad line names its number)."""
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return records


def _num(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _pm(mean: Any, std: Any, fmt: str) -> str:
    return _num(mean, fmt) if std is None or mean is None else f"{mean:{fmt}} ± {std:{fmt}}"


def _extractor(r: dict[str, Any]) -> str:
    return str((r.get("reference") or {}).get("extractor") or "–")


def quality_row(r: dict[str, Any]) -> list[str]:
    """A metric=fid record as table cells (``QUALITY_COLUMNS``)."""
    return [
        str(r.get("experiment") or "–"), str(r.get("global_step", "–")), "yes" if r.get("ema") else "no",
        str(r.get("sampler", "–")), str(r.get("steps", "–")), str(r.get("nfe", "–")), str(r.get("num_samples", "–")),
        _extractor(r), _num(r.get("fid"), ".2f"), _pm(r.get("kid"), r.get("kid_std"), ".4g"),
        _pm(r.get("is"), r.get("is_std"), ".2f"),
        _num(r.get("wall_s"), ".1f") + (" s" if r.get("wall_s") is not None else ""),
    ]  # fmt: skip


def nll_row(r: dict[str, Any]) -> list[str]:
    """A metric=nll record as table cells (``NLL_COLUMNS``)."""
    return [
        str(r.get("experiment") or "–"), str(r.get("global_step", "–")), "yes" if r.get("ema") else "no",
        str(r.get("estimator", "–")), str(r.get("split", "–")), str(r.get("num_images", "–")),
        _pm(r.get("bpd"), r.get("bpd_stderr"), ".4f"),
        _num(r.get("wall_s"), ".1f") + (" s" if r.get("wall_s") is not None else ""),
    ]  # fmt: skip


def markdown_table(columns: Iterable[str], rows: Iterable[list[str]]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fid_curves(records: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """FID against NFE for each (checkpoint, EMA, sampler, feature extractor): ``label -> [(nfe, fid), ...]`` sorted by
    NFE; of repeated evaluations at one NFE the last in the file counts."""
    points: dict[str, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r.get("metric") == "fid" and r.get("fid") is not None and r.get("nfe") is not None:
            raw = "" if r.get("ema", True) else " raw"
            model = f"{r.get('experiment') or '?'} @ {r.get('global_step', '?')}{raw}"
            extractor = "" if _extractor(r) == "–" else f" ({_extractor(r)})"
            points[f"{model}: {r.get('sampler')}{extractor}"][int(r["nfe"])] = float(r["fid"])
    return {label: sorted(p.items()) for label, p in sorted(points.items())}


def plot_fid_vs_nfe(curves: dict[str, list[tuple[int, float]]], out: str | Path) -> Path:
    """A PNG of the curves (log-scaled NFE axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("FID")
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no FID evaluations", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(results: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md`` and ``fid_vs_nfe.png`` into ``out_dir``; returns their paths."""
    records = load_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quality = [r for r in records if r.get("metric") == "fid"]
    nll = [r for r in records if r.get("metric") == "nll"]
    plot = plot_fid_vs_nfe(fid_curves(quality), out_dir / "fid_vs_nfe.png")
    parts = [
        "# Evaluation report",
        f"{len(records)} evaluations from `{results}` (written by `python -m diffusion_lightning.report`).",
        "## Sample quality",
        "KID and IS: mean ± std over subsets / splits; features: the extractor (FIDs on different features are not "
        "comparable). Reference split and size per row are in the results file.",
        markdown_table(QUALITY_COLUMNS, map(quality_row, quality)) if quality else "No FID evaluations.",
        f"![FID against NFE]({plot.name})",
        "## Likelihood",
        markdown_table(NLL_COLUMNS, map(nll_row, nll)) if nll else "No NLL evaluations.",
    ]
    md = out_dir / "report.md"
    md.write_text("\n\n".join(parts) + "\n")
    return {"markdown": md, "plot": plot}


#: The curve panels of a run report: (title, TensorBoard tags drawn together).
CURVES = (
    ("loss", ("train/loss", "val/loss")),
    ("training loss per quarter of t", ("train/loss_q0", "train/loss_q1", "train/loss_q2", "train/loss_q3")),
    ("learning rate", ("lr-*",)),
    ("gradient norm (before clipping)", ("train/grad_norm",)),
)
METRIC_TAGS = ("metrics/fid", "metrics/kid", "metrics/is")


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run folder (all event files of ``<run>/tensorboard``, a resumed run's too) as
    ``tag -> [(step, value), ...]`` sorted by step; a step logged twice keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = defaultdict(dict)
    for events in sorted((run / "tensorboard").glob("**/events.out.tfevents*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                scalars[tag][int(e.step)] = float(e.value)
    return {tag: sorted(v.items()) for tag, v in scalars.items()}


def _matching(scalars: dict[str, list[tuple[int, float]]], patterns: Iterable[str]) -> list[str]:
    import fnmatch

    return [t for p in patterns for t in sorted(scalars) if fnmatch.fnmatch(t, p)]


def plot_curves(scalars: dict[str, list[tuple[int, float]]], panels: Iterable[tuple[str, tuple[str, ...]]],
                out: Path, log_y: bool = True) -> Path | None:  # fmt: skip
    """One PNG with a panel per (title, tag patterns) that has data; None if none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, tags) for title, pats in panels if (tags := _matching(scalars, pats))]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.0, 2.6 * len(panels)), dpi=110, squeeze=False)
    for ax, (title, tags) in zip(axes[:, 0], panels, strict=True):
        for tag in tags:
            steps, values = zip(*scalars[tag], strict=True)
            ax.plot(steps, values, label=tag, marker="o" if len(steps) < 30 else None, linewidth=1)
        positive = all(v > 0 for t in tags for _, v in scalars[t])
        if log_y and positive:
            ax.set_yscale("log")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _grid_key(path: Path) -> tuple[int, int]:
    digits = "".join(c for c in path.stem if c.isdigit())
    return (1, 0) if path.stem == "final" else (0, int(digits or 0))


def write_run_report(run: str | Path, out_dir: str | Path | None = None,
                     results: str | Path | None = None) -> Path:  # fmt: skip
    """Write ``report.md`` and its figures for the training run in ``run`` into ``out_dir`` (default
    ``<run>/report``); the grids are copied next to it, so the folder is self-contained. Returns the page's path."""
    import shutil

    import yaml

    run = Path(run).resolve()
    if not (run / "checkpoints").is_dir() and not (run / "tensorboard").is_dir():
        raise FileNotFoundError(f"{run} is no training run folder (no checkpoints/ or tensorboard/): give "
                                "RUN=outputs/train/<experiment>/<time>")  # fmt: skip
    config = _resolved_config(run)  # an unreadable checkpoint fails here, before the report folder is made
    out = Path(out_dir) if out_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Training run `{run.name}` ({run.parent.name})", f"Run folder: `{run}`."]
    if (finished := run / "finished.json").is_file():
        info = json.loads(finished.read_text())
        parts.append(f"Finished at step {info.get('global_step')}; last checkpoint `{info.get('checkpoint')}`.")
    else:
        parts.append("No `finished.json`: the run has not finished (or was interrupted).")

    scalars = read_scalars(run) if (run / "tensorboard").is_dir() else {}
    parts.append("## Curves")
    if curves := plot_curves(scalars, CURVES, out / "curves.png"):
        parts.append(f"![loss, per-quarter loss, learning rate and gradient norm over steps]({curves.name})")
        last = {t: v[-1] for t in _matching(scalars, ("train/loss", "val/loss", "val/loss_q*")) if (v := scalars[t])}
        rows = [[t, str(step), f"{value:.5g}"] for t, (step, value) in last.items()]
        if rows:
            parts.append(markdown_table(("curve", "last step", "value"), rows))
    else:
        parts.append("No TensorBoard scalars (a run with `logger=csv` keeps them in `csv/`).")
    if metrics := plot_curves(scalars, [(t, (t,)) for t in METRIC_TAGS], out / "metrics.png", log_y=False):
        parts += ["## Sample quality during training (metrics callback)",
                  f"![FID, KID (raw) and IS over steps]({metrics.name})"]  # fmt: skip

    grids = sorted((run / "grids").glob("*.png"), key=_grid_key) if (run / "grids").is_dir() else []
    parts.append("## Sample grids over time")
    if grids:
        (out / "grids").mkdir(exist_ok=True)
        for g in grids:
            shutil.copy2(g, out / "grids" / g.name)
        parts.append(markdown_table([g.stem for g in grids], [[f"![{g.stem}](grids/{g.name})" for g in grids]]))
    else:
        parts.append("No grids were written.")

    parts.append("## Evaluations of its checkpoints")
    results = Path(results) if results else None
    records = [r for r in load_results(results) if r.get("ckpt") and run in Path(r["ckpt"]).resolve().parents] if (
        results and results.is_file()) else []  # fmt: skip
    if records:
        quality = [r for r in records if r.get("metric") == "fid"]
        plot = plot_fid_vs_nfe(fid_curves(quality), out / "fid_vs_nfe.png")
        parts += [markdown_table(QUALITY_COLUMNS, map(quality_row, quality)), f"![FID against NFE]({plot.name})"]
        if nll := [r for r in records if r.get("metric") == "nll"]:
            parts.append(markdown_table(NLL_COLUMNS, map(nll_row, nll)))
    else:
        parts.append(f"None in `{results}`: `make evaluate ARGS='-m ckpt={run}/checkpoints/last.ckpt "
                     "sampler=ddim,dpmpp sampler.steps=10,20,50'` adds them.")  # fmt: skip

    parts.append("## Config")
    if (overrides := run / ".hydra" / "overrides.yaml").is_file():
        parts += ["Command-line overrides:", "```yaml\n" + overrides.read_text().strip() + "\n```"]
    if config is not None:
        parts += ["Resolved config (from the last checkpoint):", "```yaml\n" + yaml.safe_dump(config, sort_keys=False)
                  + "```"]  # fmt: skip
    page = out / "report.md"
    page.write_text("\n\n".join(parts) + "\n")
    return page


def _resolved_config(run: Path) -> dict[str, Any] | None:
    """The resolved run config stored in the run's ``last.ckpt`` (else its newest checkpoint), else ``.hydra``'s."""
    import yaml

    from .checkpoint import load_checkpoint

    ckpts = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    if ckpts:
        return load_checkpoint(ckpts[0]).get("run_config")
    if (cfg := run / ".hydra" / "config.yaml").is_file():
        return yaml.safe_load(cfg.read_text())
    return None


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="outputs/evaluate/results.jsonl", help="JSON lines from evaluate")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/report; a run's: <run>/report)")
    parser.add_argument("--run", default=None, help="a training run folder: write its run report")
    args = parser.parse_args(argv)
    if args.run:
        try:
            page = write_run_report(args.run, args.out, args.results)
        except (FileNotFoundError, UserError) as e:
            parser.exit(2, f"error: {e}\n")
        print(f"wrote {page}")
        return {"markdown": page}
    args.out = args.out or "outputs/report"
    if not Path(args.results).is_file():
        parser.exit(2, f"error: {args.results} not found; run `python -m diffusion_lightning.evaluate ckpt=...`\n")
    paths = write_report(args.results, args.out)
    print(f"wrote {paths['markdown']} and {paths['plot']}")
    return paths


if __name__ == "__main__":
    main()
