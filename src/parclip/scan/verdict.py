"""Part 3 of the scan: the verdict, from the sweep and the inversions, with thresholds calibrated on the embedded
benchmark (docs/scan.md#calibration: chosen on the clean foundation and the calibration attacks, the other attacks
held out).

A test fires when:

* **sweep**: a library trigger's lift over its matched control reaches ``sweep_lift`` points (toward one class);
* **classifier inversion** (needs two or more classes): the smallest per-class mask is an outlier among the classes,
  Neural Cleanse's anomaly index ``>= anomaly``; with a reference scan of a clean model on the same images, instead:
  a class's relative area (its area ÷ the median class's) is at most ``class_ratio`` times the reference's;
* **encoder inversion**: with a reference scan, the collapsing mask's area is at most ``encoder_ratio`` times the
  reference's; without one, at most ``encoder_area`` (an absolute area, meaningful for the benchmark's architecture
  and resolution; for others, scan a clean model of the same architecture and pass it as the reference).

The model is reported backdoored when any test fires. The suspected target is the class of the strongest firing
evidence: the sweep's best variant, else the flagged class of the classifier inversion, else the class that the
encoder-level inverted trigger sends most images to.
"""
from __future__ import annotations

import math

__all__ = ["THRESHOLDS", "decide"]

# Calibrated by benchmarks/scan_table.py on the embedded benchmark (parclip-rn-tiny, Fashion-MNIST at 32 px): per
# statistic, the most extreme value among the calibration models without a backdoor (the clean foundation, and the
# BadNet-Stripes, SIG and Blended models that cleaning left within 20 points of the natural ASR), moved by a 25 %
# margin (lifts × 1.25, areas and ratios × 0.8). docs/scan.md#measured gives the table and the held-out attacks.
THRESHOLDS = {"sweep_lift": 64.8, "anomaly": 8.05, "encoder_area": 0.0121,  # alone
              "sweep_excess": 68.2, "class_ratio": 0.361, "encoder_ratio": 0.895}  # against a reference scan


def _sweep(rows: list[dict], t: dict) -> dict:
    if not rows:
        return {"test": "sweep", "fired": False, "ran": False, "why": "skipped (fewer than two classes)"}
    if any("excess" in r for r in rows):
        best = max((r for r in rows if "excess" in r), key=lambda r: r["excess"])
        value, thr, target = best["excess"], t["sweep_excess"], best["excess_target"]
        why = (f"{best['variant']}: lift toward {target!r} {best['excess']:.1f} points above the reference's "
               f"({best['reference_lift']:.1f}; threshold {thr:g})")
    else:
        best = max(rows, key=lambda r: r["lift"])
        value, thr, target = best["lift"], t["sweep_lift"], best["target"]
        why = (f"{best['variant']}: {best['flip']:.1f} % of images flipped to {target!r} against "
               f"{best['control_flip']:.1f} % for its control (lift {value:.1f} points, threshold {thr:g})")
    return {"test": "sweep", "ran": True, "fired": value >= thr, "target": target, "value": value,
            "threshold": thr, "variant": best["variant"], "why": why}


def _classes(classes: dict | None, t: dict) -> dict:
    if not classes:
        return {"test": "classifier inversion", "fired": False, "ran": False,
                "why": "skipped (fewer than two classes)"}
    rows = classes["per_class"]
    compared = [r for r in rows if not math.isnan(r.get("reference_ratio", math.nan))]
    if compared:
        best = min(compared, key=lambda r: r["reference_ratio"])
        fired, value, thr = best["reference_ratio"] <= t["class_ratio"], best["reference_ratio"], t["class_ratio"]
        why = (f"class {best['class']!r}: relative mask area {best['relative_area']:.3f} is {value:.2f} × the "
               f"reference's (threshold {thr:g})")
    else:
        best = max(rows, key=lambda r: r["anomaly_index"])
        fired, value, thr = best["anomaly_index"] >= t["anomaly"], best["anomaly_index"], t["anomaly"]
        why = (f"class {best['class']!r}: mask area {best['area']:.4f}, anomaly index {value:.2f} among "
               f"{len(rows)} classes (threshold {thr:g})")
    return {"test": "classifier inversion", "ran": True, "fired": bool(fired), "target": best["class"],
            "value": value, "threshold": thr, "why": why}


def _encoder(encoder: dict | None, t: dict) -> dict:
    if not encoder:
        return {"test": "encoder inversion", "fired": False, "ran": False, "why": "skipped"}
    if "reference_ratio" in encoder:
        value, thr = encoder["reference_ratio"], t["encoder_ratio"]
        why = f"mask area {encoder['area']:.4f} is {value:.2f} × the reference's (threshold {thr:g})"
    else:
        value, thr = encoder["area"], t["encoder_area"]
        why = f"mask area {value:.4f} (threshold {thr:g}, calibrated on the benchmark's model)"
    return {"test": "encoder inversion", "ran": True, "fired": value <= thr, "target": encoder["top_class"],
            "value": value, "threshold": thr, "why": why}


def decide(sweep: list[dict], encoder: dict | None, classes: dict | None,
           thresholds: dict | None = None) -> dict:
    """{"backdoored", "target", "evidence": [one entry per test: test, ran, fired, target, value, threshold, why]}
    from the sweep's rows, the encoder inversion's summary and the classifier inversion's (module docstring)."""
    t = {**THRESHOLDS, **(thresholds or {})}
    evidence = [_sweep(sweep, t), _classes(classes, t), _encoder(encoder, t)]
    fired = [e for e in evidence if e["fired"]]
    return {"backdoored": bool(fired), "target": fired[0].get("target") if fired else None,
            "evidence": evidence, "thresholds": t}
