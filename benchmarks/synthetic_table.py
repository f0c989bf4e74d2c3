"""The defence × attack matrix with one row per (defence, data source): cleaned on the defender's real held-out pairs
or on synthetic pairs only (docs/synthetic.md).

    .venv/bin/python benchmarks/synthetic_table.py --real docs/par_recovery/defender/matrix.json \\
        --synthetic bench_synth/matrix.json [more matrix.json …] --out docs/synthetic/matrix

Reads the matrix.json files that `benchmarks/defence_matrix.py --defender [--synthetic N]` writes (each holds its
protocol, plants and cells) and puts their cells side by side: per attack the planted model, then each defence on real
pairs and on N synthetic pairs, test clean top-1 / ASR with the rate the defender's rule chose. A summary per row
counts the attacks whose ASR is at most 5 % and 10 % and gives the mean clean top-1 lost against the planted model.
Writes OUT.md and OUT.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from parclip.utils.files import write_json, write_text

NAMES = {"clip": "fine-tuning", "par": "PAR", "clip_aug": "fine-tuning + PAR's aug", "cleanclip": "CleanCLIP",
         "roclip": "RoCLIP"}


def load(paths: list[Path], source: str) -> tuple[dict, dict]:
    """({(defence, source): {attack: cell}}, {attack: planted test}) of matrix.json files (a later file's cells and
    plants replace an earlier one's for the same attack)."""
    rows, plants = {}, {}
    for p in paths:
        d = json.loads(p.read_text())
        clean_data = d["protocol"].get("clean_data")
        n = clean_data.get("synthetic", 0) if isinstance(clean_data, dict) else 0  # "real" in runs on real pairs
        label = f"{n // 1000}k synthetic" if source == "synthetic" else "real"
        for a, plant in d["plants"].items():
            plants[a] = plant["test"]
        for defence, cells in d["cells"].items():
            if defence == "none":
                continue
            rows.setdefault((defence, label), {}).update(cells)
    return rows, plants


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", nargs="+", type=Path, required=True)
    ap.add_argument("--synthetic", nargs="+", type=Path, required=True)
    ap.add_argument("--defences", nargs="+", default=["clip", "par"])
    ap.add_argument("--out", type=Path, default=Path("docs/synthetic/matrix"))
    args = ap.parse_args(argv)
    real, plants_real = load(args.real, "real")
    synth, plants = load(args.synthetic, "synthetic")
    attacks = [a for a in plants_real if a in plants] + [a for a in plants if a not in plants_real]
    rows = {k: v for k, v in {**real, **synth}.items() if k[0] in args.defences}
    base = {src: (plants_real if src == "real" else plants) for _, src in rows}  # each row against its own plants
    order = sorted(rows, key=lambda k: (args.defences.index(k[0]), k[1] != "real", k[1]))
    head = ("| defence | cleaned on | " + " | ".join(f"`{a}`" for a in attacks)
            + " | ASR ≤ 5 % | ASR ≤ 10 % | clean lost |")
    lines = [head, "|---|---|" + "---|" * (len(attacks) + 3),
             "| none (planted) | – | " + " | ".join(f"{plants[a]['clean_top1']:.1f} / {plants[a]['asr']:.1f}"
                                               for a in attacks) + " | | | |"]
    summary = {}
    for key in order:
        cells = rows[key]
        got = [a for a in attacks if a in cells]
        lost = [base[key[1]][a]["clean_top1"] - cells[a]["clean_top1"] for a in got]
        summary[f"{key[0]} {key[1]}"] = s = {
            "attacks": len(got), "asr_le_5": sum(cells[a]["asr"] <= 5 for a in got),
            "asr_le_10": sum(cells[a]["asr"] <= 10 for a in got), "mean_clean_lost": sum(lost) / max(len(lost), 1)}
        lines.append(f"| {NAMES.get(key[0], key[0])} | {key[1]} | " + " | ".join(
            f"{cells[a]['clean_top1']:.1f} / {cells[a]['asr']:.1f} ({cells[a]['lr']:g})" if a in cells else "–"
            for a in attacks) + f" | {s['asr_le_5']} of {s['attacks']} | {s['asr_le_10']} of {s['attacks']} | "
            f"{s['mean_clean_lost']:.1f} |")
    text = "\n".join(lines) + ("\n\nclean top-1 % / ASR % on the 10 000 test images (target 'bag'), (x) = the rate the "
                               "defender's rule chose on the real validation split; clean lost = mean points below "
                               "the planted model the row cleaned (the real rows' plants come from the --real runs, "
                               "the planted row shows the synthetic runs').\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out.with_suffix(".md"), text)
    write_json(args.out.with_suffix(".json"), {"plants": plants, "summary": summary, "rows": {
        f"{d} {src}": cells for (d, src), cells in rows.items()}, "sources": {
        "real": [str(p) for p in args.real], "synthetic": [str(p) for p in args.synthetic]}})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
