"""How PAR recovers: traced cleaning runs of the defence matrix's protocol (docs/par_recovery.md).

    .venv/bin/python benchmarks/par_recovery.py --out bench --attack badnet_rs [--variants par par-3e-4 ...] [--jobs 2]

Each variant is a cleaning recipe (VARIANTS below: the defence, its learning rate and what differs from the
protocol's common budget). It cleans the attack's planted model of the defence matrix (stages A and B, shared with
`benchmarks/defence_matrix.py` through --cache) on the 10 000 held-out pairs, with clean top-1 and ASR measured on
the 2 000-image validation split every 10 steps and the distances to the planted model logged every step, then
measures the final model on the test folder. Writes OUT/recovery/<attack>.json (every run's trace and numbers),
.md (the table) and .png (the traces).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from parclip.protocol import Settings
from parclip.protocol.report import plot_traces
from parclip.protocol.run import foundation_stage, plant_stage, run_all
from parclip.protocol.traces import stage_trace
from parclip.utils.files import write_json, write_text

# name -> the variant: defence, lr, and TrainConfig values that differ from the protocol's CLEAN + DEFENCES[defence]
VARIANTS: dict[str, dict] = {
    "par": dict(defence="par", lr=1e-4),                                   # the matrix's cell
    "par-3e-4": dict(defence="par", lr=3e-4),
    "par-3e-4-4ep": dict(defence="par", lr=3e-4, epochs=4),
    "par-1e-3": dict(defence="par", lr=1e-3),
    "latch": dict(defence="par", lr=1e-4, par_latch=True),
    "latch-3e-4": dict(defence="par", lr=3e-4, par_latch=True),
    "latch-3e-4-4ep": dict(defence="par", lr=3e-4, epochs=4, par_latch=True),
    "latch-1e-3": dict(defence="par", lr=1e-3, par_latch=True),
    "perturb1-3e-4": dict(defence="par", lr=3e-4, perturb_epochs=1),
    "perturb1-3e-4-4ep": dict(defence="par", lr=3e-4, epochs=4, perturb_epochs=1),
    "tautext1-3e-4": dict(defence="par", lr=3e-4, tau_text=1.0),
    "tau1.5-3e-4": dict(defence="par", lr=3e-4, tau=1.5),
    "textoff-3e-4-4ep": dict(defence="par", lr=3e-4, epochs=4, tau_text=0.0),  # thr_0: the text term never acts
    "par-3e-4-6ep": dict(defence="par", lr=3e-4, epochs=6),
    "persample-3e-4": dict(defence="par", lr=3e-4, per_sample_threshold=True),
    "reference-3e-4": dict(defence="par", lr=3e-4, lr_decay_ratio=0.1, schedule="reference", warmup_fraction=0.5,
                           lr_end=0.0),
    "clip_aug-3e-4": dict(defence="clip_aug", lr=3e-4),
    "clip_aug-3e-4-4ep": dict(defence="clip_aug", lr=3e-4, epochs=4),
    "clip-3e-4-4ep": dict(defence="clip", lr=3e-4, epochs=4),
}


def table(records: list[dict], plant: dict) -> str:
    p = plant["test"]
    lines = [f"planted: {p['clean_top1']:.1f} / {p['asr']:.1f} (test clean top-1 % / ASR %)", "",
             "| variant | test clean / ASR | val clean / ASR (end) | distance image / text (last epoch) | "
             "image term pushes (last epoch) | minutes |", "|---|---|---|---|---|---|"]
    for r in records:
        t, v, f = r["test"], r["trace"]["val"][-1], r["trace"]["final"]
        dist = f"{f['dist_img']:.2f} / {f['dist_txt']:.2f}" if "dist_img" in f else "–"
        on = f"{100 * f['on_img']:.0f} %" if "on_img" in f else "–"
        lines.append(f"| {r['label']} | {t['clean_top1']:.1f} / {t['asr']:.1f} | {v['val_clean_top1']:.1f} / "
                     f"{v.get('val_asr', float('nan')):.1f} | {dist} | {on} | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_defences", help="traces go to OUT/traces, the report to OUT/recovery")
    ap.add_argument("--cache", default=None, help="stages A and B (default --out)")
    ap.add_argument("--attack", default="badnet_rs")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--plot", nargs="+", choices=list(VARIANTS), help="draw only these variants (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="processes (1 torch thread each)")
    ap.add_argument("--smoke", action="store_true", help="a few hundred images, 1 epoch per stage")
    args = ap.parse_args(argv)
    t0 = time.time()
    s = Settings(out=args.out, cache=args.cache or args.out, smoke=args.smoke, workers=0 if args.jobs > 1 else 1)
    _, split, foundation, patch = foundation_stage(s, [args.attack])
    plants = plant_stage(s, [args.attack], foundation, split, patch, jobs=1)
    if args.attack not in plants:
        return 1
    plant = plants[args.attack]
    variants = {n: dict(VARIANTS[n], **({"epochs": 1} if args.smoke else {})) for n in args.variants}
    done = run_all(args.jobs, [(stage_trace, s, v, args.attack, plant, patch) for v in variants.values()])
    records = [{**r, "label": n} for n, r in zip(variants, done) if r is not None]
    out = Path(args.out) / "recovery"
    write_json(out / f"{args.attack}.json", {"plant": plant["test"], "runs": records,
                                             "seconds": round(time.time() - t0, 1)})
    md = table(records, plant)
    write_text(out / f"{args.attack}.md", md + "\n")
    plot_traces(out / f"{args.attack}.png", [r for r in records if r["label"] in (args.plot or variants)], s.target)
    print(md)
    return 0 if len(records) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
