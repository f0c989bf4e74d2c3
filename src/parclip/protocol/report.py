"""The protocol's outputs: the defence × attack table (Markdown), its heat maps, and the trade-off curves."""
from __future__ import annotations

from pathlib import Path

from parclip.utils.files import save_figure


def fmt(v: float) -> str:
    """A knob value for tables and labels: 3e-4 rather than 0.0003, 1.5e-4 rather than 0.00015, 2 rather than 2.0."""
    if not 0 < abs(v) < 1e-2:
        return f"{v:g}"
    mantissa, exponent = f"{v:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def markdown_table(matrix: dict, attacks: list[str]) -> str:
    """defence × attack, each cell "clean top-1 / ASR" (and the chosen lr with a grid); the foundation row is the
    trigger's natural ASR."""
    target = matrix["protocol"]["target"]
    lines = ["| defence | " + " | ".join(f"`{a}`" for a in attacks) + " |",
             "|---|" + "---|" * len(attacks)]
    found = [f"{p['foundation_test']['clean_top1']:.1f} / {p['foundation_test']['asr']:.1f}" if p else "–"
             for p in (matrix["plants"].get(a) for a in attacks)]
    lines.append("| foundation (never poisoned) | " + " | ".join(found) + " |")
    for d, row in matrix["cells"].items():
        cells = [f"{row[a]['clean_top1']:.1f} / {row[a]['asr']:.1f}"
                 + (f" ({fmt(row[a]['lr'])})" if row[a].get("grid") else "") if a in row else "–" for a in attacks]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append(f"\nclean top-1 % / ASR % on the {matrix['protocol']['data']['n_test'] or 10000} test images "
                 f"(target '{target}'); `none` is the planted model; the foundation row is the trigger's natural ASR"
                 + (f"; (x) = the learning rate chosen on the validation split by the rule "
                    f"\"{matrix['protocol']['lr']['select']}\"." if matrix["protocol"]["lr"].get("grid")
                    else f"; every defence at lr {fmt(matrix['protocol']['lr']['fixed'])}.")
                 + _clean_data_note(matrix["protocol"].get("clean_data", "real")))
    return "\n".join(lines)


def _clean_data_note(clean_data) -> str:
    """The footnote naming synthetic cleaning pairs (nothing for real ones)."""
    if clean_data == "real":
        return ""
    return (f" Cleaned on {clean_data['synthetic']} synthetic pairs (a {clean_data['family']} generator trained on "
            f"the foundation's pre-training pairs only); the validation that chooses the rate is real.")


def plot_matrix(path: Path, matrix: dict, attacks: list[str]) -> None:
    """Two heat maps, defence × attack: clean top-1 and ASR, each cell annotated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    defences = list(matrix["cells"])
    tall = len(attacks) > 3  # many attacks: the two maps one above the other
    w, h = 2.2 + 1.1 * len(attacks), 1.2 + 0.45 * len(defences)
    fig, axes = plt.subplots(2 if tall else 1, 1 if tall else 2, figsize=(w, 2 * h) if tall else (2 * w, h),
                             constrained_layout=True)
    titles = ("clean top-1 %", f"ASR % → '{matrix['protocol']['target']}'")
    for ax, metric, title, cmap in zip(axes, ("clean_top1", "asr"), titles, ("Greens", "Reds")):
        v = np.array([[matrix["cells"][d].get(a, {}).get(metric, np.nan) for a in attacks] for d in defences])
        lo = 0 if metric == "asr" else max(0, 5 * np.floor(np.nanmin(v) / 5) - 10)  # clean: spread the colours
        ax.imshow(v, cmap=cmap, vmin=lo, vmax=100, aspect="auto")
        for i in range(len(defences)):
            for j in range(len(attacks)):
                if not np.isnan(v[i, j]):
                    ax.text(j, i, f"{v[i, j]:.1f}", ha="center", va="center", fontsize=9,
                            color="white" if (v[i, j] - lo) / (100 - lo) > 0.6 else "black")
        ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
        ax.set_yticks(range(len(defences)), defences)
        ax.set_title(title)
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def curves_table(curve_settings: dict, curves: dict, plants: dict) -> str:
    """One Markdown table per (curve, attack): defence × knob value, each cell "clean top-1 / ASR"."""
    lines = []
    for curve, by_attack in curves.items():
        knob, values = curve_settings[curve]["knob"], curve_settings[curve]["values"]
        for attack, by_defence in by_attack.items():
            p = plants[attack]["test"]
            lines += [f"**{knob}** on `{attack}` (planted: {p['clean_top1']:.1f} / {p['asr']:.1f})", "",
                      "| defence | " + " | ".join(f"{knob} {fmt(v)}" for v in values) + " |",
                      "|---|" + "---|" * len(values)]
            for d, pts in by_defence.items():
                at = {q["value"]: q for q in pts}
                lines.append(f"| {d} | " + " | ".join(f"{at[v]['clean_top1']:.1f} / {at[v]['asr']:.1f}" if v in at
                                                       else "–" for v in values) + " |")
            lines.append("")
    return "\n".join(lines)


def plot_curves(curve_settings: dict, path: Path, curves: dict, plants: dict, target: str) -> None:
    """Per (curve, attack): ASR (x) against clean top-1 (y), one line per defence through its knob values, each
    point labelled with its value; the planted model is the black star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(c, a) for c, by_attack in curves.items() for a in by_attack]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), constrained_layout=True,
                             squeeze=False)
    for ax, (curve, attack) in zip(axes[0], panels):
        knob = curve_settings[curve]["knob"]
        for d, pts in curves[curve][attack].items():
            xs, ys = [q["asr"] for q in pts], [q["clean_top1"] for q in pts]
            ax.plot(xs, ys, "o-", label=d)
            for q in pts:
                ax.annotate(fmt(q["value"]), (q["asr"], q["clean_top1"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
        p = plants[attack]["test"]
        ax.plot([p["asr"]], [p["clean_top1"]], "k*", markersize=11, label="planted (none)")
        ax.set_xlabel(f"ASR % → '{target}' (lower is better)")
        ax.set_ylabel("clean top-1 % (higher is better)")
        ax.set_title(f"{knob} on {attack}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_traces(path: Path, records: list[dict], target: str) -> None:
    """The course of traced cleaning runs (:mod:`parclip.protocol.traces`), one line per run, against the optimiser
    step: the distances to the planted model (image solid, text dashed), the share of the last 10 steps in which
    PAR's image term pushed, clean validation top-1, and validation ASR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4), constrained_layout=True)
    for i, r in enumerate(records):
        colour, label = plt.cm.tab10(i % 10) if len(records) <= 10 else plt.cm.tab20(i % 20), r["label"]
        steps = r["trace"]["steps"]
        xs = [q["step"] for q in steps]
        if steps and "dist_img" in steps[0]:
            axes[0].plot(xs, [q["dist_img"] for q in steps], "-", color=colour, label=label, lw=1)
            axes[0].plot(xs, [q["dist_txt"] for q in steps], "--", color=colour, lw=1)
            on = [q["on_img"] for q in steps]
            axes[1].plot(xs, [sum(on[max(0, j - 9):j + 1]) / len(on[max(0, j - 9):j + 1]) for j in range(len(on))],
                         color=colour, label=label, lw=1)
        val = r["trace"]["val"]
        axes[2].plot([q["step"] for q in val], [q["val_clean_top1"] for q in val], "o-", color=colour, ms=3,
                     label=label)
        if val and "val_asr" in val[0]:
            axes[3].plot([q["step"] for q in val], [q["val_asr"] for q in val], "o-", color=colour, ms=3,
                         label=label)
    titles = ("distance to the planted model (image —, text - -)", "share of steps the image term pushes (last 10)",
              "validation clean top-1 %", f"validation ASR % → '{target}'")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[3].legend(fontsize=7)
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def goal_table(matrix: dict, attacks: list[str], *, defence: str = "par", max_asr: float = 5.0,
               max_drop: float = 2.0) -> str:
    """Per attack, whether `defence` reaches the goal of docs/par_recovery.md: ASR ≤ `max_asr` at clean top-1 ≥ the
    planted model's − `max_drop`, and at most half the ASR of the best other cleaning defence (the lowest ASR among
    them, planted model excluded)."""
    lines = [f"| attack | planted | {defence} | best other (ASR) | ASR ≤ {max_asr:g} | clean ≥ planted − {max_drop:g} "
             f"| ≤ ½ best other | goal |", "|---|---|---|---|---|---|---|---|"]
    cells = matrix["cells"]
    for a in attacks:
        if a not in cells.get(defence, {}) or a not in cells.get("none", {}):
            continue
        p, d = cells["none"][a], cells[defence][a]
        others = {k: row[a] for k, row in cells.items() if k not in ("none", defence) and a in row}
        best = min(others, key=lambda k: others[k]["asr"]) if others else None
        ok = (d["asr"] <= max_asr, d["clean_top1"] >= p["clean_top1"] - max_drop,
              best is None or d["asr"] <= others[best]["asr"] / 2)
        marks = ["yes" if x else "**no**" for x in ok]
        lines.append(f"| `{a}` | {p['clean_top1']:.1f} / {p['asr']:.1f} | {d['clean_top1']:.1f} / {d['asr']:.1f} | "
                     + (f"{best} ({others[best]['asr']:.1f})" if best else "–") + f" | {' | '.join(marks)} | "
                     + ("**reached**" if all(ok) else "not reached") + " |")
    return "\n".join(lines)
