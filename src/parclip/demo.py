"""`parclip demo`: the whole story on real data, on a 2-core CPU, in minutes: one attack of the defence × attack
benchmark (:mod:`parclip.protocol`, docs/defence_matrix.md), with fewer defences, plus retrieval.

1. export Fashion-MNIST (Debian's dataset-fashion-mnist) as PNG files, a captions CSV and a labelled test folder;
2. pre-train a clean "foundation" CLIP (`parclip-rn-tiny`, a small ResNet CLIP at 32 px) from scratch on 50k pairs;
3. plant a backdoor by *fine-tuning* the foundation on 20k of its pairs of which 10 % carry a trigger and name the
   target, the way the released poisoned CLIPs were made (a fine-tuned foundation, not a new model);
4. clean the poisoned model with each defence at a fine-tuning learning rate on 10k disjoint clean pairs, with the
   benchmark's common budget (by default plain fine-tuning and PAR; `defences=` adds the others);
5. evaluate every model: clean zero-shot accuracy and ASR on the test folder (the benchmark's cells), and retrieval
   (clean R@1 both ways, the retrieval ASR) on 1 000 test images with 5 templated captions each; print the table.

Every stage goes through the same code a user's CC3M / ImageNet run goes through (CSV loader, poisoning tool,
training loop, evaluator), and is cached under its settings: finished stages are reused when the demo (or the
benchmark, pointed at the same folder with --cache) runs again with the same settings.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from parclip.attacks.triggers import list_triggers, split_trigger_params, trigger_class, trigger_generator
from parclip.data import LabelledFolder
from parclip.data.retrieval import read_retrieval
from parclip.evaluation import evaluate_retrieval
from parclip.models import create_model, get_tokenizer
from parclip.protocol import LABELS, SYNTH, Settings, fmt, make_trigger, stage_cell
from parclip.protocol.run import foundation_stage, matrix_stage, plant_stage
from parclip.utils.files import save_figure, write_json

DEFAULT_DEFENCES = ("clip", "par")
# The defender's protocol with the benchmark's grid less its top rate 1e-3, so the demo stays under 10 minutes on 2
# cores: the rule still picks the highest rate within the clean budget, from the rates tried (docs/par_recovery.md).
DEMO_LR_GRID = [1e-4, 3e-4]


def defence_keys(names) -> list[str]:
    """Protocol keys (clip, clip_aug, cleanclip, roclip, par) of `names`: keys or their labels (LABELS,
    case-insensitive), or "all"; in the protocol's order. None gives the default pair (fine-tuning and PAR)."""
    cleaning = [k for k in LABELS if k != "none"]
    if not names:
        return list(DEFAULT_DEFENCES)
    by_name = {**{k: k for k in cleaning}, **{LABELS[k].lower(): k for k in cleaning}}
    wanted = {n.lower() for n in names}
    if "all" in wanted:
        return cleaning
    unknown = wanted - set(by_name)
    if unknown:
        raise ValueError(f"unknown demo defence(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(f'{k} ({LABELS[k]})' for k in cleaning)}, all")
    return [k for k in cleaning if k in {by_name[n] for n in wanted}]


def demo_settings(out, *, attacks: list[str], target: str = "bag", tau: float | None = None, seed: int = 0,
                  trigger_params: dict | None = None, smoke: bool = False, synthetic: bool = False) -> Settings:
    """The benchmark's settings under the defender's protocol (`Settings.defender`, grid DEMO_LR_GRID) in one folder
    (`out` holds every stage), with the demo's overrides: PAR's τ, the target, the user's trigger parameters on
    top of the protocol's, and `synthetic`: clean on SYNTH["n"] synthetic pairs instead of the real ones."""
    out = str(Path(out).absolute())
    s = Settings.defender(out=out, cache=out, seed=seed, smoke=smoke, progress=True, target=target,
                          lr_grid=list(DEMO_LR_GRID), synthetic=SYNTH["n"] if synthetic else 0)
    if tau is not None:
        s.defences["par"] = dict(s.defences["par"], tau=tau)
    for name, share in split_trigger_params(attacks, trigger_params).items():
        s.trigger_params[name] = {**s.trigger_params.get(name, {}), **share}
    return s


def forget_stages(s: Settings) -> None:
    """Remove every computed stage of `s` (the data export stays: it is checked and reused on its own)."""
    for root in {Path(s.out), Path(s.cache)}:
        for name in ("runs", "cells", "curves", "poisoned", "badclip", "data/val", "data/defender_val"):
            shutil.rmtree(root / name, ignore_errors=True)
        for name in ("foundation.json", "data/split.json", "data/plant_pairs.csv", "matrix.json",
                     "data/defender_split.json", "data/defender_train.csv"):
            (root / name).unlink(missing_ok=True)


def run_demo(out: str | Path = "demo_out", *, attack: str = "badnet_rs", target: str = "bag", tau: float | None = None,
             seed: int = 0, fresh: bool = False, trigger_params: dict | None = None,
             defences: list[str] | None = None, smoke: bool = False, synthetic: bool = False) -> dict:
    """The demo for one attack; writes results.json and results.png into `out`. `attack="all"` runs the matrix.
    `smoke`: the benchmark's smoke size (a few hundred images, one epoch per stage: checks the set-up, the numbers
    say nothing). `synthetic`: the defences clean on synthetic pairs (:func:`demo_settings`)."""
    if attack == "all":
        return run_matrix(out, target=target, tau=tau, seed=seed, fresh=fresh, trigger_params=trigger_params,
                          defences=defences, smoke=smoke, synthetic=synthetic)
    t0 = time.time()
    keys = defence_keys(defences)
    name = trigger_class(attack).name
    s = demo_settings(out, attacks=[name], target=target, tau=tau, seed=seed, trigger_params=trigger_params,
                      smoke=smoke, synthetic=synthetic)
    if fresh:
        forget_stages(s)
    print("[1/5] exporting Fashion-MNIST; [2/5] the clean foundation, pre-trained from scratch …", flush=True)
    data, split, foundation, patch = foundation_stage(s, [name])
    print(f"[3/5] planting {name} → '{target}' by fine-tuning the foundation on {s.plant['n_pairs']} pairs, "
          f"{s.plant['rate']:.0%} poisoned …", flush=True)
    plants = plant_stage(s, [name], foundation, split, patch)
    if name not in plants:
        raise RuntimeError(f"planting {name} failed (see the error above); run the demo again to retry")
    plant = plants[name]
    trigger = make_trigger(s, name, patch)
    pairs = (f"{s.synthetic} synthetic pairs (a generator fitted to the foundation's pairs)" if s.synthetic
             else "the held-out clean pairs")
    print(f"[4/5] cleaning with {', '.join(LABELS[k] for k in keys)} on {pairs}, "
          f"{s.clean['epochs']} epochs; the defender's rule picks each rate without the trigger: the highest of "
          f"{', '.join(f'{lr:g}' for lr in sorted(s.lr_grid, reverse=True))} whose clean accuracy on "
          f"{s.defender_val} validation pairs is within 2 points of the poisoned model's …", flush=True)
    cells = {k: stage_cell(s, k, name, plant, patch) for k in keys}
    print("[5/5] measuring retrieval …", flush=True)
    models = [("foundation", foundation["model"], plant["foundation_test"]), ("poisoned", plant["model"], plant["test"])]
    models += [(LABELS[k], cells[k]["model"], cells[k]["test"]) for k in keys]
    lrs = {LABELS[k]: cells[k]["lr"] for k in keys}
    rows = [{"model": label, **zero_shot, "attack": name, "target": target, "lr": lrs.get(label),
             "retrieval": _retrieval(model_dir, data, trigger, s)} for label, model_dir, zero_shot in models]
    for row in rows:
        _report(row)
    results = {"rows": rows, "attack": name, "trigger": trigger.params(), "target": target,
               "tau": s.defences["par"]["tau"], "defences": [LABELS[k] for k in keys], "seed": seed,
               "seconds": round(time.time() - t0, 1), "protocol": {"clean": s.clean, "plant": s.plant,
                                                                  "foundation": s.foundation, "lr_grid": s.lr_grid,
                                                                  "select": s.select, "val_pairs": s.defender_val,
                                                                  "clean_data": "synthetic" if s.synthetic else "real",
                                                                  "synthetic_pairs": s.synthetic}}
    out = Path(s.out)
    write_json(out / "results.json", results)
    _plot(out / "results.png", rows, data["test_dir"], trigger, seed)
    print(format_table(rows))
    print(f"wrote {out / 'results.json'} and {out / 'results.png'} in {results['seconds']:.0f} s")
    return results


def run_matrix(out: str | Path = "demo_out", *, attacks: list[str] | None = None, target: str = "bag",
               tau: float | None = None, seed: int = 0, fresh: bool = False, trigger_params: dict | None = None,
               defences: list[str] | None = None, smoke: bool = False, synthetic: bool = False) -> dict:
    """The demo for every attack (or `attacks`): the benchmark's matrix, planted model and the chosen defences
    (PAR always) × attacks, clean top-1 / ASR. Writes matrix.json, matrix.md and matrix.png into `out`. BadCLIP's
    patch is optimised against the foundation unless `trigger_params` name a patch file."""
    t0 = time.time()
    names = [trigger_class(a).name for a in attacks] if attacks else [c.name for c in list_triggers()]
    keys = defence_keys(defences)
    keys = ["none", *keys, *([] if "par" in keys else ["par"])]
    s = demo_settings(out, attacks=names, target=target, tau=tau, seed=seed, trigger_params=trigger_params,
                      smoke=smoke, synthetic=synthetic)
    if fresh:
        forget_stages(s)
    print("[foundation] exporting Fashion-MNIST and pre-training the clean foundation …", flush=True)
    _, split, foundation, patch = foundation_stage(s, names)
    print(f"[plant] {', '.join(names)} …", flush=True)
    plants = plant_stage(s, names, foundation, split, patch)
    print(f"[clean] {', '.join(LABELS[k] for k in keys[1:])} …", flush=True)
    matrix, table, failed = matrix_stage(s, names, keys, foundation, plants, patch, t0=t0)
    print(table)
    print(f"wrote {Path(s.out) / 'matrix.json'}, matrix.md and matrix.png in {time.time() - t0:.0f} s"
          + (f"; {failed} cell(s) and {len(names) - len(plants)} plant(s) FAILED, see above (run again to retry)"
             if failed or len(plants) < len(names) else ""))
    return matrix


def _retrieval(model_dir, data: dict, trigger, s: Settings) -> dict:
    """Retrieval on the test images' caption table: clean R@1 both ways (identical templated captions
    interchangeable) and the retrieval ASR (top-5 captions name the target)."""
    model, pp = create_model(f"local-dir:{model_dir}")
    ret = evaluate_retrieval(model, pp, get_tokenizer(f"local-dir:{model_dir}"), read_retrieval(data["retrieval_csv"]),
                             attacks=[trigger], target=s.target, seed=s.seed, batch_size=500, workers=s.workers,
                             merge_identical=True)
    a = ret["attacks"][trigger.name]
    return {"i2t_r1": ret["clean"]["i2t"][1], "t2i_r1": ret["clean"]["t2i"][1], "asr_text": a["asr_text"],
            "asr_text_strict": a["asr_text_strict"], "n_images": ret["n_images"], "n_captions": ret["n_captions"]}


def _report(row: dict) -> None:
    ret = row["retrieval"]
    print(f"      {row['model']}: clean top-1 {row['clean_top1']:.1f}%, ASR {row['asr']:.1f}%; retrieval R@1 "
          f"i2t {ret['i2t_r1']:.1f}% t2i {ret['t2i_r1']:.1f}%, retrieval ASR {ret['asr_text']:.1f}%", flush=True)


def format_table(rows: list[dict]) -> str:
    """Zero-shot (clean top-1, ASR) and retrieval (clean R@1 both ways, retrieval ASR) per model."""
    w = max(12, *(len(r["model"]) for r in rows))
    cols = ("clean top-1", "ASR", "i2t R@1", "t2i R@1", "retr. ASR")
    lines = [f"{'model':<{w}} | {'lr':>6} | " + " | ".join(f"{c:>11}" for c in cols),
             "-+-".join(["-" * w, "-" * 6] + ["-" * 11] * 5)]
    for r in rows:
        ret = r.get("retrieval", {})
        vals = (r["clean_top1"], r["asr"], ret.get("i2t_r1"), ret.get("t2i_r1"), ret.get("asr_text"))
        lr = fmt(r["lr"]) if r.get("lr") else "–"
        lines.append(f"{r['model']:<{w}} | {lr:>6} | " + " | ".join(f"{v:>10.1f}%" if v is not None else f"{'–':>11}"
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
    save_figure(fig, path, dpi=110)
    plt.close(fig)
