"""Running the protocol: stages A and B for the asked attacks, the matrix of stage C, the curves of stage D, in this
process or in N worker processes (`jobs`), each finished stage cached so a killed run resumes where it was."""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from parclip.utils.files import write_json, write_text

from .report import curves_table, markdown_table, plot_curves, plot_matrix
from .settings import LR_SCALE, MODEL, SELECTION_RULES, SYNTH, Settings
from .stages import (export_data, point_config, split_holdout, split_train, stage_badclip_patch, stage_cell,
                     stage_foundation, stage_plant, stage_point, stage_synthetic)


def _init_worker() -> None:
    """A worker process of `jobs` > 1: one torch thread (its data loading runs in-process: `Settings.workers` = 0)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)


def run_all(jobs: int, calls: list[tuple]) -> list:
    """Run `fn(*args)` for each (fn, *args), in this process (jobs == 1) or in `jobs` spawned processes. A call
    that fails is reported and gives None; the others go on (their results are cached as they finish)."""
    def failed(call, e):
        print(f"    FAILED {call[0].__name__}{tuple(a for a in call[2:] if isinstance(a, (str, float)))}: "
              f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)

    results = [None] * len(calls)
    if jobs <= 1:
        for i, (fn, *a) in enumerate(calls):
            try:
                results[i] = fn(*a)
            except Exception as e:  # noqa: BLE001 - one broken cell must not cost the others
                failed(calls[i], e)
        return results
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        futures = {pool.submit(fn, *a): i for i, (fn, *a) in enumerate(calls)}
        for f in as_completed(futures):
            try:
                results[futures[f]] = f.result()
            except Exception as e:  # noqa: BLE001
                failed(calls[futures[f]], e)
    return results


def foundation_stage(s: Settings, attacks: list[str]) -> tuple[dict, dict, dict, str | None]:
    """Stage A: (data paths, the planting/validation split, the foundation's record, the BadCLIP patch or None)."""
    data = export_data(s)
    split = split_train(s, data)
    if s.select == "defender":
        split_holdout(s, data)
    if s.synthetic:
        synth = stage_synthetic(s, data)
        print(f"    synthetic clean pairs: {synth['n']} from {synth['generator']}", flush=True)
    foundation = stage_foundation(s, data)
    print(f"    foundation: clean top-1 {foundation['clean_top1']:.1f}%", flush=True)
    needs_patch = "badclip" in attacks and "patch" not in s.trigger_params.get("badclip", {})
    patch = stage_badclip_patch(s, foundation, split)["patch"] if needs_patch else None
    return data, split, foundation, patch


def plant_stage(s: Settings, attacks: list[str], foundation: dict, split: dict, patch: str | None,
                jobs: int = 1) -> dict:
    """Stage B: attack -> its planted model's record (attacks whose planting failed are left out, reported)."""
    planted = run_all(jobs, [(stage_plant, s, a, foundation, split, patch) for a in attacks])
    plants = {a: p for a, p in zip(attacks, planted) if p is not None}
    for a, p in plants.items():
        print(f"    {a}: clean top-1 {p['test']['clean_top1']:.1f}%, ASR {p['test']['asr']:.1f}% "
              f"({p['n_poison']} of {p['n_rows']} pairs poisoned)", flush=True)
    return plants


def matrix_stage(s: Settings, attacks: list[str], defences: list[str], foundation: dict, plants: dict,
                 patch: str | None, jobs: int = 1, t0: float | None = None) -> tuple[dict, str, int]:
    """Stage C: every (defence, attack) cell; writes OUT/matrix.json, .md and .png; returns (matrix, its Markdown
    table, failed cells)."""
    t0 = time.time() if t0 is None else t0
    # attack by attack, so that whatever is finished when a long run is stopped is whole columns
    calls = [(stage_cell, s, d, a, plants[a], patch) for a in attacks if a in plants for d in defences]
    cells = [c for c in run_all(jobs, calls) if c is not None]
    matrix = {"protocol": protocol_record(s, attacks, defences),
              "foundation": {k: foundation[k] for k in ("clean_top1", "clean_top5")},
              "plants": {a: {k: p[k] for k in ("test", "foundation_test", "n_poison", "n_rows", "minutes")}
                         for a, p in plants.items()},
              "cells": {d: {} for d in defences}, "seconds": round(time.time() - t0, 1)}
    for c in cells:
        matrix["cells"][c["defence"]][c["attack"]] = {**c["test"], "lr": c.get("lr"), "grid": c.get("grid")}
    write_json(Path(s.out) / "matrix.json", matrix)
    table = markdown_table(matrix, attacks)
    write_text(Path(s.out) / "matrix.md", table + "\n")
    plot_matrix(Path(s.out) / "matrix.png", matrix, attacks)
    return matrix, table, len(calls) - len(cells)


def curves_stage(s: Settings, curves: list[str], curve_attacks: list[str], plants: dict, patch: str | None,
                 jobs: int = 1) -> tuple[str, int]:
    """Stage D: the asked trade-off curves; writes OUT/curves.json, .md and .png; returns (table, failed points)."""
    t0 = time.time()
    points, n_failed = _curve_points(s, curves, curve_attacks, plants, patch, jobs)
    by_curve = {c: {} for c in curves}
    for p in points:
        by_curve[p["curve"]].setdefault(p["attack"], {}).setdefault(p["defence"], []).append(
            {"value": p["value"], **p["test"]})
    for by_attack in by_curve.values():
        for by_defence in by_attack.values():
            for pts in by_defence.values():
                pts.sort(key=lambda q: q["value"])
    write_json(Path(s.out) / "curves.json", {"protocol": {"curves": {c: s.curves[c] for c in curves},
                                                          "lr": s.lr, "scale": LR_SCALE, "clean": s.clean},
                                             "plants": {a: plants[a]["test"] for a in plants},
                                             "curves": by_curve, "seconds": round(time.time() - t0, 1)})
    table = curves_table(s.curves, by_curve, plants)
    write_text(Path(s.out) / "curves.md", table + "\n")
    plot_curves(s.curves, Path(s.out) / "curves.png", by_curve, plants, s.target)
    return table, n_failed


def _curve_points(s: Settings, curves: list[str], curve_attacks: list[str], plants: dict, patch: str | None,
                  jobs: int) -> tuple[list[dict], int]:
    """Every point of the asked curves; a point whose training run (run folder) another point already has runs
    after all the others, in this process, so `jobs` never trains one folder twice at once. A curve attack whose
    plant failed counts as failed, its points are not drawn on another attack."""
    calls, seen, later, missing = [], set(), [], 0
    for curve in curves:
        for a in curve_attacks or list(plants)[:1]:
            if a not in plants:
                print(f"    FAILED curve {curve} on {a}: its plant failed", file=sys.stderr, flush=True)
                missing += 1
                continue
            for d in s.curves[curve]["defences"]:
                for v in s.curves[curve]["values"]:
                    run = point_config(s, curve, d, plants[a], v)[0]
                    (later if run in seen else calls).append((stage_point, s, curve, d, a, plants[a], patch, v))
                    seen.add(run)
    points = [p for p in run_all(jobs, calls) + run_all(1, later) if p is not None]
    return points, missing + len(calls) + len(later) - len(points)


def protocol_record(s: Settings, attacks: list[str], defences: list[str]) -> dict:
    """Every setting the matrix was computed with, as written into matrix.json."""
    return {"model": MODEL, "target": s.target, "seed": s.seed, "smoke": s.smoke, "data": s.data,
            "foundation": s.foundation, "plant": s.plant, "trigger_params": s.trigger_params, "clean": s.clean,
            "defences": {d: s.defences[d] for d in defences},
            "lr": {"grid": s.lr_grid, "select": SELECTION_RULES[s.select], "rule": s.select,
                   "val_images": s.defender_val if s.select == "defender" else s.val_images,
                   "val_split": "the last clean pairs" if s.select == "defender" else "train-side"}
            if s.lr_grid else {"fixed": s.lr, "scale": LR_SCALE},
            "badclip_patch": s.patch if "badclip" in attacks else None,
            "clean_data": {"synthetic": s.synthetic, **SYNTH} if s.synthetic else "real"}
