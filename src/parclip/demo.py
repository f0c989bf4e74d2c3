"""`parclip demo`: the whole story on real data, on a 2-core CPU, in minutes.

1. export Fashion-MNIST (Debian's dataset-fashion-mnist) as PNG files, a captions CSV and a labelled test folder;
2. poison 1 % of the pre-training captions table with a trigger, captions rewritten to name the target class;
3. pre-train a small ResNet CLIP (`parclip-rn-tiny`, 32 px) from scratch on it with the plain CLIP loss: the
   backdoor is planted;
4. evaluate clean zero-shot accuracy and ASR;
5. clean it with PAR on a disjoint clean subset (the held-out train images) and evaluate again.

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
from parclip.config import make_config
from parclip.data import LabelledFolder, fashion_mnist
from parclip.evaluation import evaluate
from parclip.models import create_model, get_tokenizer, model_config
from parclip.train import train
from parclip.utils.files import write_json

log = logging.getLogger("parclip")

MODEL = "parclip-rn-tiny"  # a small ResNet CLIP at 32 px (see README: tiny ViTs did not learn the patch triggers)
TEMPLATES = "fashion"

# Pre-training that plants the backdoor (plain CLIP loss from scratch).
PRETRAIN = dict(objective="clip", epochs=3, batch_size=256, lr=1e-3, lr_end=0.0, warmup=0.05, schedule="cosine",
                wd=0.1, workers=1, log_every=20)
POISON_RATE = 0.01
DATA = dict(holdout=10000, n_train=None, n_test=None)  # all 60k train images (last 10k = PAR's clean pairs), 10k test
# Trigger parameters of the demo, where they differ from the defaults scaled from the reference's 224-px values.
# At 32 px BadNet-Stripes would be 2 px wide; a tiny CLIP trained for minutes does not learn such a patch from 1 %
# poisoned pairs (ASR 1-3 % measured with 2-4 px patches), so the demo uses 8 px (a quarter of the side).
DEMO_TRIGGER_PARAMS = {"badnet_rs": {"patch_size": 8}, "badnet": {"patch_size": 8}}
# PAR cleaning of the poisoned model on the held-out clean pairs (tuned on this benchmark, see README).
PAR = dict(objective="par", epochs=5, batch_size=256, tau=1.0, lr=5e-4, lr_start=5e-4, lr_end=1e-6, warmup=0.0,
           schedule="reference", wd=0.1, workers=1, log_every=10)


def _train_stage(out: Path, name: str, fresh: bool, **values) -> Path:
    """Train unless a finished run with the same configuration exists; returns the exported model folder."""
    cfg = make_config(output_dir=str(out / "runs"), name=name, **values)
    run = out / "runs" / name
    ckpt = run / "checkpoints" / "latest.pt"
    same = (run / "config.yaml").is_file() and yaml.safe_load((run / "config.yaml").read_text()) == \
        dataclasses.asdict(cfg)
    if fresh or not same:
        shutil.rmtree(run, ignore_errors=True)
    elif (run / "model" / "open_clip_config.json").is_file() and ckpt.is_file():
        log.info("reusing finished stage %s", run)
        return run / "model"
    return train(cfg) / "model"


def _evaluate(model_dir: Path, test_dir: Path, attack, target: str, seed: int) -> dict:
    model, pp = create_model(f"local-dir:{model_dir}")
    r = evaluate(model, pp, get_tokenizer(f"local-dir:{model_dir}"), test_dir, attacks=[attack], target=target,
                 templates=TEMPLATES, seed=seed, batch_size=500, workers=1)
    return {k: r[k] for k in ("clean_top1", "clean_top5", "asr", "asr_all", "attack", "target", "n_images")}


def run_demo(out: str | Path = "demo_out", *, attack: str = "badnet_rs", target: str = "bag", tau: float | None = None,
             seed: int = 0, fresh: bool = False, trigger_params: dict | None = None) -> dict:
    """The demo for one attack; writes results.json and results.png into `out`. `attack="all"` runs the matrix."""
    if attack == "all":
        return run_matrix(out, target=target, tau=tau, seed=seed, fresh=fresh, trigger_params=trigger_params)
    out = Path(out)
    t0 = time.time()
    (trigger,) = _demo_triggers([attack], trigger_params).values()
    print("[1/5] ", end="")
    data = _export(out, seed)
    rows, par = _attack_and_clean(out, data, trigger, target=target, tau=tau, seed=seed, fresh=fresh, step="[{}/5]",
                                  first=2)
    print("[5/5] results", flush=True)
    results = {"rows": rows, "attack": trigger.name, "trigger": trigger.params(), "target": target, "tau": par["tau"],
               "seed": seed, "seconds": round(time.time() - t0, 1)}
    write_json(out / "results.json", results)
    _plot(out / "results.png", rows, data["test_dir"], trigger, seed)
    print(format_table(rows))
    print(f"wrote {out / 'results.json'} and {out / 'results.png'} in {results['seconds']:.0f} s")
    return results


def run_matrix(out: str | Path = "demo_out", *, attacks: list[str] | None = None, target: str = "bag",
               tau: float | None = None, seed: int = 0, fresh: bool = False, trigger_params: dict | None = None) -> dict:
    """The demo for every attack (or `attacks`): attack × {poisoned, PAR} × {clean top-1, ASR}.

    Writes matrix.json and matrix.png into `out`. BadCLIP needs a patch file (`trigger_params={"patch": PATH}`, e.g.
    from `parclip attack optimize-patch`); without one it is skipped and listed under "skipped".
    """
    out = Path(out)
    t0 = time.time()
    names = attacks or [c.name for c in list_triggers()]
    triggers = _demo_triggers(names, trigger_params, skip_missing_patch=True)
    data = _export(out, seed)
    matrix, skipped = [], {}

    def record(complete: bool) -> dict:  # written after every attack, so a killed run keeps what it finished
        results = {"matrix": matrix, "skipped": skipped, "target": target, "seed": seed, "model": MODEL,
                   "tau": tau if tau is not None else PAR["tau"], "poison_rate": POISON_RATE,
                   "seconds": round(time.time() - t0, 1), "complete": complete}
        write_json(out / "matrix.json", results)
        return results

    for k, name in enumerate(triggers, 1):
        trigger = triggers[name]
        if trigger is None:
            skipped[name] = "needs a patch file: --trigger-param patch=PATH (parclip attack optimize-patch makes one)"
            print(f"skipping {name}: {skipped[name]}", flush=True)
            continue
        rows, par = _attack_and_clean(out, data, trigger, target=target, tau=tau, seed=seed, fresh=fresh,
                                      step=f"[{k}/{len(names)} {name}: {{}}/3]")
        matrix.append({"attack": trigger.name, "trigger": trigger.params(),
                       "poisoned": {m: rows[0][m] for m in ("clean_top1", "asr", "asr_all")},
                       "par": {m: rows[1][m] for m in ("clean_top1", "asr", "asr_all")}})
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


def _attack_and_clean(out: Path, data: dict, trigger: Trigger, *, target, tau, seed, fresh, step, first: int = 1):
    """Poison, pre-train, evaluate, clean with PAR, evaluate: rows for the poisoned and the cleaned model.
    `step` is a progress label with one {} filled with the stage number, starting at `first`."""
    print(f"{step.format(first)} poisoning {POISON_RATE:.0%} of the pre-training pairs with {trigger.name} → "
          f"'{target}' …", flush=True)
    poisoned_dir = out / f"poisoned-{trigger.name}"
    manifest_path = poisoned_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if fresh or manifest.get("seed") != seed or manifest.get("trigger", {}).get("params") != trigger.params() \
            or manifest.get("target") != target:
        poison_csv(data["train_csv"], poisoned_dir, trigger=trigger, target=target, rate=POISON_RATE, seed=seed,
                   templates=TEMPLATES)

    print(f"{step.format(first + 1)} pre-training {MODEL} from scratch on the poisoned pairs (the backdoor is "
          f"planted) …", flush=True)
    poisoned = _train_stage(out, f"poisoned-{trigger.name}", fresh, model=MODEL,
                            train_data=str(poisoned_dir / "poisoned.csv"), seed=seed, **PRETRAIN)
    before = _evaluate(poisoned, data["test_dir"], trigger, target, seed)
    print(f"      poisoned: clean top-1 {before['clean_top1']:.1f}%, ASR {before['asr']:.1f}%", flush=True)

    par = dict(PAR, tau=tau) if tau is not None else PAR
    print(f"{step.format(first + 2)} cleaning with PAR (τ={par['tau']}) on {Path(data['holdout_csv']).name} "
          f"(disjoint clean pairs) …", flush=True)
    cleaned = _train_stage(out, f"par-{trigger.name}", fresh, train_data=str(data["holdout_csv"]),
                           model=f"local-dir:{poisoned}", seed=seed, **par)
    after = _evaluate(cleaned, data["test_dir"], trigger, target, seed)
    print(f"      PAR-cleaned: clean top-1 {after['clean_top1']:.1f}%, ASR {after['asr']:.1f}%", flush=True)
    return [dict(model="poisoned", **before), dict(model="PAR-cleaned", **after)], par


def format_matrix(matrix: list[dict]) -> str:
    head = f"{'attack':<11} | {'poisoned top-1':>14} | {'poisoned ASR':>12} | {'PAR top-1':>9} | {'PAR ASR':>7}"
    lines = [head, "-" * len(head)]
    lines += [f"{m['attack']:<11} | {m['poisoned']['clean_top1']:>13.1f}% | {m['poisoned']['asr']:>11.1f}% | "
              f"{m['par']['clean_top1']:>8.1f}% | {m['par']['asr']:>6.1f}%" for m in matrix]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<12} | {'clean top-1':>11} | {'ASR':>7}", f"{'-' * 12}-+-{'-' * 11}-+-{'-' * 7}"]
    lines += [f"{r['model']:<12} | {r['clean_top1']:>10.1f}% | {r['asr']:>6.1f}%" for r in rows]
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
    ax.set_xticks(list(x), [r["model"] for r in rows])
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
