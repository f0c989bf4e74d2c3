"""Traced cleaning runs: a stage C run with clean accuracy and ASR measured on the validation split every few steps,
so the course of a cleaning (how far the model moves from the planted one, when PAR's perturbation pushes, when
accuracy recovers, when the backdoor goes) can be read beside its final test numbers (docs/par_recovery.md).

A variant is a cleaning recipe: the defence, its learning rate and any TrainConfig values that differ from the
protocol's common budget (CLEAN + DEFENCES[defence]), e.g. ``dict(defence="par", lr=3e-4, epochs=4,
par_latch=True)``. Each traced run is cached like every stage (its record holds its spec; a killed run resumes).
"""
from __future__ import annotations

import json
from pathlib import Path

from .cache import cached, config_spec
from .settings import TEMPLATES, Settings
from .stages import (clean_pairs, evaluate_model, flat, make_trigger, run_training, test_dir, train_config,
                     val_split)

VAL_EVERY = 10  # optimiser steps between two validations of a traced run (78 steps per epoch at 10 000 pairs)


def variant_label(variant: dict) -> str:
    """A short, file-name-safe name of a variant: its defence, then its values in a fixed order."""
    parts = [variant["defence"]] + [f"{k}{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                                    else (k if v is True else f"{k}{v}")
                                    for k, v in sorted(variant.items()) if k != "defence"]
    return "-".join(parts).replace("_", "")


def trace_config(s: Settings, variant: dict, attack: str, plant: dict, *, val_every: int = VAL_EVERY):
    """(run folder, TrainConfig) of the traced cleaning run of `variant` on `attack`'s planted model."""
    v = dict(variant)
    defence = v.pop("defence")
    run = Path(s.out) / "traces" / f"{variant_label(variant)}-{attack}"
    params = s.trigger_params.get(attack, {})
    # the optimised BadCLIP patch is a file, not a --val-attack name: stage_trace measures its ASR at the end
    asr = {} if attack == "badclip" else dict(val_attack=attack, val_target=s.target, val_trigger_param=",".join(
        f"{k}={val}" for k, val in params.items()))
    values = {**s.clean, **s.defences[defence], "lr": s.lr, **v}
    return run, train_config(s, run, model=f"local-dir:{plant['model']}", train_data=str(clean_pairs(s)),
                             seed=s.seed, imagenet_val=str(val_split(s)[1]), val_templates=TEMPLATES,
                             val_every=val_every, **asr, **{**values, "log_every": 1})


def stage_trace(s: Settings, variant: dict, attack: str, plant: dict, patch: str | None) -> dict:
    """Train the traced run of `variant` (cached), and measure its final model on the test folder.

    The record: the variant, the test numbers, and the trace (:func:`read_trace`) with the final validation numbers
    and distances, which a defender can see."""
    trigger = make_trigger(s, attack, patch)
    run, cfg = trace_config(s, variant, attack, plant)
    spec = {"plant": plant["key"], "variant": variant, "train": config_spec(cfg), "eval": s.eval_spec()}

    def compute():
        model = run_training(cfg)
        trace = read_trace(run)
        if attack == "badclip":  # the optimised patch is a file, not a --val-attack name: measure val at the end
            val = flat(evaluate_model(model, val_split(s)[1], [trigger], s), attack)
            trace["val"][-1]["val_asr"] = val["asr"]
        return {"variant": variant, "attack": attack, "model": str(model),
                "test": flat(evaluate_model(model, test_dir(s), [trigger], s), attack), "trace": trace}

    return cached(run.parent / f"{run.name}.json", spec, compute, run)


def read_trace(run: Path) -> dict:
    """The run's metrics.jsonl as series: `steps` rows {step, lr, loss, dist_img, dist_txt, on_img, on_txt} and
    `val` rows {step, val_clean_top1, val_asr}; plus `final`: the mean distances and 'on' shares of the last
    epoch's steps."""
    steps, val = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_clean_top1" in row:
            val.append({k: row[k] for k in ("step", "val_clean_top1", "val_asr") if k in row})
        elif "loss" in row:
            steps.append({k: row[k] for k in ("step", "epoch", "lr", "loss", "dist_img", "dist_txt", "on_img",
                                              "on_txt") if k in row})
    last_epoch = max((r["epoch"] for r in steps), default=0)
    tail = [r for r in steps if r["epoch"] == last_epoch]
    final = {k: sum(r[k] for r in tail) / len(tail) for k in ("dist_img", "dist_txt", "on_img", "on_txt")
             if tail and k in tail[0]}
    return {"steps": steps, "val": val, "final": final}
