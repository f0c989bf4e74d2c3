"""The attack × {poisoned, PAR} × {clean top-1, ASR} matrix on the embedded Fashion-MNIST benchmark, fixed seeds.

    .venv/bin/python benchmarks/attack_matrix.py --out bench_out [--attacks badnet_rs sig ...] [--jobs 2]

Each attack runs the demo pipeline (`parclip demo --attack NAME`): 1 % poisoned pre-training of parclip-rn-tiny from
scratch, then PAR on the 10k held-out clean pairs. With --jobs N the attacks are split over N processes (1 thread
each). Prints the matrix and writes matrix.json / matrix.png into --out (docs/ keeps the copy the README shows).
BadCLIP needs a patch: pass --patch PATH (e.g. from `parclip attack optimize-patch`), else it is skipped.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--attacks", nargs="*", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch", default=None, help="BadCLIP patch file")
    args = ap.parse_args()

    from parclip.attacks.triggers import list_triggers
    from parclip.demo import format_matrix, plot_matrix
    from parclip.utils.files import write_json

    names = args.attacks or [c.name for c in list_triggers() if c.name != "badclip" or args.patch]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    shards = [names[i::args.jobs] for i in range(args.jobs)]
    procs = []
    for k, shard in enumerate(shards):
        if not shard:
            continue
        code = ("import json, sys; from parclip.demo import run_matrix; "
                f"run_matrix({str(out / f'shard{k}')!r}, attacks={shard!r}, seed={args.seed}, "
                f"trigger_params={({'patch': args.patch} if args.patch else {})!r})")
        env = dict(os.environ, OMP_NUM_THREADS="1" if args.jobs > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
        log = open(out / f"shard{k}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    matrix, skipped = [], {}
    for k in range(len(shards)):
        f = out / f"shard{k}" / "matrix.json"
        if f.is_file():
            r = json.loads(f.read_text())
            matrix += r["matrix"]
            skipped.update(r["skipped"])
    matrix.sort(key=lambda m: names.index(m["attack"]))
    result = {"matrix": matrix, "skipped": skipped, "seed": args.seed, "seconds": round(time.time() - t0, 1)}
    write_json(out / "matrix.json", result)
    plot_matrix(out / "matrix.png", matrix, "bag")
    print(format_matrix(matrix))
    print(f"{len(matrix)} attacks in {result['seconds']:.0f} s; wrote {out / 'matrix.json'}, {out / 'matrix.png'}")
    return max(codes) if codes else 0


if __name__ == "__main__":
    raise SystemExit(main())
