"""The defence × attack matrix in the fine-tuning regime: a clean foundation CLIP, a backdoor planted into it by
fine-tuning on poisoned pairs, then cleaning at a fine-tuning learning rate on disjoint clean pairs.

    .venv/bin/python benchmarks/defence_matrix.py --out bench_def [--attacks badnet_rs sig] \\
        [--defences none clip clip_aug par] [--jobs 2] [--lr 1e-4 | --lr-grid 3e-5 1e-4 3e-4 | --defender] \
        [--badclip-side 3] [--smoke]

The protocol lives in parclip.protocol (settings, stages, caching); `parclip demo` runs one attack of it.
Protocol (Fashion-MNIST as image–caption pairs, parclip-rn-tiny at 32 px, target class 'bag', seed 0):

A  Foundation. Export Fashion-MNIST: train.csv (50 000 pre-training pairs), holdout.csv (the last 10 000 train
   images: the defender's clean pairs, never seen by foundation or attacker) and test/ (10 000 labelled images).
   Train parclip-rn-tiny from scratch on train.csv with the plain CLIP loss (FOUNDATION). It is clean.
   With `badclip` among the attacks, a BadCLIP patch is optimised against the foundation (BADCLIP_PATCH).
B  Plant, per attack. Draw PLANT["n_pairs"] pairs from train.csv (seeded; the foundation saw their clean versions, as
   released poisoned CLIPs were fine-tuned from models that had seen clean web data), poison PLANT["rate"] of them
   with the trigger at 32 px (captions rewritten by the fashion templates to name 'bag') and fine-tune the foundation
   on them with the plain CLIP loss (PLANT["train"]: a fine-tuning learning rate, few epochs; PLANT["by_attack"]: the
   declared stronger recipe for the three attacks that the common one planted under 80 % ASR).
C  Clean, per (defence, attack). Fine-tune the planted model on holdout.csv with CLEAN (the common budget: the same
   10 000 pairs, the same number of image passes, batch, schedule, weight decay, BatchNorm and logit-scale handling
   for every defence) plus the defence's own settings DEFENCES[name] (TrainConfig overrides; `none` is the planted
   model itself), at learning rate --lr × LR_SCALE[name] (default: BASE_LR = 1e-4 for every defence).
   With --lr-grid the rate is instead chosen per cell on a validation split: VAL_IMAGES labelled train-side images
   that are not among the planting pairs (the foundation saw them, the test folder is never used), clean and
   triggered; the chosen rate is the one with the lowest validation ASR among those keeping validation clean top-1
   within MAX_VAL_DROP points of a reference: the lower of the planted model's and the defence's own best over the
   grid (so a defence whose augmentation costs accuracy at every rate is still judged on its removal).
   This selection knows the trigger: it is the defence's best case, not something a defender could do.
   With --defender (the defender's protocol, docs/par_recovery.md) nothing is chosen with the trigger: the last
   DEFENDER["val_pairs"] clean pairs are the validation folder and are not trained on, every defence cleans for
   DEFENDER["epochs"] epochs, and each cell takes the highest rate of DEFENDER["lr_grid"] (or --lr-grid) whose
   validation clean top-1 is within MAX_VAL_DROP of the planted model's (none: the most accurate), trying rates from
   the highest down; with `par` and `none` among the defences goal.md says per attack whether PAR reaches the goal.
Metrics, on test/: clean zero-shot top-1 (fashion templates) and ASR = % of triggered non-'bag' images classified
as 'bag'; `asr_all` (all images) is kept in the JSON.

Caching: every stage writes its result JSON with the spec (the full configuration and the key of the stage it
starts from) it was computed for; a stage whose JSON holds the same spec is reused, one whose spec changed is
recomputed (its run folder is wiped first), a killed training resumes from its checkpoint. Stages A and B live under
--cache (default --out), so several matrices can share them; each (defence, attack) cell is written to
OUT/cells/<defence>__<attack>.json as soon as it is finished. --jobs N runs the attacks of stage B and the cells of
stage C in N processes (1 torch thread, no data-loading worker each). At the end: OUT/matrix.json, OUT/matrix.md
(defence × attack, "clean top-1 / ASR") and OUT/matrix.png (heat maps), and the table is printed.

--smoke runs the whole pipeline on a few hundred images with 1 epoch per stage (for testing the script only).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from parclip.protocol import CURVES, DEFENCES, Settings
from parclip.protocol.report import goal_table
from parclip.protocol.run import curves_stage, foundation_stage, matrix_stage, plant_stage
from parclip.protocol.settings import BASE_LR, IMAGE_SIZE, PATCH_SIDE
from parclip.utils.files import write_text


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_defences", help="cells, matrix.json/.md/.png and the cleaning runs")
    ap.add_argument("--cache", default=None, help="stages A and B (data, foundation, planted models); default --out")
    ap.add_argument("--attacks", nargs="+", default=["badnet_rs"])
    ap.add_argument("--defences", nargs="+", default=list(DEFENCES))
    ap.add_argument("--lr", type=float, default=BASE_LR, help="cleaning lr (× LR_SCALE[defence]) without --lr-grid")
    ap.add_argument("--lr-grid", type=float, nargs="+", help="choose the cleaning lr per cell on the validation "
                    "split among these (× LR_SCALE[defence])")
    ap.add_argument("--defender", action="store_true",
                    help="the defender's protocol (DEFENDER in parclip.protocol.settings): every rate chosen without "
                    "the trigger, on validation pairs held out of the clean pairs, with a 4-epoch budget, over the "
                    "grid DEFENDER['lr_grid'] unless --lr-grid is given (docs/par_recovery.md)")
    ap.add_argument("--badclip-side", type=int, default=PATCH_SIDE,
                    help=f"side in pixels of the optimised BadCLIP patch at {IMAGE_SIZE} px (default {PATCH_SIDE}; "
                    "the BadCLIP paper's 16 px at 224 is 0.5 %% of the image, 2-3 px here)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="clean on N synthetic pairs (a generator trained on the foundation's pre-training pairs "
                    "only, SYNTH in parclip.protocol.settings; docs/synthetic.md) instead of the real clean pairs; "
                    "cells and runs get a '-synthN' suffix; give it its own --out (matrix.json/.md) and share --cache")
    ap.add_argument("--jobs", type=int, default=1, help="processes for stages B and C (1 torch thread each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few hundred images, 1 epoch per stage")
    ap.add_argument("--curves", nargs="+", default=[], choices=list(CURVES),
                    help="stage D: trade-off curves (CURVES: tau = PAR's threshold, lr = every defence's rate)")
    ap.add_argument("--curve-attacks", nargs="+", help="attacks of the curves (default: the first of --attacks)")
    ap.add_argument("--stages", default="ABCD", help="run only these stages, e.g. AB (D runs with --curves)")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    unknown = [d for d in args.defences if d not in DEFENCES]
    if unknown:
        ap.error(f"unknown defence(s) {unknown}; known: {', '.join(DEFENCES)}")
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: the number of worker processes, an integer >= 1")
    from parclip.attacks.triggers import trigger_class
    attacks = [trigger_class(a).name for a in args.attacks]
    curve_attacks = [trigger_class(a).name for a in args.curve_attacks or []]
    if not set(curve_attacks) <= set(attacks):
        ap.error(f"--curve-attacks must be among --attacks ({', '.join(attacks)})")
    try:
        common = dict(out=str(Path(args.out).absolute()), cache=str(Path(args.cache or args.out).absolute()),
                      seed=args.seed, smoke=args.smoke, lr=args.lr, workers=0 if args.jobs > 1 else 1,
                      badclip_side=args.badclip_side, synthetic=args.synthetic)
        grid = {"lr_grid": list(args.lr_grid)} if args.lr_grid else {}
        s = Settings.defender(**common, **grid) if args.defender else Settings(**common, **grid)
    except ValueError as e:
        ap.error(str(e))
    t0 = time.time()

    print("[A] data and foundation …", flush=True)
    _, split, foundation, patch = foundation_stage(s, attacks)
    if not set("BCD") & set(args.stages):
        return 0
    print(f"[B] planting {', '.join(attacks)} …", flush=True)
    plants = plant_stage(s, attacks, foundation, split, patch, args.jobs)
    n_failed = len(attacks) - len(plants)
    if "C" in args.stages:
        print(f"[C] cleaning: {', '.join(args.defences)} × {', '.join(attacks)} …", flush=True)
        matrix, table, failed = matrix_stage(s, attacks, args.defences, foundation, plants, patch, args.jobs, t0)
        n_failed += failed
        print(table)
        if "par" in args.defences and "none" in args.defences:
            goals = goal_table(matrix, attacks)
            write_text(Path(s.out) / "goal.md", goals + "\n")
            print(goals)
        print(f"wrote {s.out}/matrix.json, matrix.md, matrix.png in {matrix['seconds']:.0f} s"
              + (f"; {failed} cell(s) FAILED, see above (run again to retry them)" if failed else ""))
    if "D" in args.stages and args.curves:
        t1 = time.time()
        print(f"[D] trade-off curves: {', '.join(args.curves)} …", flush=True)
        table, failed = curves_stage(s, args.curves, curve_attacks, plants, patch, args.jobs)
        n_failed += failed
        print(table)
        print(f"wrote {s.out}/curves.json, curves.md, curves.png in {time.time() - t1:.0f} s"
              + (f"; {failed} point(s) FAILED, see above (run again to retry them)" if failed else ""))
    return 1 if n_failed else 0


if __name__ == "__main__":
    sys.exit(main())
