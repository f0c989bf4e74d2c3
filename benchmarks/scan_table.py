"""The scan on every model of the embedded benchmark: a detection table with true and false positives, thresholds
calibrated on some attacks and the others held out (docs/scan.md).

    .venv/bin/python benchmarks/scan_table.py --cache bench_defences --cells bench_defender/cells … --out docs/scan \\
        [--calibrate badnet_rs sig blended] [--smoke]

Models: the clean foundation (CACHE/runs/foundation), each planted model (CACHE/runs/plant-<attack>.json) and each
cleaned model whose cell is in a --cells folder (benchmarks/defence_matrix.py's cells: the rate its rule chose).
Ground truth: a model carries the backdoor when its test ASR for the planted trigger is at least TRUTH_MARGIN points
above the clean foundation's natural rate for that trigger (the row "foundation" of the matrix).

Each model is scanned once (OUT/scans/<model>/scan.json, reused when present, so the script resumes) on CACHE's test
folder with `parclip scan`'s defaults. Verdicts are then recomputed from the stored statistics two ways: alone, and
against the clean foundation's scan as the reference (a defender who holds the public model the suspect was
fine-tuned from). Thresholds, per statistic: the most extreme value among the calibration set's clean models (the
foundation and the calibration attacks' models without the backdoor), moved by MARGIN (lifts × 1.25, ratios and areas
× 0.8), so that no calibration model without a backdoor is flagged. The held-out attacks' models never enter it.

Writes OUT/scan_table.json, OUT/scan_table.md (printed) and OUT/triggers.png (inverted triggers beside the real ones).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from parclip.attacks.triggers import get_trigger, pil_to_uint8, squash_resize, uint8_to_pil
from parclip.data.sources import open_labelled
from parclip.models import create_model, get_tokenizer
from parclip.protocol.settings import TARGET, TRIGGER_PARAMS
from parclip.scan import ScanConfig, decide, scan, write_scan
from parclip.scan.run import compare_reference
from parclip.utils.files import atomic_write, write_json, write_text

TRUTH_MARGIN = 20.0
CALIBRATE = ("badnet_rs", "sig", "blended")
LIFT_MARGIN, RATIO_MARGIN = 1.25, 0.8


def models(cache: Path, cells: list[Path]) -> list[dict]:
    """[{id, kind, attack, model, asr, natural}] for the foundation, the plants and the cleaned cells."""
    out = [{"id": "foundation", "kind": "foundation", "attack": None, "model": cache / "runs/foundation/model",
            "asr": None, "natural": None}]
    natural = {}
    for p in sorted((cache / "runs").glob("plant-*.json")):
        d = json.loads(p.read_text())
        a = d["spec"]["attack"]
        natural[a] = d["foundation_test"]["asr"]
        out.append({"id": f"planted {a}", "kind": "planted", "attack": a, "model": Path(d["model"]),
                    "asr": d["test"]["asr"], "natural": natural[a]})
    for folder in cells:
        for p in sorted(folder.glob("*.json")):
            d = json.loads(p.read_text())
            if d["defence"] == "none" or d["attack"] not in natural:
                continue
            n = p.stem.rpartition("__synth")[2] if "__synth" in p.stem else ""
            src = f"synthetic {int(n) // 1000}k" if n.isdigit() else "real"
            out.append({"id": f"{d['defence']} {src} {d['attack']}", "kind": f"{d['defence']} ({src})",
                        "attack": d["attack"], "model": Path(d["model"]), "asr": d["test"]["asr"],
                        "natural": natural[d["attack"]]})
    for m in out:
        m["backdoored"] = m["asr"] is not None and m["asr"] - m["natural"] >= TRUTH_MARGIN
    return out


def scan_one(m: dict, data: Path, out: Path, cfg: ScanConfig) -> dict:
    target = out / "scans" / m["id"].replace(" ", "_")
    if (target / "scan.json").exists():
        return json.loads((target / "scan.json").read_text())
    name = f"local-dir:{m['model']}"
    model, pp = create_model(name)
    src = open_labelled(data)
    result, found = scan(model, pp, get_tokenizer(name), src, classnames=src.classnames, templates="fashion",
                         config=cfg, workers=0, progress=False)
    write_scan(target, result, found, model=m["id"])
    print(f"  {m['id']}: {'BACKDOORED' if result['verdict']['backdoored'] else 'clean'} "
          f"({result['seconds']['total']:.0f} s)", flush=True)
    return result


STATS = {  # statistic: (the verdict it belongs to, how to read it from that verdict's result, fires "high" or "low")
    "sweep_lift": ("alone", lambda r: max((x["lift"] for x in r["sweep"]), default=None), "high"),
    "anomaly": ("alone", lambda r: max(x["anomaly_index"] for x in r["classifier"]["per_class"]), "high"),
    "encoder_area": ("alone", lambda r: r["encoder"]["area"], "low"),
    "sweep_excess": ("ref", lambda r: max((x.get("excess", -1e9) for x in r["sweep"]), default=None), "high"),
    "class_ratio": ("ref", lambda r: min(x.get("reference_ratio", 1e9) for x in r["classifier"]["per_class"]), "low"),
    "encoder_ratio": ("ref", lambda r: r["encoder"].get("reference_ratio"), "low"),
}


def with_reference(result: dict, reference: dict) -> dict:
    r = copy.deepcopy(result)
    compare_reference(reference, r["sweep"], r["encoder"], r["classifier"], r["classnames"])
    return r


def calibrate(rows: list[dict]) -> dict:
    """Per statistic, the threshold that flags no calibration model without the backdoor (module docstring)."""
    out = {}
    for stat, (mode, read, side) in STATS.items():
        vals = [read(r[mode]) for r in rows if r["calibration"] and not r["backdoored"]
                and not (mode == "ref" and r["id"] == "foundation")]
        vals = [v for v in vals if v is not None]
        if not vals:
            continue
        out[stat] = max(vals) * LIFT_MARGIN if side == "high" else min(vals) * RATIO_MARGIN
    return out


def verdicts(rows: list[dict], thresholds: dict) -> None:
    for r in rows:
        for mode in ("alone", "ref"):
            res = r[mode]
            r[f"verdict_{mode}"] = decide(res["sweep"], res["encoder"], res["classifier"], thresholds)



def _cell(v: dict, truth: bool, target: str) -> str:
    tests = [e["test"].split()[0] for e in v["evidence"] if e["fired"]]
    mark = "TP" if v["backdoored"] and truth else "FP" if v["backdoored"] else "FN" if truth else "TN"
    if mark == "TP" and v["target"] != target:
        mark = "TP, wrong target"
    return f"{mark}: {'+'.join(tests) or '–'}" + (f" → {v['target']}" if v["target"] else "")


def counts(rows: list[dict], mode: str, calibration: bool) -> dict:
    c = {"TP": 0, "FP": 0, "FN": 0, "TN": 0}
    for r in rows:
        if r["id"] == "foundation" and mode == "ref" or r["calibration"] != calibration:
            continue
        flagged = r[f"verdict_{mode}"]["backdoored"]
        c[("T" if flagged == r["backdoored"] else "F") + ("P" if flagged else "N")] += 1
    return c


def table(rows: list[dict], thresholds: dict, calibrate_on) -> str:
    lines = ["| model | attack | ASR % (natural) | backdoor | held out | alone | vs the foundation's scan | "
             "class-level smallest mask (class) | encoder mask |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["alone"]["classifier"]["per_class"]
        small = min(per, key=lambda x: x["area"])
        asr = "–" if r["asr"] is None else f"{r['asr']:.1f} ({r['natural']:.1f})"
        lines.append(f"| {r['kind']} | {r['attack'] or '–'} | {asr} | {'yes' if r['backdoored'] else 'no'} | "
                     f"{'' if r['calibration'] else 'held out'} | "
                     f"{_cell(r['verdict_alone'], r['backdoored'], TARGET)} | "
                     + ("(the reference) | " if r["id"] == "foundation" else
                        f"{_cell(r['verdict_ref'], r['backdoored'], TARGET)} | ")
                     + f"{small['area']:.4f} ({small['class']}) | {r['alone']['encoder']['area']:.4f} |")
    lines += ["", "| | calibration: TP / FP / FN / TN | held out: TP / FP / FN / TN |", "|---|---|---|"]
    for mode, label in (("alone", "alone"), ("ref", "vs the foundation's scan")):
        cal, held = counts(rows, mode, True), counts(rows, mode, False)
        lines.append(f"| {label} | {' / '.join(str(cal[k]) for k in ('TP', 'FP', 'FN', 'TN'))} | "
                     f"{' / '.join(str(held[k]) for k in ('TP', 'FP', 'FN', 'TN'))} |")
    lines += ["", "Thresholds (calibrated on the foundation and the " + ", ".join(calibrate_on) + " models): "
              + ", ".join(f"{k} {v:.4g}" for k, v in thresholds.items())]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], out: Path, cache: Path, attacks=("badnet_rs", "blended_rs", "badnet", "water_patt",
                                                               "tri_patt", "warped")) -> None:
    """Per planted attack: its real trigger on a grey image, then the scan's class-level trigger for its target."""
    tiles = []
    for a in attacks:
        png = out / "scans" / f"planted_{a}" / "triggers" / "class_bag.png"
        if not png.exists():
            continue
        params = dict(TRIGGER_PARAMS.get(a, {}))
        trig = get_trigger(a, 32, **params)
        real = trig(uint8_to_pil(torch.full((3, 32, 32), 128, dtype=torch.uint8)),
                    generator=torch.Generator().manual_seed(0)).resize((96, 96), Image.NEAREST)
        inv = Image.open(png).convert("RGB")
        tiles.append((real, inv.crop((0, 0, 2 * 100, 96))))
    if not tiles:
        return
    canvas = Image.new("RGB", (96 + 8 + 200, len(tiles) * 104), "white")
    for i, (real, inv) in enumerate(tiles):
        canvas.paste(real, (0, i * 104))
        canvas.paste(inv, (104, i * 104))
    atomic_write(out / "triggers.png", lambda tmp: canvas.save(tmp, format="PNG"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cache", required=True, type=Path, help="the protocol's cache (runs/, data/)")
    ap.add_argument("--cells", nargs="*", type=Path, default=[], help="cells folders of defence_matrix.py runs")
    ap.add_argument("--out", default=Path("docs/scan"), type=Path)
    ap.add_argument("--calibrate", nargs="+", default=list(CALIBRATE), help="attacks the thresholds are set on")
    ap.add_argument("--smoke", action="store_true", help="a tiny scan setting (tests)")
    ap.add_argument("--shard", default="0/1", help="I/N: scan only every N-th model from the I-th (run N at once, "
                    "then once more with the default to write the table from the stored scans)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = (ScanConfig(n_images=128, n_invert=64, encoder_steps=10, class_steps=5, triggers=["badnet_rs", "blended"])
           if args.smoke else ScanConfig())
    rows = models(args.cache, args.cells)
    data = args.cache / "data" / "fashion-mnist" / "test"
    i, n = (int(v) for v in args.shard.split("/"))
    print(f"scanning {len(rows[i::n])} of {len(rows)} models …", flush=True)
    for m in rows[i::n]:
        m["alone"] = scan_one(m, data, args.out, cfg)
    if n > 1:
        return 0
    for m in rows:
        m["calibration"] = m["attack"] is None or m["attack"] in args.calibrate
    reference = rows[0]["alone"]
    for m in rows:
        m["ref"] = with_reference(m["alone"], reference)
    thresholds = calibrate(rows)
    verdicts(rows, thresholds)
    text = table(rows, thresholds, args.calibrate)
    write_text(args.out / "scan_table.md", text)
    write_json(args.out / "scan_table.json", {
        "thresholds": thresholds, "calibrate": args.calibrate, "truth_margin": TRUTH_MARGIN, "settings": vars(cfg),
        "rows": [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items() if k not in ("alone", "ref")}
                 for r in rows]})
    figure(rows, args.out, args.cache)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
