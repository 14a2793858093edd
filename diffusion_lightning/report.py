"""Evaluation report: ``python -m diffusion_lightning.report --results outputs/evaluate/results.jsonl --out DIR``.

Reads the JSON lines that ``python -m diffusion_lightning.evaluate`` appends and writes ``DIR/report.md`` (one table
row per evaluation: sample quality, then likelihood) and ``DIR/fid_vs_nfe.png`` (FID against network evaluations
per sample, log x, one line per checkpoint and sampler).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="outputs/evaluate/results.jsonl", help="JSON lines from evaluate")
    parser.add_argument("--out", default="outputs/report", help="output folder (published reports: docs/eval_report)")
    args = parser.parse_args(argv)
    if not Path(args.results).is_file():
        parser.exit(2, f"error: {args.results} not found; run `python -m diffusion_lightning.evaluate ckpt=...`\n")
    paths = write_report(args.results, args.out)
    print(f"wrote {paths['markdown']} and {paths['plot']}")
    return paths


if __name__ == "__main__":
    main()
