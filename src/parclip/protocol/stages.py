"""The protocol's stages, each cached under its spec (:func:`parclip.protocol.cache.cached`) and resumable:

A  data and foundation: export Fashion-MNIST (train.csv: 50 000 pre-training pairs; holdout.csv: the last 10 000
   train images, the defender's clean pairs, never seen by foundation or attacker; test/: 10 000 labelled images),
   split train.csv into the attacker's planting pairs and a validation folder, train the clean foundation from
   scratch with the plain CLIP loss; with `badclip`, optimise its patch against the foundation.
B  plant, per attack: poison PLANT["rate"] of the planting pairs (the foundation saw their clean versions, as released
   poisoned CLIPs were fine-tuned from models that had seen clean web data) and fine-tune the foundation on them.
C  clean, per (defence, attack): fine-tune the planted model on holdout.csv with the common budget CLEAN plus the
   defence's own settings, at the fixed rate or the rate chosen on the validation split (`select_lr`).
D  one point of a trade-off curve: C with one knob changed.

Metrics, on test/: clean zero-shot top-1 (fashion templates) and ASR = % of triggered non-target images classified
as the target; `asr_all` (all images) is kept too.
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from parclip.data.captions import CAPTION_KEY, IMG_KEY, SEPARATOR
from parclip.utils.files import write_json

from .cache import cached, config_spec
from .settings import IMAGE_SIZE, LR_SCALE, MAX_VAL_DROP, PATCH_SIDE, SELECTION_RULES, SYNTH, TEMPLATES, Settings

# ------------------------------------------------------------------------------------------------ building blocks


def train_config(s: Settings, run_dir: Path, **values):
    """The TrainConfig of the run in `run_dir` (its parent is the output folder, its name the run's name)."""
    from parclip.config import make_config
    return make_config(**{"output_dir": str(run_dir.parent), "name": run_dir.name, "workers": s.workers,
                          "progress": s.progress, "log_every": 20, **values})


def run_training(cfg) -> Path:
    """Train (or resume) the run of `cfg`; a run that already exported its model is not trained again."""
    from parclip.train import train
    run = Path(cfg.output_dir) / cfg.name
    if not (run / "model" / "open_clip_config.json").is_file():
        train(cfg)
    return run / "model"


def make_trigger(s: Settings, attack: str, patch: str | None = None):
    """The trigger `attack` at the protocol's resolution with its parameters (badclip: the optimised `patch`, unless
    the settings name a patch file)."""
    from parclip.attacks.triggers import build_triggers
    params = dict(s.trigger_params.get(attack, {}))
    if attack == "badclip" and patch is not None:
        params.setdefault("patch", patch)
    (trigger,) = build_triggers([attack], IMAGE_SIZE, params)
    return trigger


def stored_name(s: Settings, attack: str) -> str:
    """The name of `attack`'s folders in the cache (its patch, poisoned pairs and planted model): the attack's name,
    with the side for a BadCLIP patch of another size than the protocol's (`Settings.badclip_side`), so the two can
    share a cache."""
    side = s.badclip_side
    return f"{attack}-{side}px" if attack == "badclip" and side != PATCH_SIDE else attack


def evaluate_model(model_dir: Path, data_dir: Path, triggers: list, s: Settings) -> dict:
    """Clean top-1/top-5 and, per trigger, ASR on a labelled folder."""
    from parclip.evaluation import evaluate
    from parclip.models import create_model, get_tokenizer
    how = s.eval_spec()
    model, pp = create_model(f"local-dir:{model_dir}")
    r = evaluate(model, pp, get_tokenizer(f"local-dir:{model_dir}"), data_dir, attacks=triggers,
                 target=how["target"], templates=how["templates"], seed=s.seed, batch_size=how["batch_size"],
                 trigger_after_crop=how["trigger_after_crop"], workers=s.workers, progress=False)
    return {"clean_top1": r["clean_top1"], "clean_top5": r["clean_top5"], "n_images": r["n_images"],
            "attacks": {name: {k: a[k] for k in ("asr", "asr_all", "params")} for name, a in r["attacks"].items()}}


def flat(ev: dict, attack: str) -> dict:
    """The evaluation of one attack as {clean_top1, clean_top5, asr, asr_all}."""
    a = ev["attacks"][attack]
    return {"clean_top1": ev["clean_top1"], "clean_top5": ev["clean_top5"], "asr": a["asr"], "asr_all": a["asr_all"]}


def test_dir(s: Settings) -> Path:
    return Path(s.cache) / "data" / "fashion-mnist" / "test"


# ------------------------------------------------------------------------------------------------ stage A

def export_data(s: Settings) -> dict:
    """The Fashion-MNIST export under CACHE/data/fashion-mnist (reused when complete)."""
    from parclip.data import fashion_mnist
    paths = fashion_mnist.export(Path(s.cache) / "data" / "fashion-mnist", seed=s.seed, templates=TEMPLATES,
                                 **s.data)
    return {k: str(paths[k]) for k in ("root", "train_csv", "holdout_csv", "test_dir", "retrieval_csv")}


TABLE_LAYOUT = [IMG_KEY, CAPTION_KEY, SEPARATOR]  # in the split stages' specs: tables of another layout are re-split


def _read_pairs(path: str) -> tuple[list[str], list[dict]]:
    """A table parclip wrote (the default layout: tab-separated, filepath / title / label)."""
    from parclip.data import read_table
    return read_table(path, columns=(IMG_KEY, CAPTION_KEY))


def _write_pairs(path: Path, fields: list[str], rows: list[dict], root: Path) -> None:
    """`rows` as a caption table at `path`, their image paths made absolute (they were relative to `root`)."""
    from parclip.data import write_table
    write_table(path, fields, [{**row, IMG_KEY: str(root / row[IMG_KEY])} for row in rows])


def _write_labelled(folder: Path, rows: list[dict], root: Path) -> None:
    """`rows`' images copied into a labelled folder FOLDER/<class>/<file> (the caller's record, written last,
    commits it)."""
    from parclip.data.fashion_mnist import FASHION_CLASSES, folder_name
    shutil.rmtree(folder, ignore_errors=True)
    for row in rows:
        dst = folder / folder_name(FASHION_CLASSES[int(row["label"])]) / Path(row[IMG_KEY]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / row[IMG_KEY], dst)  # not-atomic: the caller's record, written last, commits it


def split_train(s: Settings, data: dict) -> dict:
    """Seeded split of train.csv: the attacker's planting pairs and the validation folder (VAL_IMAGES others)."""
    out = Path(s.cache) / "data"
    spec = {"train_csv": data["train_csv"], "n_pairs": s.plant["n_pairs"], "val_images": s.val_images,
            "seed": s.seed, "table": TABLE_LAYOUT}

    def compute():
        fields, rows = _read_pairs(data["train_csv"])
        order = list(range(len(rows)))
        random.Random(s.seed).shuffle(order)
        plant, val = sorted(order[:s.plant["n_pairs"]]), order[s.plant["n_pairs"]:][:s.val_images]
        root = Path(data["root"])
        _write_pairs(out / "plant_pairs.csv", fields, [rows[i] for i in plant], root)
        _write_labelled(out / "val", [rows[i] for i in val], root)
        return {"plant_csv": str(out / "plant_pairs.csv"), "val_dir": str(out / "val"), "n_plant": len(plant),
                "n_val": len(val)}

    return cached(out / "split.json", spec, compute)


def split_holdout(s: Settings, data: dict) -> dict:
    """The defender's split of its clean pairs (holdout.csv): the last `s.defender_val` as a labelled validation
    folder, the others to clean on."""
    out = Path(s.cache) / "data"
    spec = {"holdout_csv": data["holdout_csv"], "val_pairs": s.defender_val, "table": TABLE_LAYOUT}

    def compute():
        fields, rows = _read_pairs(data["holdout_csv"])
        if len(rows) <= s.defender_val:
            raise ValueError(f"the defender's validation takes {s.defender_val} of {len(rows)} clean pairs: none "
                             f"would be left to clean on")
        root = Path(data["holdout_csv"]).parent
        _write_pairs(out / "defender_train.csv", fields, rows[:-s.defender_val], root)
        _write_labelled(out / "defender_val", rows[-s.defender_val:], root)
        return {"train_csv": str(out / "defender_train.csv"), "val_dir": str(out / "defender_val"),
                "n_train": len(rows) - s.defender_val, "n_val": s.defender_val}

    return cached(out / "defender_split.json", spec, compute)


def clean_pairs(s: Settings) -> Path:
    """The pairs stage C cleans on: holdout.csv, or under the defender's protocol its part that is not validation;
    with `s.synthetic`, the synthetic pairs of :func:`stage_synthetic` instead."""
    data = Path(s.cache) / "data"
    if s.synthetic:
        from parclip.synth.synthesize import TABLE
        return synthetic_dir(s) / "pairs" / TABLE
    return data / "defender_train.csv" if s.select == "defender" else data / "fashion-mnist" / "holdout.csv"


def synthetic_dir(s: Settings) -> Path:
    return Path(s.cache) / "data" / f"synthetic-{SYNTH['family']}-{s.synthetic}"


def stage_synthetic(s: Settings, data: dict) -> dict:
    """`s.synthetic` synthetic clean pairs: a SYNTH["family"] generator trained on the foundation's pre-training pairs
    only (train.csv: never the defender's pairs, never a triggered image), then the class names × the fashion
    templates, one image each (class i mod 10, so any prefix is balanced), seeded per image."""
    from parclip.synth import load_generator, train_generator
    from parclip.synth.prompts import make_prompts
    from parclip.synth.synthesize import synthesize

    out = synthetic_dir(s)
    spec = {"train_csv": data["train_csv"], "synth": SYNTH, "n": s.synthetic, "seed": s.seed, "templates": TEMPLATES}

    def compute():
        folder = train_generator(data["train_csv"], out / "generator", seed=s.seed, family=SYNTH["family"])
        generator = load_generator(f"{SYNTH['family']}:{folder}")
        prompts, source = make_prompts(generator.classnames, templates=TEMPLATES, n=s.synthetic, seed=s.seed)
        synthesize(out / "pairs", generator, prompts, source, seed=s.seed, chunk_size=SYNTH["chunk_size"],
                   batch_size=256, progress=s.progress)
        return {"train_csv": str(clean_pairs(s)), "generator": str(folder), "n": s.synthetic}

    return cached(out / "synthetic.json", spec, compute)


def val_split(s: Settings) -> tuple[str, Path]:
    """(the records' key, the folder) of the validation split: the train-side split, or the defender's own."""
    data = Path(s.cache) / "data"
    return ("defender_val", data / "defender_val") if s.select == "defender" else ("val", data / "val")


def stage_foundation(s: Settings, data: dict) -> dict:
    """The clean foundation, trained from scratch on train.csv and measured on test/."""
    run = Path(s.cache) / "runs" / "foundation"
    cfg = train_config(s, run, train_data=data["train_csv"], seed=s.seed, **s.foundation)
    spec = {"data": {**s.data, "seed": s.seed, "templates": TEMPLATES}, "train": config_spec(cfg)}

    def compute():
        model = run_training(cfg)
        return {"model": str(model), **evaluate_model(model, Path(data["test_dir"]), [], s)}

    return cached(Path(s.cache) / "foundation.json", spec, compute, run)


def stage_badclip_patch(s: Settings, foundation: dict, split: dict) -> dict:
    """Optimise a BadCLIP patch against the clean foundation on the planting pairs (their clean versions)."""
    from parclip.attacks.patch_config import PatchConfig
    out = Path(s.cache) / stored_name(s, "badclip")
    cfg = PatchConfig(data=split["plant_csv"], target=s.target, out=str(out / "patch.png"), templates=TEMPLATES,
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
    trigger = make_trigger(s, attack, patch)
    run = Path(s.cache) / "runs" / f"plant-{stored_name(s, attack)}"
    poisoned = Path(s.cache) / "poisoned" / stored_name(s, attack)
    cfg = train_config(s, run, model=f"local-dir:{foundation['model']}", train_data=str(poisoned / "poisoned.csv"),
                       seed=s.seed, **{**s.plant["train"], **s.plant.get("by_attack", {}).get(attack, {})})
    spec = {"foundation": foundation["key"], "split": split["key"], "attack": attack, "trigger": trigger.params(),
            "rate": s.plant["rate"], "target": s.target, "train": config_spec(cfg), "eval": s.eval_spec()}

    def compute():
        t0 = time.time()
        m = poison_csv(split["plant_csv"], poisoned, trigger=trigger, target=s.target, rate=s.plant["rate"],
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

    return with_val(s, cached(run.parent / f"{run.name}.json", spec, compute, run), run.parent / f"{run.name}.json",
                    trigger, attack)


# ------------------------------------------------------------------------------------------------ stage C

def cell_lrs(s: Settings, defence: str) -> list[float]:
    """The cleaning rates of a cell: the grid (choose on validation) or the one fixed rate, × LR_SCALE[defence]."""
    scale = LR_SCALE.get(defence, 1.0)
    return [lr * scale for lr in s.lr_grid] if s.lr_grid else [s.lr * scale]


def clean_config(s: Settings, defence: str, plant: dict, lr: float, **knobs):
    """The cleaning run of `defence` on the planted model at `lr`, with `knobs` (TrainConfig fields) changed from the
    defence's settings; the run folder's name says which, so a curve point equal to a matrix cell shares its run."""
    values = {**s.clean, **s.defences[defence], "lr": lr}
    changed = "".join(f"-{k}{v:g}" for k, v in knobs.items() if values.get(k) != v)
    synth = f"-synth{s.synthetic}" if s.synthetic else ""
    run = Path(s.out) / "runs" / f"{defence}-{plant['spec']['attack']}-lr{lr:g}{changed}{synth}"
    return run, train_config(s, run, model=f"local-dir:{plant['model']}", train_data=str(clean_pairs(s)),
                             seed=s.seed, **{**values, **knobs})


def train_run(s: Settings, run: Path, cfg, plant: dict, trigger, attack: str) -> dict:
    """Train (cached, resumable) one cleaning run; with a grid also evaluate it on the validation split."""
    def compute():
        return {"model": str(run_training(cfg)), "lr": cfg.lr, "val": None}

    rec = cached(run / "result.json", {"plant": plant["key"], "train": config_spec(cfg)}, compute, run)
    return with_val(s, rec, run / "result.json", trigger, attack)


def with_val(s: Settings, rec: dict, path: Path, trigger, attack: str) -> dict:
    """With a grid, the record's model evaluated on the validation split (once: a record computed for a fixed-rate
    matrix, a curve or a plant gets its numbers when a grid first needs them, and keeps them in `path`)."""
    key, folder = val_split(s)
    if s.lr_grid and rec.get(key) is None:
        rec[key] = flat(evaluate_model(Path(rec["model"]), folder, [trigger], s), attack)
        write_json(path, rec)
    return {**rec, "val": rec.get(key)}


def stage_cell(s: Settings, defence: str, attack: str, plant: dict, patch: str | None) -> dict:
    """One cell: clean the planted model with `defence` (at each lr of the grid, choosing on val), evaluate on test."""
    trigger = make_trigger(s, attack, patch)
    path = Path(s.out) / "cells" / f"{defence}__{attack}{f'__synth{s.synthetic}' if s.synthetic else ''}.json"
    if s.defences[defence] is None:
        spec = {"plant": plant["key"], "defence": defence}
        return cached(path, spec, lambda: {"defence": defence, "attack": attack, "test": plant["test"],
                                           "val": plant.get("val")})
    runs = [clean_config(s, defence, plant, lr) for lr in cell_lrs(s, defence)]
    spec = {"plant": plant["key"], "defence": defence, "train": [config_spec(cfg) for _, cfg in runs],
            "select": _select_spec(s) if s.lr_grid else None, "eval": s.eval_spec()}

    def compute():
        grid = train_grid(s, runs, plant, trigger, attack)
        chosen = SELECT[s.select](grid, plant.get("val")) if s.lr_grid else grid[0]
        test = flat(evaluate_model(Path(chosen["model"]), test_dir(s), [trigger], s), attack)
        return {"defence": defence, "attack": attack, "lr": chosen["lr"], "test": test, "model": chosen["model"],
                "grid": [{"lr": g["lr"], "val": g["val"], "minutes": round(g["seconds"] / 60, 2)} for g in grid]
                if s.lr_grid else None}

    return cached(path, spec, compute)


def train_grid(s: Settings, runs: list, plant: dict, trigger, attack: str) -> list[dict]:
    """The cleaning runs of a cell (each its own cached stage). Under the defender's rule, from the highest rate down,
    stopping at the first whose validation clean top-1 is within the budget: the rule would choose it whatever the
    lower rates gave, so they are not trained."""
    if not (s.lr_grid and s.select == "defender"):
        return [train_run(s, run, cfg, plant, trigger, attack) for run, cfg in runs]
    grid = []
    for run, cfg in sorted(runs, key=lambda rc: -rc[1].lr):
        grid.append(train_run(s, run, cfg, plant, trigger, attack))
        if within_budget(grid[-1], plant["val"]):
            break
    return grid


def select_lr(grid: list[dict], planted_val: dict) -> dict:
    """Lowest validation ASR among the rates whose val clean top-1 is within MAX_VAL_DROP of the reference:
    min(the planted model's val clean top-1, the best val clean top-1 of the grid). Ties: the higher clean top-1.
    This selection knows the trigger: it is the defence's best case, not something a defender could do."""
    reference = min(planted_val["clean_top1"], max(g["val"]["clean_top1"] for g in grid))
    ok = [g for g in grid if g["val"]["clean_top1"] >= reference - MAX_VAL_DROP]
    return min(ok, key=lambda g: (g["val"]["asr"], -g["val"]["clean_top1"]))


def within_budget(run: dict, planted_val: dict) -> bool:
    """Whether a cleaning run's validation clean top-1 is within MAX_VAL_DROP points of the planted model's."""
    return run["val"]["clean_top1"] >= planted_val["clean_top1"] - MAX_VAL_DROP


def select_defender(grid: list[dict], planted_val: dict) -> dict:
    """The defender's rule, which needs no trigger: the highest rate whose validation clean top-1 is within
    MAX_VAL_DROP points of the planted model's (more movement removes more of an unknown backdoor, the clean budget
    bounds it); when none is, the rate with the best validation clean top-1 (the least clean cost)."""
    ok = [g for g in grid if within_budget(g, planted_val)]
    if ok:
        return max(ok, key=lambda g: g["lr"])
    return max(grid, key=lambda g: g["val"]["clean_top1"])


SELECT = {"trigger": select_lr, "defender": select_defender}  # the rules of SELECTION_RULES


def _select_spec(s: Settings) -> dict:
    """How a grid cell chooses its rate, as recorded in its spec (the trigger rule's spec is unchanged from before
    the defender's rule existed, so its cached cells stay valid)."""
    if s.select == "trigger":
        return {"on": "val", "max_drop": MAX_VAL_DROP, "reference": "min(planted, best of grid)"}
    return {"on": "val", "rule": SELECTION_RULES[s.select]}


# ------------------------------------------------------------------------------------------------ stage D

def point_config(s: Settings, curve: str, defence: str, plant: dict, value: float):
    """The cleaning run of one curve point: the cell's run with the curve's knob set to `value`."""
    knob = s.curves[curve]["knob"]
    if knob == "lr":
        return clean_config(s, defence, plant, value)
    return clean_config(s, defence, plant, s.lr * LR_SCALE.get(defence, 1.0), **{knob: value})


def stage_point(s: Settings, curve: str, defence: str, attack: str, plant: dict, patch: str | None,
                value: float) -> dict:
    """One point of a trade-off curve: clean with `defence` at CURVES[curve]'s knob = `value`, evaluate on test."""
    trigger = make_trigger(s, attack, patch)
    run, cfg = point_config(s, curve, defence, plant, value)
    spec = {"plant": plant["key"], "defence": defence, "train": config_spec(cfg), "eval": s.eval_spec()}

    def compute():
        model = train_run(s, run, cfg, plant, trigger, attack)["model"]
        return {"curve": curve, "knob": s.curves[curve]["knob"], "value": value, "defence": defence, "attack": attack,
                "test": flat(evaluate_model(Path(model), test_dir(s), [trigger], s), attack)}

    return cached(Path(s.out) / "curves" / curve / f"{defence}__{attack}__{value:g}.json", spec, compute)
