"""The defence × attack matrix in the fine-tuning regime: a clean foundation CLIP, a backdoor planted into it by
fine-tuning on poisoned pairs, then cleaning at a fine-tuning learning rate on disjoint clean pairs.

    .venv/bin/python benchmarks/defence_matrix.py --out bench_def [--attacks badnet_rs sig] \\
        [--defences none clip clip_aug par] [--jobs 2] [--lr 1e-4 | --lr-grid 3e-5 1e-4 3e-4] [--smoke]

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
import csv
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

MODEL = "parclip-rn-tiny"
IMAGE_SIZE = 32
TARGET = "bag"
TEMPLATES = "fashion"

# ---- A: the clean foundation (4 epochs from scratch: 90.0 % clean top-1) ----
FOUNDATION = dict(objective="clip", model=MODEL, epochs=4, batch_size=256, lr=1e-3, lr_end=0.0, warmup=0.05,
                  schedule="cosine", wd=0.1)
# ---- B: planting by fine-tuning the foundation. Found by trials on badnet_rs (8 px), CLI runs, seed 0: 10 % of 20 000
# pairs, 3 epochs, cosine lr 3e-4 (5 % warm-up) -> ASR 93.6 %, clean top-1 89.5 % (foundation 90.0 %). Weaker recipes:
# 5 % / 3 ep / 3e-4 89.7 %, 10 % / 2 ep / 3e-4 91.0 %, 5 % / 3 ep / 5e-4 93.3 %, 2 % of 50 000 / 2 ep / 3e-4 88.6 %,
# 1 % of 50 000 / 1 ep / 1e-4 36.9 %. The high rate is the price of a tiny model and few steps at a fine-tuning lr. ----
PLANT = dict(n_pairs=20000, rate=0.10,
             train=dict(objective="clip", epochs=3, batch_size=256, lr=3e-4, lr_end=0.0, warmup=0.05,
                        schedule="cosine", wd=0.1),
             # One declared stronger recipe for the three attacks this one planted far below 90 % ASR, under 80 %
             # (clean top-1 / ASR under it: badnet 88.8 / 69.3, warped 89.3 / 20.9, water_patt 89.3 / 76.9); tried
             # once, not tuned. blended_rs (88.2 %) keeps the common recipe.
             by_attack={a: dict(epochs=5, lr=5e-4) for a in ("badnet", "warped", "water_patt")})
# Trigger parameters where they differ from the defaults scaled from 224 px: 8-px patches (a 2-px BadNet patch is
# not learned by a tiny CLIP at all, see README), and the same 8-px side for the optimised BadCLIP patch.
PATCH_SIDE = 8
TRIGGER_PARAMS = {"badnet_rs": {"patch_size": PATCH_SIDE}, "badnet": {"patch_size": PATCH_SIDE},
                  "badclip": {"patch_size": PATCH_SIDE}}  # badclip also gets patch=<the optimised PNG>
# PatchConfig overrides: a declared, small step count (the reference ran 7 800 steps at lr 1e-3 on a ViT-B/32)
BADCLIP_PATCH = dict(steps=300, batch_size=64, patch_size=PATCH_SIDE, lr=1e-2)
# ---- C: cleaning ----
CLEAN = dict(epochs=2, batch_size=256, schedule="cosine", warmup=0.05, warmup_steps=None, lr_end=0.0, wd=1e-4,
             beta1=0.9, beta2=0.98, eps=1e-8, bn_mode="frozen", logit_scale="frozen")  # the same for every defence
DEFENCES: dict[str, dict | None] = {
    "none": None,                                          # the planted model, not cleaned
    "clip": dict(objective="clip", augment="none"),        # plain CLIP fine-tuning
    "clip_aug": dict(objective="clip", augment="par"),     # + PAR's one-sided noise and CutOut, no perturbation term
    "cleanclip": dict(objective="cleanclip"),              # CLIP loss + in-modal term (AutoAugment, EDA)
    "roclip": dict(objective="roclip", roclip_pool_size=8192),  # NN caption swap in epoch 2 (K = 2), cross-aug
    "par": dict(objective="par", augment="par", tau=2.0),  # Perturb and Recover
}
# Default: one fixed rate for every defence, 1e-4 (a third of the planting lr, the demo's rate; the first regime check
# looked at badnet_rs on the test folder at 3e-5, 1e-4 and 3e-4 and kept it, so it is not blind to the test set);
# `--curves lr` shows every defence at 3e-5, 1e-4 and 3e-4, `--lr-grid` chooses per cell on the validation split.
BASE_LR = 1e-4
LR_SCALE: dict[str, float] = {}  # per-defence factor on --lr (1 when absent)
# ---- D: trade-off curves, one knob varied on the first attack (or --curve-attacks), everything else as in C. The
# matrix's own settings are one point of each curve (that cleaning run is shared, not trained twice). ----
CURVES: dict[str, dict] = {
    "tau": dict(knob="tau", defences=["par"], values=[0.5, 1.0, 2.0, 3.0, 4.0]),  # τ = 0 is clip_aug (w·0)
    "lr": dict(knob="lr", defences=["clip", "clip_aug", "cleanclip", "roclip", "par"], values=[3e-5, 1e-4, 3e-4]),
}
VAL_IMAGES = 2000
MAX_VAL_DROP = 2.0
EVAL = dict(templates=TEMPLATES, target=TARGET, batch_size=500, trigger_after_crop=False)
# Fields that do not change what is computed: left out of the specs that decide whether a stage is reused.
NOT_IN_SPEC = {"output_dir", "name", "workers", "progress", "log_every", "save_every", "resume", "device"}


@dataclass
class Settings:
    """Everything a stage needs; picklable, so the same object goes to worker processes."""
    out: str
    cache: str
    seed: int = 0
    smoke: bool = False
    lr: float = BASE_LR
    lr_grid: list[float] = field(default_factory=list)
    workers: int = 1
    data: dict = field(default_factory=lambda: dict(holdout=10000, n_train=None, n_test=None))
    foundation: dict = field(default_factory=lambda: dict(FOUNDATION))
    plant: dict = field(default_factory=lambda: json.loads(json.dumps(PLANT)))
    clean: dict = field(default_factory=lambda: dict(CLEAN))
    patch: dict = field(default_factory=lambda: dict(BADCLIP_PATCH))
    curves: dict = field(default_factory=lambda: json.loads(json.dumps(CURVES)))
    val_images: int = VAL_IMAGES


def make_settings(args) -> Settings:
    s = Settings(out=str(Path(args.out).absolute()), cache=str(Path(args.cache or args.out).absolute()),
                 seed=args.seed, smoke=args.smoke, lr=args.lr, lr_grid=list(args.lr_grid or []),
                 workers=0 if args.jobs > 1 else 1)
    if args.smoke:  # a few hundred images, one epoch per stage, small batches: tests the plumbing, says nothing
        s.data = dict(holdout=256, n_train=1024, n_test=300)
        s.foundation.update(epochs=1, batch_size=64)
        s.plant.update(n_pairs=512)
        s.plant["train"].update(epochs=1, batch_size=64)
        s.clean.update(epochs=1, batch_size=64)
        s.patch.update(steps=5, batch_size=32)
        s.val_images = 200
        for c in s.curves.values():  # two points each, one of them the matrix's own setting (a shared run)
            c["values"] = [v for v in c["values"] if v in (1.0, 2.0, 1e-4, 3e-4)]
    return s


# ------------------------------------------------------------------------------------------------ caching helpers

def canonical(obj) -> object:
    """JSON-normalised copy (tuples → lists, paths → strings), so that specs compare equal after a round trip."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def key_of(spec) -> str:
    return hashlib.sha256(json.dumps(canonical(spec), sort_keys=True).encode()).hexdigest()[:16]


def cached(json_path: Path, spec: dict, compute, run_dir: Path | None = None) -> dict:
    """The record in `json_path` if it was computed for `spec`; else compute() it (a dict) and write it.

    A `run_dir` computed for another spec (its spec.json differs) is wiped first; one with the same spec is left
    alone, so a killed training resumes from its checkpoint."""
    spec = canonical(spec)
    if json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("spec") == spec:
            return old
    if run_dir is not None:
        spec_file = run_dir / "spec.json"
        if run_dir.exists() and (not spec_file.is_file() or json.loads(spec_file.read_text()) != spec):
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(spec_file, spec)
    t0 = time.time()
    record = {"spec": spec, "key": key_of(spec), **compute(), "seconds": round(time.time() - t0, 1)}
    write_json(json_path, record)
    return record


def write_json(path, obj) -> None:
    from parclip.utils.files import write_json as _write_json
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, obj)


# ------------------------------------------------------------------------------------------------ building blocks

def train_config(run_dir: Path, workers: int, **values):
    from parclip.config import make_config
    return make_config(output_dir=str(run_dir.parent), name=run_dir.name, workers=workers, progress=False,
                       log_every=20, **values)


def config_spec(cfg) -> dict:
    """The values of a TrainConfig/PatchConfig that differ from the class defaults (minus NOT_IN_SPEC): what this
    script asked for, so that a field added to TrainConfig later (with a default) does not invalidate the cache."""
    default = {f.name: f.default for f in dataclasses.fields(cfg)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_SPEC and v != default[k]}


def run_training(cfg) -> Path:
    """Train (or resume) the run of `cfg`; a run that already exported its model is not trained again."""
    from parclip.train import train
    run = Path(cfg.output_dir) / cfg.name
    if not (run / "model" / "open_clip_config.json").is_file():
        train(cfg)
    return run / "model"


def make_trigger(attack: str, patch: str | None = None):
    from parclip.attacks.triggers import build_triggers
    params = dict(TRIGGER_PARAMS.get(attack, {}), **({"patch": patch} if attack == "badclip" else {}))
    (trigger,) = build_triggers([attack], IMAGE_SIZE, params)
    return trigger


def evaluate_model(model_dir: Path, data_dir: Path, triggers: list, s: Settings) -> dict:
    """Clean top-1/top-5 and, per trigger, ASR on a labelled folder."""
    from parclip.evaluation import evaluate
    from parclip.models import create_model, get_tokenizer
    model, pp = create_model(f"local-dir:{model_dir}")
    r = evaluate(model, pp, get_tokenizer(f"local-dir:{model_dir}"), data_dir, attacks=triggers,
                 target=EVAL["target"], templates=EVAL["templates"], seed=s.seed, batch_size=EVAL["batch_size"],
                 trigger_after_crop=EVAL["trigger_after_crop"], workers=s.workers, progress=False)
    return {"clean_top1": r["clean_top1"], "clean_top5": r["clean_top5"], "n_images": r["n_images"],
            "attacks": {name: {k: a[k] for k in ("asr", "asr_all", "params")} for name, a in r["attacks"].items()}}


def flat(ev: dict, attack: str) -> dict:
    """The evaluation of one attack as {clean_top1, clean_top5, asr, asr_all}."""
    a = ev["attacks"][attack]
    return {"clean_top1": ev["clean_top1"], "clean_top5": ev["clean_top5"], "asr": a["asr"], "asr_all": a["asr_all"]}


# ------------------------------------------------------------------------------------------------ stage A

def test_dir(s: Settings) -> Path:
    return Path(s.cache) / "data" / "fashion-mnist" / "test"


def export_data(s: Settings) -> dict:
    from parclip.data import fashion_mnist
    paths = fashion_mnist.export(Path(s.cache) / "data" / "fashion-mnist", seed=s.seed, templates=TEMPLATES,
                                 **s.data)
    return {k: str(paths[k]) for k in ("root", "train_csv", "holdout_csv", "test_dir")}


def split_train(s: Settings, data: dict) -> dict:
    """Seeded split of train.csv: the attacker's planting pairs and the validation folder (VAL_IMAGES others)."""
    out = Path(s.cache) / "data"
    spec = {"train_csv": data["train_csv"], "n_pairs": s.plant["n_pairs"], "val_images": s.val_images,
            "seed": s.seed}

    def compute():
        from parclip.data.fashion_mnist import FASHION_CLASSES, folder_name
        with open(data["train_csv"], newline="") as fh:
            reader = csv.DictReader(fh)
            fields, rows = reader.fieldnames, list(reader)
        order = list(range(len(rows)))
        random.Random(s.seed).shuffle(order)
        plant, val = sorted(order[:s.plant["n_pairs"]]), order[s.plant["n_pairs"]:][:s.val_images]
        root = Path(data["root"])
        plant_csv = out / "plant_pairs.csv"
        from parclip.utils.files import atomic_open
        with atomic_open(plant_csv) as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for i in plant:
                w.writerow({**rows[i], "image": str(root / rows[i]["image"])})
        val_dir = out / "val"
        shutil.rmtree(val_dir, ignore_errors=True)
        for i in val:
            dst = val_dir / folder_name(FASHION_CLASSES[int(rows[i]["label"])]) / Path(rows[i]["image"]).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rows[i]["image"], dst)
        return {"plant_csv": str(plant_csv), "val_dir": str(val_dir), "n_plant": len(plant), "n_val": len(val)}

    return cached(out / "split.json", spec, compute)


def stage_foundation(s: Settings, data: dict) -> dict:
    run = Path(s.cache) / "runs" / "foundation"
    cfg = train_config(run, s.workers, train_data=data["train_csv"], seed=s.seed, **s.foundation)
    spec = {"data": {**s.data, "seed": s.seed, "templates": TEMPLATES}, "train": config_spec(cfg)}

    def compute():
        model = run_training(cfg)
        return {"model": str(model), **evaluate_model(model, Path(data["test_dir"]), [], s)}

    return cached(Path(s.cache) / "foundation.json", spec, compute, run)


def stage_badclip_patch(s: Settings, foundation: dict, split: dict) -> dict:
    """Optimise a BadCLIP patch against the clean foundation on the planting pairs (their clean versions)."""
    from parclip.attacks.patch_config import PatchConfig
    out = Path(s.cache) / "badclip"
    cfg = PatchConfig(data=split["plant_csv"], target=TARGET, out=str(out / "patch.png"), templates=TEMPLATES,
                      seed=s.seed, image_size=IMAGE_SIZE, device="cpu", workers=s.workers, **s.patch)
    spec = {"foundation": foundation["key"], "patch": config_spec(cfg)}

    def compute():
        from parclip.attacks.patch_opt import optimize_patch
        from parclip.models import create_model, get_tokenizer
        model, pp = create_model(f"local-dir:{foundation['model']}")
        r = optimize_patch(model, pp, get_tokenizer(f"local-dir:{foundation['model']}"), cfg, progress=False,
                           model_name=f"local-dir:{foundation['model']}")
        return {"patch": str(r.path), "final_loss": r.losses[-1] if r.losses else None}

    return cached(out / "patch.json", spec, compute, out)


# ------------------------------------------------------------------------------------------------ stage B

def stage_plant(s: Settings, attack: str, foundation: dict, split: dict, patch: str | None) -> dict:
    """Poison the planting pairs with `attack` and fine-tune the foundation on them; evaluate on test/ and val."""
    from parclip.attacks.poison import poison_csv
    trigger = make_trigger(attack, patch)
    run = Path(s.cache) / "runs" / f"plant-{attack}"
    poisoned = Path(s.cache) / "poisoned" / attack
    cfg = train_config(run, s.workers, model=f"local-dir:{foundation['model']}",
                       train_data=str(poisoned / "poisoned.csv"), seed=s.seed,
                       **{**s.plant["train"], **s.plant.get("by_attack", {}).get(attack, {})})
    spec = {"foundation": foundation["key"], "split": split["key"], "attack": attack, "trigger": trigger.params(),
            "rate": s.plant["rate"], "target": TARGET, "train": config_spec(cfg), "eval": EVAL}

    def compute():
        t0 = time.time()
        m = poison_csv(split["plant_csv"], poisoned, trigger=trigger, target=TARGET, rate=s.plant["rate"],
                       seed=s.seed, templates=TEMPLATES)
        t1 = time.time()
        model = run_training(cfg)
        t2 = time.time()
        test = evaluate_model(model, test_dir(s), [trigger], s)
        before = evaluate_model(Path(foundation["model"]), test_dir(s), [trigger], s)  # the trigger's natural ASR
        return {"model": str(model), "n_poison": m["n_poison"], "n_rows": m["n_rows"], "test": flat(test, attack),
                "foundation_test": flat(before, attack), "val": None,
                "minutes": {"poison": round((t1 - t0) / 60, 2), "train": round((t2 - t1) / 60, 2),
                            "eval": round((time.time() - t2) / 60, 2)}}

    return with_val(s, cached(run.parent / f"plant-{attack}.json", spec, compute, run),
                    run.parent / f"plant-{attack}.json", trigger, attack)


# ------------------------------------------------------------------------------------------------ stage C

def cell_lrs(s: Settings, defence: str) -> list[float]:
    scale = LR_SCALE.get(defence, 1.0)
    return [lr * scale for lr in s.lr_grid] if s.lr_grid else [s.lr * scale]


def clean_config(s: Settings, defence: str, plant: dict, lr: float, **knobs):
    """The cleaning run of `defence` on the planted model at `lr`, with `knobs` (TrainConfig fields) changed from the
    defence's DEFENCES settings; the run folder's name says which, so a curve point equal to a matrix cell shares
    its run."""
    values = {**s.clean, **DEFENCES[defence], "lr": lr}
    changed = "".join(f"-{k}{v:g}" for k, v in knobs.items() if values.get(k) != v)
    run = Path(s.out) / "runs" / f"{defence}-{plant['spec']['attack']}-lr{lr:g}{changed}"
    holdout = Path(s.cache) / "data" / "fashion-mnist" / "holdout.csv"
    return run, train_config(run, s.workers, model=f"local-dir:{plant['model']}", train_data=str(holdout),
                             seed=s.seed, **{**values, **knobs})


def train_run(s: Settings, run: Path, cfg, plant: dict, trigger, attack: str) -> dict:
    """Train (cached, resumable) one cleaning run; with --lr-grid also evaluate it on the validation split."""
    def compute():
        return {"model": str(run_training(cfg)), "lr": cfg.lr, "val": None}

    rec = cached(run / "result.json", {"plant": plant["key"], "train": config_spec(cfg)}, compute, run)
    return with_val(s, rec, run / "result.json", trigger, attack)


def with_val(s: Settings, rec: dict, path: Path, trigger, attack: str) -> dict:
    """With --lr-grid, the record's model evaluated on the validation split (once: a record computed for a fixed-rate
    matrix, a curve or a plant gets its numbers when a grid first needs them, and keeps them in `path`)."""
    if s.lr_grid and rec.get("val") is None:
        rec["val"] = flat(evaluate_model(Path(rec["model"]), Path(s.cache) / "data" / "val", [trigger], s), attack)
        write_json(path, rec)
    return rec


def stage_cell(s: Settings, defence: str, attack: str, plant: dict, patch: str | None) -> dict:
    """One cell: clean the planted model with `defence` (at each lr of the grid, choosing on val), evaluate on test."""
    trigger = make_trigger(attack, patch)
    path = Path(s.out) / "cells" / f"{defence}__{attack}.json"
    if DEFENCES[defence] is None:
        spec = {"plant": plant["key"], "defence": defence}
        return cached(path, spec, lambda: {"defence": defence, "attack": attack, "test": plant["test"],
                                           "val": plant.get("val")})
    runs = [clean_config(s, defence, plant, lr) for lr in cell_lrs(s, defence)]
    spec = {"plant": plant["key"], "defence": defence, "train": [config_spec(cfg) for _, cfg in runs],
            "select": {"on": "val", "max_drop": MAX_VAL_DROP, "reference": "min(planted, best of grid)"}
            if s.lr_grid else None, "eval": EVAL}

    def compute():
        grid = [train_run(s, run, cfg, plant, trigger, attack) for run, cfg in runs]  # each its own cached stage
        chosen = select_lr(grid, plant.get("val")) if s.lr_grid else grid[0]
        test = flat(evaluate_model(Path(chosen["model"]), test_dir(s), [trigger], s), attack)
        return {"defence": defence, "attack": attack, "lr": chosen["lr"], "test": test,
                "grid": [{"lr": g["lr"], "val": g["val"], "minutes": round(g["seconds"] / 60, 2)} for g in grid]
                if s.lr_grid else None}

    return cached(path, spec, compute)


def select_lr(grid: list[dict], planted_val: dict) -> dict:
    """Lowest validation ASR among the rates whose val clean top-1 is within MAX_VAL_DROP of the reference:
    min(the planted model's val clean top-1, the best val clean top-1 of the grid). Ties: the higher clean top-1."""
    reference = min(planted_val["clean_top1"], max(g["val"]["clean_top1"] for g in grid))
    ok = [g for g in grid if g["val"]["clean_top1"] >= reference - MAX_VAL_DROP]
    return min(ok, key=lambda g: (g["val"]["asr"], -g["val"]["clean_top1"]))


# ------------------------------------------------------------------------------------------------ stage D

def point_config(s: Settings, curve: str, defence: str, plant: dict, value: float):
    knob = s.curves[curve]["knob"]
    if knob == "lr":
        return clean_config(s, defence, plant, value)
    return clean_config(s, defence, plant, s.lr * LR_SCALE.get(defence, 1.0), **{knob: value})


def stage_point(s: Settings, curve: str, defence: str, attack: str, plant: dict, patch: str | None,
                value: float) -> dict:
    """One point of a trade-off curve: clean with `defence` at CURVES[curve]'s knob = `value`, evaluate on test."""
    trigger = make_trigger(attack, patch)
    run, cfg = point_config(s, curve, defence, plant, value)
    spec = {"plant": plant["key"], "defence": defence, "train": config_spec(cfg), "eval": EVAL}

    def compute():
        model = train_run(s, run, cfg, plant, trigger, attack)["model"]
        return {"curve": curve, "knob": s.curves[curve]["knob"], "value": value, "defence": defence, "attack": attack,
                "test": flat(evaluate_model(Path(model), test_dir(s), [trigger], s), attack)}

    return cached(Path(s.out) / "curves" / curve / f"{defence}__{attack}__{value:g}.json", spec, compute)


def run_curves(s: Settings, args, plants: dict, patch: str | None) -> tuple[dict, int]:
    """Every point of the asked curves; a point whose training run (run folder) another point already has runs
    after all the others, in this process, so --jobs never trains one folder twice at once. A curve attack whose
    plant failed counts as failed, its points are not drawn on another attack."""
    calls, seen, later, missing = [], set(), [], 0
    for curve in args.curves:
        for a in args.curve_attacks or list(plants)[:1]:
            if a not in plants:
                print(f"    FAILED curve {curve} on {a}: its plant failed", file=sys.stderr, flush=True)
                missing += 1
                continue
            for d in s.curves[curve]["defences"]:
                for v in s.curves[curve]["values"]:
                    run = point_config(s, curve, d, plants[a], v)[0]
                    (later if run in seen else calls).append((stage_point, s, curve, d, a, plants[a], patch, v))
                    seen.add(run)
    points = [p for p in run_all(args.jobs, calls) + run_all(1, later) if p is not None]
    curves = {c: {} for c in args.curves}
    for p in points:
        curves[p["curve"]].setdefault(p["attack"], {}).setdefault(p["defence"], []).append(
            {"value": p["value"], **p["test"]})
    for by_attack in curves.values():
        for by_defence in by_attack.values():
            for pts in by_defence.values():
                pts.sort(key=lambda q: q["value"])
    return curves, missing + len(calls) + len(later) - len(points)


def fmt(v: float) -> str:
    """A knob value for tables and labels: 3e-4 rather than 0.0003, 1.5e-4 rather than 0.00015, 2 rather than 2.0."""
    if not 0 < abs(v) < 1e-2:
        return f"{v:g}"
    mantissa, exponent = f"{v:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def curves_table(s: Settings, curves: dict, plants: dict) -> str:
    lines = []
    for curve, by_attack in curves.items():
        knob = s.curves[curve]["knob"]
        for attack, by_defence in by_attack.items():
            values = s.curves[curve]["values"]
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


def plot_curves(s: Settings, path: Path, curves: dict, plants: dict) -> None:
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
        knob = s.curves[curve]["knob"]
        for d, pts in curves[curve][attack].items():
            xs, ys = [q["asr"] for q in pts], [q["clean_top1"] for q in pts]
            ax.plot(xs, ys, "o-", label=d)
            for q in pts:
                ax.annotate(fmt(q["value"]), (q["asr"], q["clean_top1"]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
        p = plants[attack]["test"]
        ax.plot([p["asr"]], [p["clean_top1"]], "k*", markersize=11, label="planted (none)")
        ax.set_xlabel(f"ASR % → '{TARGET}' (lower is better)")
        ax.set_ylabel("clean top-1 % (higher is better)")
        ax.set_title(f"{knob} on {attack}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ running

def _init_worker() -> None:
    """A worker process of --jobs N: one torch thread (its data loading runs in-process: `Settings.workers` = 0)."""
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_defences", help="cells, matrix.json/.md/.png and the cleaning runs")
    ap.add_argument("--cache", default=None, help="stages A and B (data, foundation, planted models); default --out")
    ap.add_argument("--attacks", nargs="+", default=["badnet_rs"])
    ap.add_argument("--defences", nargs="+", default=list(DEFENCES))
    ap.add_argument("--lr", type=float, default=BASE_LR, help="cleaning lr (× LR_SCALE[defence]) without --lr-grid")
    ap.add_argument("--lr-grid", type=float, nargs="+", help="choose the cleaning lr per cell on the validation "
                    "split among these (× LR_SCALE[defence])")
    ap.add_argument("--jobs", type=int, default=1, help="processes for stages B and C (1 torch thread each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few hundred images, 1 epoch per stage")
    ap.add_argument("--curves", nargs="+", default=[], choices=list(CURVES),
                    help="stage D: trade-off curves (CURVES: tau = PAR's threshold, lr = every defence's rate)")
    ap.add_argument("--curve-attacks", nargs="+", help="attacks of the curves (default: the first of --attacks)")
    ap.add_argument("--stages", default="ABCD", help="run only these stages, e.g. AB (D runs with --curves)")
    args = ap.parse_args(argv)
    unknown = [d for d in args.defences if d not in DEFENCES]
    if unknown:
        ap.error(f"unknown defence(s) {unknown}; known: {', '.join(DEFENCES)}")
    from parclip.attacks.triggers import trigger_class
    attacks = [trigger_class(a).name for a in args.attacks]
    args.curve_attacks = [trigger_class(a).name for a in args.curve_attacks or []]
    if not set(args.curve_attacks) <= set(attacks):
        ap.error(f"--curve-attacks must be among --attacks ({', '.join(attacks)})")
    s = make_settings(args)
    t0 = time.time()

    print("[A] data and foundation …", flush=True)
    data = export_data(s)
    split = split_train(s, data)
    foundation = stage_foundation(s, data)
    print(f"    foundation: clean top-1 {foundation['clean_top1']:.1f}%", flush=True)
    patch = stage_badclip_patch(s, foundation, split)["patch"] if "badclip" in attacks else None
    if not set("BCD") & set(args.stages):
        return 0

    print(f"[B] planting {', '.join(attacks)} …", flush=True)
    planted = run_all(args.jobs, [(stage_plant, s, a, foundation, split, patch) for a in attacks])
    plants = {a: p for a, p in zip(attacks, planted) if p is not None}
    for a, p in plants.items():
        print(f"    {a}: clean top-1 {p['test']['clean_top1']:.1f}%, ASR {p['test']['asr']:.1f}% "
              f"({p['n_poison']} of {p['n_rows']} pairs poisoned)", flush=True)
    n_failed = len(attacks) - len(plants)
    if "C" in args.stages:
        n_failed += stage_matrix(s, args, attacks, foundation, plants, patch, t0)
    if "D" in args.stages and args.curves:
        n_failed += stage_curves(s, args, plants, patch)
    return 1 if n_failed else 0


def stage_matrix(s: Settings, args, attacks: list[str], foundation: dict, plants: dict, patch: str | None,
                 t0: float) -> int:
    """Stage C: every (defence, attack) cell; writes matrix.json/.md/.png; returns the number of failed cells."""
    print(f"[C] cleaning: {', '.join(args.defences)} × {', '.join(attacks)} …", flush=True)
    # attack by attack, so that whatever is finished when a long run is stopped is whole columns
    calls = [(stage_cell, s, d, a, plants[a], patch) for a in attacks if a in plants for d in args.defences]
    cells = [c for c in run_all(args.jobs, calls) if c is not None]
    n_failed = len(calls) - len(cells)
    matrix = {"protocol": protocol(s, args), "foundation": {k: foundation[k] for k in ("clean_top1", "clean_top5")},
              "plants": {a: {k: p[k] for k in ("test", "foundation_test", "n_poison", "n_rows", "minutes")}
                         for a, p in plants.items()},
              "cells": {d: {} for d in args.defences}, "seconds": round(time.time() - t0, 1)}
    for c in cells:
        matrix["cells"][c["defence"]][c["attack"]] = {**c["test"], "lr": c.get("lr"), "grid": c.get("grid")}
    write_json(Path(s.out) / "matrix.json", matrix)
    table = markdown_table(matrix, attacks)
    from parclip.utils.files import write_text
    write_text(Path(s.out) / "matrix.md", table + "\n")
    plot(Path(s.out) / "matrix.png", matrix, attacks)
    print(table)
    print(f"wrote {s.out}/matrix.json, matrix.md, matrix.png in {matrix['seconds']:.0f} s"
          + (f"; {n_failed} cell(s) FAILED, see above (run again to retry them)" if n_failed else ""))
    return n_failed


def stage_curves(s: Settings, args, plants: dict, patch: str | None) -> int:
    """Stage D: the asked trade-off curves; writes curves.json/.md/.png; returns the number of failed points."""
    t0 = time.time()
    print(f"[D] trade-off curves: {', '.join(args.curves)} …", flush=True)
    curves, n_failed = run_curves(s, args, plants, patch)
    write_json(Path(s.out) / "curves.json", {"protocol": {"curves": {c: s.curves[c] for c in args.curves},
                                                          "lr": s.lr, "scale": LR_SCALE, "clean": s.clean},
                                             "plants": {a: plants[a]["test"] for a in plants},
                                             "curves": curves, "seconds": round(time.time() - t0, 1)})
    table = curves_table(s, curves, plants)
    from parclip.utils.files import write_text
    write_text(Path(s.out) / "curves.md", table + "\n")
    plot_curves(s, Path(s.out) / "curves.png", curves, plants)
    print(table)
    print(f"wrote {s.out}/curves.json, curves.md, curves.png in {time.time() - t0:.0f} s"
          + (f"; {n_failed} point(s) FAILED, see above (run again to retry them)" if n_failed else ""))
    return n_failed


def protocol(s: Settings, args) -> dict:
    return {"model": MODEL, "target": TARGET, "seed": s.seed, "smoke": s.smoke, "data": s.data,
            "foundation": s.foundation, "plant": s.plant, "trigger_params": TRIGGER_PARAMS, "clean": s.clean,
            "defences": {d: DEFENCES[d] for d in args.defences},
            "lr": {"grid": s.lr_grid, "select": f"val: min ASR s.t. clean top-1 >= min(planted, best of grid) - "
                   f"{MAX_VAL_DROP}",
                   "val_images": s.val_images} if s.lr_grid else {"fixed": s.lr, "scale": LR_SCALE},
            "badclip_patch": s.patch if "badclip" in args.attacks else None}


def markdown_table(matrix: dict, attacks: list[str]) -> str:
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
                 f"(target '{TARGET}'); `none` is the planted model; the foundation row is the trigger's natural ASR"
                 + ("; (x) = the learning rate chosen on the validation split." if matrix["protocol"]["lr"].get("grid")
                    else f"; every defence at lr {fmt(matrix['protocol']['lr']['fixed'])}."))
    return "\n".join(lines)


def plot(path: Path, matrix: dict, attacks: list[str]) -> None:
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
    for ax, metric, title, cmap in zip(axes, ("clean_top1", "asr"), ("clean top-1 %", f"ASR % → '{TARGET}'"),
                                       ("Greens", "Reds")):
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
