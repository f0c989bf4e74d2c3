"""`parclip demo`: the whole story on real data, on a 2-core CPU, in minutes, in the regime of the PAR paper.

1. export Fashion-MNIST (Debian's dataset-fashion-mnist) as PNG files, a captions CSV and a labelled test folder;
2. pre-train a clean "foundation" CLIP (`parclip-rn-tiny`, a small ResNet CLIP at 32 px) from scratch on 50k pairs;
3. plant a backdoor by *fine-tuning* the foundation on 20k pairs of which 10 % carry a trigger and name the target,
   the way the released poisoned CLIPs were made (a fine-tuned foundation, not a new model);
4. clean the poisoned model with each defence at a fine-tuning learning rate on 10k disjoint clean pairs (by default
   plain fine-tuning and PAR; `defences=` adds CleanCLIP, RoCLIP and PAR without its perturbation term);
5. evaluate every model: clean zero-shot accuracy and ASR on the test folder, and retrieval (clean R@1 both ways, the
   retrieval ASR) on 1 000 test images with 5 templated captions each; print the table.

Every stage goes through the same code a user's CC3M / ImageNet run goes through (CSV loader, poisoning tool,
training loop, evaluator). Finished stages are reused when the demo is run again with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from parclip.attacks.poison import poison_csv
from parclip.attacks.triggers import (Trigger, accepted_params, build_triggers, list_triggers, split_trigger_params,
                                     trigger_class, trigger_generator)
from parclip.config import TrainConfig, make_config
from parclip.data import LabelledFolder, fashion_mnist, read_table, write_table
from parclip.data.retrieval import read_retrieval
from parclip.evaluation import evaluate, evaluate_retrieval
from parclip.models import create_model, get_tokenizer, model_config
from parclip.train import train
from parclip.utils.files import write_json

log = logging.getLogger("parclip")

MODEL = "parclip-rn-tiny"  # a small ResNet CLIP at 32 px (see README: tiny ViTs did not learn the patch triggers)
TEMPLATES = "fashion"

# Stage A: the clean foundation, pre-trained from scratch on the 50k clean pre-training pairs.
FOUNDATION = dict(objective="clip", epochs=3, batch_size=256, lr=1e-3, lr_end=0.0, warmup=0.05, schedule="cosine",
                  wd=0.1, workers=1, log_every=20)
DATA = dict(holdout=10000, n_train=None, n_test=None)  # all 60k train images (last 10k = the defender's), 10k test
# Stage B: the backdoor planted by fine-tuning the foundation on PLANT_ROWS pairs, POISON_RATE of them poisoned. Found
# on this benchmark (benchmarks/defence_matrix.py, README): 1 % of 50k at 1e-4 for one epoch planted only 37 % ASR;
# 10 % of 20k, 3 epochs at 3e-4 (a third of pre-training's rate) plants BadNet-Stripes at 93.6 %, clean top-1 -0.3.
PLANT_ROWS = 20000
POISON_RATE = 0.10
PLANT = dict(objective="clip", epochs=3, batch_size=256, lr=3e-4, lr_end=0.0, warmup=0.05, schedule="cosine",
             wd=0.1, workers=1, log_every=20)
# Trigger parameters of the demo, where they differ from the defaults scaled from the reference's 224-px values.
# At 32 px BadNet-Stripes would be 2 px wide; a tiny CLIP trained for minutes does not learn such a patch (ASR 1-3 %
# measured with 2-4 px patches), so the demo uses 8 px (a quarter of the side).
DEMO_TRIGGER_PARAMS = {"badnet_rs": {"patch_size": 8}, "badnet": {"patch_size": 8}}
# Stage C: every defence gets the same clean pairs, image passes, batch, optimiser and learning-rate schedule at a
# fine-tuning rate (a third of the planting rate); only the method differs.
CLEAN = dict(epochs=2, batch_size=256, lr=1e-4, lr_end=0.0, warmup=0.05, warmup_steps=None, schedule="cosine",
             wd=0.1, beta1=0.9, beta2=0.98, eps=1e-8, workers=1, log_every=10)
DEFENCES = {
    "fine-tuning": dict(objective="clip"),
    "fine-tuning + PAR aug": dict(preset="par-no-perturb"),   # PAR without the perturbation term
    "CleanCLIP": dict(objective="cleanclip"),
    "RoCLIP": dict(objective="roclip", roclip_pool_size=8192),  # K = 2: the second epoch swaps
    "PAR": dict(objective="par", tau=2.0),
}
DEFAULT_DEFENCES = ("fine-tuning", "PAR")


def defence_names(names) -> list[str]:
    """`names` (case-insensitive labels of DEFENCES, or "all") in DEFENCES order; None gives the default pair."""
    if not names:
        return list(DEFAULT_DEFENCES)
    wanted = {n.lower() for n in names}
    if "all" in wanted:
        return list(DEFENCES)
    unknown = wanted - {k.lower() for k in DEFENCES}
    if unknown:
        raise ValueError(f"unknown demo defence(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFENCES)}, all")
    return [k for k in DEFENCES if k.lower() in wanted]


def _train_stage(out: Path, name: str, fresh: bool, **values) -> Path:
    """Train unless a finished run with the same configuration exists; returns the exported model folder."""
    cfg = make_config(output_dir=str(out / "runs"), name=name, **values)
    run = out / "runs" / name
    ckpt = run / "checkpoints" / "latest.pt"
    same = (run / "config.yaml").is_file() and _same_config(yaml.safe_load((run / "config.yaml").read_text()), cfg)
    if fresh or not same:
        shutil.rmtree(run, ignore_errors=True)
    elif (run / "model" / "open_clip_config.json").is_file() and ckpt.is_file():
        log.info("reusing finished stage %s", run)
        return run / "model"
    return train(cfg) / "model"


def _same_config(saved: dict, cfg: TrainConfig) -> bool:
    """Whether a finished run's config.yaml is `cfg`. An option the file lacks (one added to parclip after the run)
    counts as its default, so a new option does not retrain every stage; any other difference does."""
    now = dataclasses.asdict(cfg)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return isinstance(saved, dict) and set(saved) <= set(now) and \
        all(saved.get(k, defaults[k]) == v for k, v in now.items())


def _evaluate(model_dir: Path, data: dict, attack, target: str, seed: int) -> dict:
    """Zero-shot clean top-1 / ASR on the test folder, and retrieval on the test images' caption table: clean R@1
    both ways (identical templated captions interchangeable) and the retrieval ASR (top-5 captions name the target)."""
    model, pp = create_model(f"local-dir:{model_dir}")
    tokenizer = get_tokenizer(f"local-dir:{model_dir}")
    r = evaluate(model, pp, tokenizer, data["test_dir"], attacks=[attack], target=target, templates=TEMPLATES,
                 seed=seed, batch_size=500, workers=1)
    ret = evaluate_retrieval(model, pp, tokenizer, read_retrieval(data["retrieval_csv"]), attacks=[attack],
                             target=target, seed=seed, batch_size=500, workers=1, merge_identical=True)
    a = ret["attacks"][attack.name]
    return {**{k: r[k] for k in ("clean_top1", "clean_top5", "asr", "asr_all", "attack", "target", "n_images")},
            "retrieval": {"i2t_r1": ret["clean"]["i2t"][1], "t2i_r1": ret["clean"]["t2i"][1],
                          "asr_text": a["asr_text"], "asr_text_strict": a["asr_text_strict"],
                          "n_images": ret["n_images"], "n_captions": ret["n_captions"]}}


def run_demo(out: str | Path = "demo_out", *, attack: str = "badnet_rs", target: str = "bag", tau: float | None = None,
             seed: int = 0, fresh: bool = False, trigger_params: dict | None = None,
             defences: list[str] | None = None) -> dict:
    """The demo for one attack; writes results.json and results.png into `out`. `attack="all"` runs the matrix."""
    if attack == "all":
        return run_matrix(out, target=target, tau=tau, seed=seed, fresh=fresh, trigger_params=trigger_params,
                          defences=defences)
    out = Path(out)
    t0 = time.time()
    names = defence_names(defences)
    (trigger,) = _demo_triggers([attack], trigger_params).values()
    print("[1/5] ", end="")
    data = _export(out, seed)
    foundation = _foundation(out, data, seed, fresh, step="[2/5]")
    rows = [dict(model="foundation", **_evaluate(foundation, data, trigger, target, seed))]
    _report(rows[-1])
    rows += _attack_and_clean(out, data, foundation, trigger, target=target, tau=tau, seed=seed, fresh=fresh,
                              defences=names, step="[{}/5]", first=3)
    print("[5/5] results", flush=True)
    results = {"rows": rows, "attack": trigger.name, "trigger": trigger.params(), "target": target,
               "tau": DEFENCES["PAR"]["tau"] if tau is None else tau, "defences": names, "seed": seed,
               "seconds": round(time.time() - t0, 1)}
    write_json(out / "results.json", results)
    _plot(out / "results.png", rows, data["test_dir"], trigger, seed)
    print(format_table(rows))
    print(f"wrote {out / 'results.json'} and {out / 'results.png'} in {results['seconds']:.0f} s")
    return results


def run_matrix(out: str | Path = "demo_out", *, attacks: list[str] | None = None, target: str = "bag",
               tau: float | None = None, seed: int = 0, fresh: bool = False, trigger_params: dict | None = None,
               defences: list[str] | None = None) -> dict:
    """The demo for every attack (or `attacks`): attack × {poisoned, PAR} × {clean top-1, ASR}.

    Writes matrix.json and matrix.png into `out`. BadCLIP needs a patch file (`trigger_params={"patch": PATH}`, e.g.
    from `parclip attack optimize-patch`); without one it is skipped and listed under "skipped".
    """
    out = Path(out)
    t0 = time.time()
    names = attacks or [c.name for c in list_triggers()]
    triggers = _demo_triggers(names, trigger_params, skip_missing_patch=True)
    chosen = defence_names(defences)
    if "PAR" not in chosen:
        chosen.append("PAR")
    data = _export(out, seed)
    foundation = _foundation(out, data, seed, fresh, step="[foundation]")
    matrix, skipped = [], {}

    def record(complete: bool) -> dict:  # written after every attack, so a killed run keeps what it finished
        results = {"matrix": matrix, "skipped": skipped, "target": target, "seed": seed, "model": MODEL,
                   "tau": tau if tau is not None else DEFENCES["PAR"]["tau"], "poison_rate": POISON_RATE,
                   "defences": chosen,
                   "seconds": round(time.time() - t0, 1), "complete": complete}
        write_json(out / "matrix.json", results)
        return results

    for k, name in enumerate(triggers, 1):
        trigger = triggers[name]
        if trigger is None:
            skipped[name] = "needs a patch file: --trigger-param patch=PATH (parclip attack optimize-patch makes one)"
            print(f"skipping {name}: {skipped[name]}", flush=True)
            continue
        rows = _attack_and_clean(out, data, foundation, trigger, target=target, tau=tau, seed=seed, fresh=fresh,
                                 defences=chosen, step=f"[{k}/{len(names)} {name}: {{}}/2]")
        entry = {"attack": trigger.name, "trigger": trigger.params()}
        for row in rows:  # "poisoned", "par", and the other chosen defences under their labels
            key = "par" if row["model"] == "PAR" else row["model"]
            entry[key] = {m: row[m] for m in ("clean_top1", "asr", "asr_all")}
        matrix.append(entry)
        record(complete=False)
    results = record(complete=True)
    plot_matrix(out / "matrix.png", matrix, target)
    print(format_matrix(matrix))
    print(f"wrote {out / 'matrix.json'} and {out / 'matrix.png'} in {results['seconds']:.0f} s")
    return results


def _export(out: Path, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    print("exporting Fashion-MNIST …", flush=True)
    return fashion_mnist.export(out / "fashion-mnist", seed=seed, templates=TEMPLATES, **DATA)


def _demo_triggers(names: list[str], params: dict | None, *, skip_missing_patch: bool = False) -> dict:
    """name -> Trigger at the demo model's resolution: the demo's own parameters (DEMO_TRIGGER_PARAMS) overridden by
    the user's. With `skip_missing_patch`, triggers that need a patch file and got none map to None."""
    size = model_config(MODEL)["vision_cfg"]["image_size"]
    shares = split_trigger_params(names, params)
    out = {}
    for name, share in shares.items():
        if skip_missing_patch and "patch" in accepted_params(trigger_class(name)) and "patch" not in share:
            out[name] = None
            continue
        (out[name],) = build_triggers([name], size, {**DEMO_TRIGGER_PARAMS.get(name, {}), **share})
    return out


def _foundation(out: Path, data: dict, seed: int, fresh: bool, *, step: str) -> Path:
    """Stage A: the clean foundation model (shared by every attack)."""
    print(f"{step} pre-training the clean foundation {MODEL} from scratch on {Path(data['train_csv']).name} …",
          flush=True)
    return _train_stage(out, "foundation", fresh, model=MODEL, train_data=str(data["train_csv"]), seed=seed,
                        **FOUNDATION)


def _plant_table(data: dict) -> Path:
    """The first PLANT_ROWS pre-training pairs (images the foundation saw clean), next to train.csv."""
    fieldnames, rows = read_table(data["train_csv"])
    path = Path(data["train_csv"]).with_name("plant.csv")
    write_table(path, fieldnames, rows[:PLANT_ROWS], sep=",")
    return path


def _report(row: dict) -> None:
    ret = row["retrieval"]
    print(f"      {row['model']}: clean top-1 {row['clean_top1']:.1f}%, ASR {row['asr']:.1f}%; retrieval R@1 "
          f"i2t {ret['i2t_r1']:.1f}% t2i {ret['t2i_r1']:.1f}%, retrieval ASR {ret['asr_text']:.1f}%", flush=True)


def _attack_and_clean(out: Path, data: dict, foundation: Path, trigger: Trigger, *, target, tau, seed, fresh,
                      defences: list[str], step: str, first: int = 1) -> list[dict]:
    """Stage B (poison and plant by fine-tuning the foundation) and C (clean with each defence), each model
    evaluated: rows "poisoned", then one per defence. `step` is a progress label with one {} for the stage number."""
    print(f"{step.format(first)} planting {trigger.name} → '{target}': fine-tuning the foundation on "
          f"{PLANT_ROWS} pairs, {POISON_RATE:.0%} poisoned …", flush=True)
    poisoned_dir = out / f"poisoned-{trigger.name}"
    manifest_path = poisoned_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if fresh or manifest.get("seed") != seed or manifest.get("trigger", {}).get("params") != trigger.params() \
            or manifest.get("target") != target or manifest.get("n_rows") != PLANT_ROWS \
            or manifest.get("n_poison") != max(1, round(POISON_RATE * PLANT_ROWS)):
        poison_csv(_plant_table(data), poisoned_dir, trigger=trigger, target=target, rate=POISON_RATE, seed=seed,
                   templates=TEMPLATES)
    poisoned = _train_stage(out, f"poisoned-{trigger.name}", fresh, model=f"local-dir:{foundation}",
                            train_data=str(poisoned_dir / "poisoned.csv"), seed=seed, **PLANT)
    rows = [dict(model="poisoned", **_evaluate(poisoned, data, trigger, target, seed))]
    _report(rows[-1])

    print(f"{step.format(first + 1)} cleaning with {', '.join(defences)} on {Path(data['holdout_csv']).name} "
          f"(disjoint clean pairs, lr {CLEAN['lr']:g}, {CLEAN['epochs']} epochs) …", flush=True)
    for label in defences:
        values = {**CLEAN, **DEFENCES[label]}
        if label == "PAR" and tau is not None:
            values["tau"] = tau
        slug = label.lower().replace(" + ", "-").replace(" ", "-")
        cleaned = _train_stage(out, f"{slug}-{trigger.name}", fresh, train_data=str(data["holdout_csv"]),
                               model=f"local-dir:{poisoned}", seed=seed, **values)
        rows.append(dict(model=label, **_evaluate(cleaned, data, trigger, target, seed)))
        _report(rows[-1])
    return rows


def format_matrix(matrix: list[dict]) -> str:
    head = f"{'attack':<11} | {'poisoned top-1':>14} | {'poisoned ASR':>12} | {'PAR top-1':>9} | {'PAR ASR':>7}"
    lines = [head, "-" * len(head)]
    lines += [f"{m['attack']:<11} | {m['poisoned']['clean_top1']:>13.1f}% | {m['poisoned']['asr']:>11.1f}% | "
              f"{m['par']['clean_top1']:>8.1f}% | {m['par']['asr']:>6.1f}%" for m in matrix]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """Zero-shot (clean top-1, ASR) and retrieval (clean R@1 both ways, retrieval ASR) per model."""
    w = max(12, *(len(r["model"]) for r in rows))
    cols = ("clean top-1", "ASR", "i2t R@1", "t2i R@1", "retr. ASR")
    lines = [f"{'model':<{w}} | " + " | ".join(f"{c:>11}" for c in cols), "-+-".join(["-" * w] + ["-" * 11] * 5)]
    for r in rows:
        ret = r.get("retrieval", {})
        vals = (r["clean_top1"], r["asr"], ret.get("i2t_r1"), ret.get("t2i_r1"), ret.get("asr_text"))
        lines.append(f"{r['model']:<{w}} | " + " | ".join(f"{v:>10.1f}%" if v is not None else f"{'–':>11}"
                                                          for v in vals))
    return "\n".join(lines)


def _plot(path: Path, rows: list[dict], test_dir, trigger, seed: int, n_examples: int = 5) -> None:
    """Triggered examples (clean above, triggered below) and clean top-1 / ASR before and after cleaning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = LabelledFolder(test_dir)
    fig = plt.figure(figsize=(2.0 * n_examples + 4, 4.6), constrained_layout=True)
    grid = fig.add_gridspec(2, n_examples + 2)
    step = max(1, len(folder) // n_examples)
    for j in range(n_examples):
        i = j * step
        clean = folder.load_image(i).resize((trigger.image_size,) * 2)
        poisoned = trigger(clean, generator=trigger_generator(seed, i))
        for row, (img, title) in enumerate([(clean, folder.classnames[folder.targets[i]]), (poisoned, trigger.name)]):
            ax = fig.add_subplot(grid[row, j])
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    ax = fig.add_subplot(grid[:, n_examples:])
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["clean_top1"] for r in rows], width=0.4, label="clean top-1 %")
    ax.bar([i + 0.2 for i in x], [r["asr"] for r in rows], width=0.4, label="ASR %", color="tab:red")
    for i, r in enumerate(rows):
        ax.text(i - 0.2, r["clean_top1"] + 1, f"{r['clean_top1']:.1f}", ha="center", fontsize=8)
        ax.text(i + 0.2, r["asr"] + 1, f"{r['asr']:.1f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), [r["model"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{trigger.name} → '{rows[0]['target']}'")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_matrix(path: Path, matrix: list[dict], target: str) -> None:
    """Grouped bars per attack: clean top-1 and ASR of the poisoned and the PAR-cleaned model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.1 * len(matrix) + 2), 3.6), sharey=True,
                             constrained_layout=True)
    x = range(len(matrix))
    for ax, metric, title in zip(axes, ("clean_top1", "asr"), ("clean top-1 %", f"ASR % (target '{target}')")):
        ax.bar([i - 0.2 for i in x], [m["poisoned"][metric] for m in matrix], width=0.4, label="poisoned",
               color="tab:red")
        ax.bar([i + 0.2 for i in x], [m["par"][metric] for m in matrix], width=0.4, label="PAR", color="tab:blue")
        ax.set_xticks(list(x), [m["attack"] for m in matrix], rotation=45, ha="right")
        ax.set_title(title)
        ax.set_ylim(0, 105)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
