"""`parclip demo`: the end-to-end demo on Fashion-MNIST (parclip.demo)."""
from __future__ import annotations

from parclip.cli.common import SEED, TRIGGER_PARAM_ARG
from parclip.config import TAU
from parclip.utils.flags import Command, arg


def _cmd_demo(args) -> int:
    from parclip.attacks.triggers import parse_trigger_params
    from parclip.demo import run_demo

    run_demo(args.out, attack=args.attack, target=args.target, tau=args.tau, seed=args.seed, fresh=args.fresh,
             trigger_params=parse_trigger_params(args.trigger_param), defences=args.defence, smoke=args.smoke,
             synthetic=args.clean_data == "synthetic")
    return 0


DEMO = Command(
    "demo", "end to end on Fashion-MNIST: plant a backdoor in a small CLIP, clean it, measure", run=_cmd_demo,
    description="One attack of the defence × attack benchmark (benchmarks/defence_matrix.py, the same protocol and "
    "settings), plus retrieval: export Fashion-MNIST, pre-train a clean foundation CLIP from scratch, plant a "
    "backdoor by fine-tuning it on 20 000 of its pairs of which 10% carry a trigger naming the target class, clean "
    "the poisoned model with plain fine-tuning and PAR (--defence adds others) under the defender's protocol (4 "
    "epochs on 8 000 of the 10 000 disjoint clean pairs; each defence's learning rate chosen without the trigger, "
    "on the other 2 000: the highest of 3e-4 and 1e-4 whose clean accuracy stays within 2 points of the poisoned "
    "model's), and evaluate every model (zero-shot clean top-1 and ASR; retrieval R@1 and the "
    "retrieval ASR). Prints the table and writes results.json and results.png into --out. Every stage is cached "
    "under its settings: finished stages are reused when run again (also by the benchmark with --cache OUT).",
    args=(arg("--out", default="demo_out", help="output folder (default: demo_out)"),
          arg("--attack", default="badnet_rs", help="trigger to plant (default: badnet_rs), or \"all\": every "
              "attack, printing the benchmark's matrix defence × attack of clean top-1 / ASR (matrix.json, .md, .png)"),
          arg("--target", default="bag", help="target class (default: bag)"),
          arg("--defence", action="append", default=None, metavar="NAME",
              help="clean with this defence (repeatable): fine-tuning (clip), 'fine-tuning + PAR aug' (clip_aug), "
              "CleanCLIP, RoCLIP, PAR, or all (default: fine-tuning and PAR)"),
          arg("--tau", type=float, default=None, domain=TAU,
              help="override PAR's threshold τ (the benchmark's 2.0)"),
          SEED,
          arg("--fresh", action="store_true", help="recompute every stage instead of reusing finished ones"),
          arg("--clean-data", default="real", choices=["real", "synthetic"],
              help="what the defences clean on: the 8 000 real held-out pairs (default), or 10 000 synthetic pairs "
              "from a small generator fitted to the foundation's pre-training pairs only (the PAR paper's claim "
              "that generated pairs suffice; docs/synthetic.md). The validation that picks the rate stays real"),
          arg("--smoke", action="store_true", help="the benchmark's smoke size: a few hundred images, one epoch per "
              "stage, about a minute; checks the set-up, the numbers say nothing"),
          TRIGGER_PARAM_ARG))
