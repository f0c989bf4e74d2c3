"""Many evaluation results in one table and one picture, and results in clip_benchmark's layout.

`parclip eval` and `parclip eval-retrieval` write one JSON per (model, data set). :func:`report_rows` reads any
number of them into rows of one table:

    label | task | data | clean (top-1 %, or i2t R@1 %) | per attack: ASR % (asr, or asr_text for retrieval)

:func:`write_report` writes it as Markdown and CSV and draws clean accuracy against ASR per model (one bar pair per
result and attack). clip_benchmark's record of a result: :mod:`parclip.evaluation.clip_benchmark`.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from parclip.data import DataError

__all__ = ["report_rows", "format_markdown", "write_report"]


def _load(path: Path) -> dict:
    try:
        r = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"result file not found: {path}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a result JSON: {e}") from e
    if not isinstance(r, dict) or not ("clean_top1" in r or "clean" in r):
        raise DataError(f"{path} is not a parclip eval / eval-retrieval result (no clean_top1 or clean recall)")
    return r


def _label(r: dict, path: Path) -> str:
    ckpt = r.get("checkpoint")
    model = r.get("model") or path.stem
    return f"{model} ({Path(ckpt).name})" if ckpt else str(model)


def report_rows(paths) -> list[dict]:
    """One row per result file: {"label", "file", "task", "data", "clean", "clean_metric", "asr": {attack: %}}."""
    rows = []
    for path in map(Path, paths):
        r = _load(path)
        if "clean_top1" in r:
            row = {"task": "zero-shot", "clean": r["clean_top1"], "clean_metric": "top-1",
                   "asr": {a: v["asr"] for a, v in r.get("attacks", {}).items()}}
        else:
            row = {"task": "retrieval", "clean": r["clean"]["i2t"].get("1", r["clean"]["i2t"].get(1)),
                   "clean_metric": "i2t R@1", "asr": {a: v["asr_text"] for a, v in r.get("attacks", {}).items()}}
        rows.append({"label": _label(r, path), "file": str(path), "data": r.get("data") or r.get("source"), **row})
    return rows


def _attacks(rows: list[dict]) -> list[str]:
    return sorted({a for row in rows for a in row["asr"]})


def format_markdown(rows: list[dict]) -> str:
    attacks = _attacks(rows)
    lines = ["| model | task | clean | " + " | ".join(f"ASR `{a}`" for a in attacks) + " |",
             "|---|---|---|" + "---|" * len(attacks)]
    for row in rows:
        asr = [f"{row['asr'][a]:.1f}" if a in row["asr"] else "–" for a in attacks]
        lines.append(f"| {row['label']} | {row['task']} | {row['clean']:.1f} ({row['clean_metric']}) | "
                     + " | ".join(asr) + " |")
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    attacks = _attacks(rows)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["model", "task", "data", "clean", "clean_metric", *[f"asr_{a}" for a in attacks], "file"])
    for row in rows:
        w.writerow([row["label"], row["task"], row["data"], f"{row['clean']:.4f}", row["clean_metric"],
                    *[f"{row['asr'][a]:.4f}" if a in row["asr"] else "" for a in attacks], row["file"]])
    return out.getvalue()


def write_report(rows: list[dict], *, markdown: str | os.PathLike | None = None, csv_path=None, plot=None) -> None:
    """Write the table as Markdown and/or CSV and the clean-vs-ASR bar chart (whichever paths are given)."""
    from parclip.utils.files import write_text
    if markdown:
        write_text(markdown, format_markdown(rows) + "\n")
    if csv_path:
        write_text(csv_path, _csv(rows))
    if plot:
        _plot(Path(plot), rows)


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    attacks = _attacks(rows)
    x = np.arange(len(rows))
    width = 0.8 / (1 + len(attacks))
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(rows) * (1 + len(attacks)) / 2, 4), constrained_layout=True)
    ax.bar(x, [r["clean"] for r in rows], width, label="clean", color="tab:green")
    for k, a in enumerate(attacks, 1):
        ax.bar(x + k * width, [r["asr"].get(a, np.nan) for r in rows], width, label=f"ASR {a}")
    ax.set_xticks(x + width * len(attacks) / 2, [r["label"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("clean accuracy (zero-shot top-1 or i2t R@1) and ASR per model")
    from parclip.utils.files import save_figure

    save_figure(fig, path, dpi=110)
    plt.close(fig)

