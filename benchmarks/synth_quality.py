"""Which small generator makes the embedded benchmark's synthetic pairs: candidate families measured by the clean
foundation (docs/synth_quality.md).

    .venv/bin/python benchmarks/synth_quality.py --cache bench_defences [--data DIR] [--foundation DIR] \\
        [--out docs/synth_quality] [--candidates pca-gauss cvae ...] [--per-class 200] [--smoke]

Each candidate (CANDIDATES: a family and its settings) is trained, seeded, on the foundation's 50 000 pre-training
pairs (train.csv of the Fashion-MNIST export: never the defender's held-out pairs, never a triggered image), then
generates `--per-class` images per class. The clean foundation (stage A of the protocol, reused from --cache or
trained there; or --foundation) measures them:

* recognisability: its zero-shot top-1 on the generated images, each labelled by the class it was generated for
  (reference: the same on as many real test images);
* Fréchet distance (FD) between the generated and real test images' embeddings in its image-embedding space
  (reference: FD between two disjoint real test samples of the same size, the scale of "as close as real");
* copying: the median pixel distance of a generated image to its nearest same-class training image, over the same
  for the real test images (the ratio), and the share of near copies (generated images nearer a training image than
  99 % of the real test images are).

The choice (`choose`): among candidates with at most MAX_NEAR_COPIES near copies, the lowest FD within MAX_TOP1_GAP
points of their best top-1.

Writes OUT/quality.json, OUT/quality.md (the table printed at the end) and OUT/samples_<candidate>.png (a row per
class) plus OUT/samples_real.png; the trained generators go to CACHE/generators/<candidate>.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from parclip.data import get_templates
from parclip.data.fashion_mnist import FASHION_CLASSES, folder_name
from parclip.evaluation.synth_quality import (copy_statistics, embed_images, embedding_frechet_distance,
                                              real_baseline_split, recognisability)
from parclip.protocol import Settings
from parclip.protocol.settings import TEMPLATES
from parclip.synth import Prompt
from parclip.synth.fit import DEFAULT_FAMILY, FAMILIES, fit_family, read_class_images
from parclip.utils.files import atomic_write, write_json, write_text

# candidate -> (family, settings that differ from the family's defaults in parclip.synth.fit.FAMILIES)
CANDIDATES: dict[str, tuple[str, dict]] = {
    "pca-gauss": ("pca-gauss", dict(clusters=1, components=32)),  # one Gaussian per class
    "pca-gauss-k8": ("pca-gauss", dict(clusters=1, components=8)),
    "pca-gauss-noise": ("pca-gauss", dict(clusters=1, components=32, residual_noise=True)),
    "pca-mix8": ("pca-gauss", dict(clusters=8, components=16)),  # per class 8 k-means clusters, a Gaussian each
    "pca-mix32": ("pca-gauss", dict(clusters=32, components=8)),
    "pca-mix64": ("pca-gauss", dict(clusters=64, components=8)),
    "pca-mix128": ("pca-gauss", dict(clusters=128, components=8)),
    "cvae": ("cvae", {}),
    "cvae-t0.8": ("cvae", dict(temperature=0.8)),  # the same training, latents drawn at temperature 0.8
}
SMOKE_OPTIONS = {"cvae": dict(epochs=1, batch_size=64), "pca-gauss": dict(clusters=1)}  # smoke: ~20 images a class
MAX_TOP1_GAP = 5.0  # the choice: lowest FD among candidates within this many points of the best top-1 ...
MAX_NEAR_COPIES = 0.02  # ... that make at most 2 % near copies (nearer a training image than 99 % of unseen real ones)


def data_and_foundation(args) -> tuple[Path, Path]:
    """(the Fashion-MNIST export's root, the clean foundation's model folder): given, or stage A in --cache."""
    if args.data and args.foundation:
        return Path(args.data), Path(args.foundation)
    from parclip.protocol.stages import export_data, stage_foundation
    s = Settings(out=args.cache, cache=args.cache, seed=args.seed, smoke=args.smoke, workers=0)
    data = export_data(s)
    root = Path(args.data) if args.data else Path(data["root"])
    return root, Path(args.foundation) if args.foundation else Path(stage_foundation(s, data)["model"])


def read_test(root: Path) -> tuple[list[Image.Image], list[int]]:
    """Every test image of the export (RGB) with its class index in FASHION_CLASSES order."""
    images, labels = [], []
    for k, c in enumerate(FASHION_CLASSES):
        for p in sorted((root / "test" / folder_name(c)).glob("*.png")):
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
            labels.append(k)
    if not images:
        raise SystemExit(f"no test images under {root / 'test'}")
    return images, labels


def grid(images: list[Image.Image], per_row: int, zoom: int = 3) -> Image.Image:
    """The images in rows of `per_row` (one row per class), each enlarged `zoom` times (nearest)."""
    w, h = images[0].size
    rows = (len(images) + per_row - 1) // per_row
    canvas = Image.new("RGB", (per_row * w * zoom, rows * h * zoom), "white")
    for i, im in enumerate(images):
        canvas.paste(im.resize((w * zoom, h * zoom), Image.NEAREST), ((i % per_row) * w * zoom, (i // per_row) * h * zoom))
    return canvas


def save_grid(path: Path, images: list[Image.Image], labels: list[int], per_class: int, columns: int = 10) -> None:
    """PNG of the first `columns` images of every class, a row per class."""
    rows = [[im for im, y in zip(images, labels) if y == k][:columns] for k in range(len(FASHION_CLASSES))]
    picked = [im for row in rows for im in row + [Image.new("RGB", images[0].size, "white")] * (columns - len(row))]
    atomic_write(path, lambda tmp: grid(picked, columns).save(tmp, format="PNG"))


def grey(images: list[Image.Image]) -> np.ndarray:
    """uint8 [N, H, W]: the images' grey values."""
    return np.stack([np.asarray(im.convert("L")) for im in images])


def measure(name: str, gen_images, labels, model, pp, tok, real: dict, t_train: float, t_sample: float) -> dict:
    """One candidate's numbers: recognisability, FD to the real reference sample, copying of training images."""
    feats = embed_images(model, pp, gen_images)
    rec = recognisability(model, tok, feats, labels, FASHION_CLASSES, get_templates(TEMPLATES))
    copies = copy_statistics(grey(gen_images), real["pixels"], real["train_x"], gen_labels=labels,
                             unseen_labels=real["labels"], train_labels=real["train_y"])
    return {"candidate": name, "train_seconds": round(t_train, 1), "sample_seconds_per_1000": round(t_sample, 2),
            "top1": rec["top1"], "per_class_top1": rec["per_class"],
            "fd": embedding_frechet_distance(feats, real["feats"]), "copies": copies, "n": len(labels)}


def choose(rows: list[dict]) -> str | None:
    """The chosen candidate: among those making at most MAX_NEAR_COPIES near copies, the lowest FD within
    MAX_TOP1_GAP points of their best top-1 (None if every candidate copies)."""
    new = [r for r in rows if r["copies"]["near_copies"] <= MAX_NEAR_COPIES]
    if not new:
        return None
    best = max(r["top1"] for r in new)
    return min((r for r in new if r["top1"] >= best - MAX_TOP1_GAP), key=lambda r: r["fd"])["candidate"]


def table(report: dict) -> str:
    ref = report["reference"]
    lines = ["| candidate | family | train s | sample s / 1000 | top-1 % (gen) | FD to real | NN-distance ratio | "
             "near copies % |", "|---|---|---|---|---|---|---|---|",
             f"| real test images | – | – | – | {ref['real_top1']:.1f} | {ref['fd_real_vs_real']:.4f} (real vs real) "
             f"| 1 (median {ref['median_nn_unseen']:.2f}) | 1.0 (by definition) |"]
    for r in report["candidates"]:
        mark = " **(chosen)**" if r["candidate"] == report["chosen"] else ""
        c = r["copies"]
        lines.append(f"| {r['candidate']}{mark} | {r['family']} | {r['train_seconds']:.1f} | "
                     f"{r['sample_seconds_per_1000']:.2f} | {r['top1']:.1f} | {r['fd']:.4f} | {c['ratio']:.2f} | "
                     f"{100 * c['near_copies']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="bench_defences", help="the protocol's stage A (reused or trained here) and "
                    "CACHE/generators")
    ap.add_argument("--data", help="a Fashion-MNIST export's root (train.csv, test/); default: CACHE's")
    ap.add_argument("--foundation", help="the clean foundation's model folder; default: CACHE's stage A")
    ap.add_argument("--out", default="docs/synth_quality")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--per-class", type=int, default=200, help="generated (and real) images per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="the protocol's smoke data, 1 epoch, 4 images a class")
    args = ap.parse_args(argv)
    import torch
    from parclip.models import create_model, get_tokenizer
    torch.set_num_threads(1)
    per_class = 4 if args.smoke else args.per_class
    root, foundation = data_and_foundation(args)
    model, pp = create_model(f"local-dir:{foundation}")
    tok = get_tokenizer(f"local-dir:{foundation}")
    t0 = time.perf_counter()
    train_x, train_y = read_class_images(root / "train.csv", FASHION_CLASSES)
    t_read = time.perf_counter() - t0
    test_images, test_labels = read_test(root)
    ref_idx, base_idx = real_baseline_split(test_labels, per_class, seed=args.seed)
    real = [test_images[i] for i in ref_idx]
    real_labels = [test_labels[i] for i in ref_idx]
    real_feats = embed_images(model, pp, real)
    base_feats = embed_images(model, pp, [test_images[i] for i in base_idx])
    real_ref = {"feats": real_feats, "pixels": grey(real), "labels": real_labels, "train_x": train_x,
                "train_y": train_y}
    unseen = copy_statistics(real_ref["pixels"], real_ref["pixels"], train_x, gen_labels=real_labels,
                             unseen_labels=real_labels, train_labels=train_y)
    reference = {"real_top1": recognisability(model, tok, real_feats, real_labels, FASHION_CLASSES,
                                              get_templates(TEMPLATES))["top1"],
                 "fd_real_vs_real": embedding_frechet_distance(base_feats, real_feats), "n_real": len(ref_idx),
                 "median_nn_unseen": unseen["median_nn_unseen"]}
    out = Path(args.out)
    save_grid(out / "samples_real.png", real, real_labels, per_class)
    labels = [k for k in range(len(FASHION_CLASSES)) for _ in range(per_class)]
    prompts = [Prompt(f"a photo of a {FASHION_CLASSES[k]}.", label=k, classname=FASHION_CLASSES[k]) for k in labels]
    seeds = [args.seed * 1_000_000 + i for i in range(len(labels))]
    rows, trained = [], {}
    for name in args.candidates:
        family, options = CANDIDATES[name]
        options = {**options, **(SMOKE_OPTIONS.get(family, {}) if args.smoke else {})}
        train_options = {k: v for k, v in options.items() if k != "temperature"}
        key = (family, tuple(sorted(train_options.items())))
        t0 = time.perf_counter()
        if key not in trained:  # a temperature variant samples the same trained weights
            trained[key] = (fit_family(family, train_x, train_y, FASHION_CLASSES, seed=args.seed, **train_options),
                            time.perf_counter() - t0)
        gen, t_train = trained[key]
        if "temperature" in FAMILIES[family][1]:
            gen.config["temperature"] = options.get("temperature", FAMILIES[family][1]["temperature"])
        gen.store(Path(args.cache) / "generators" / name)
        t0 = time.perf_counter()
        images = gen.generate(prompts, seeds)
        t_sample = (time.perf_counter() - t0) * 1000 / len(images)
        rows.append({**measure(name, images, labels, model, pp, tok, real_ref, t_train, t_sample),
                     "family": family, "settings": dict(gen.config)})
        save_grid(out / f"samples_{name}.png", images, labels, per_class)
        c = rows[-1]["copies"]
        print(f"{name}: top-1 {rows[-1]['top1']:.1f} %, FD {rows[-1]['fd']:.4f}, NN ratio {c['ratio']:.2f}, near copies "
              f"{100 * c['near_copies']:.1f} %, train {t_train:.0f} s", flush=True)
    report = {"foundation": str(foundation), "data": str(root), "train_images": len(train_y),
              "read_seconds": round(t_read, 1), "per_class": per_class, "seed": args.seed, "smoke": args.smoke,
              "templates": TEMPLATES, "reference": reference, "candidates": rows, "chosen": choose(rows),
              "rule": f"among the candidates with at most {100 * MAX_NEAR_COPIES:g} % near copies, the lowest FD "
                      f"within {MAX_TOP1_GAP:g} points of their best top-1",
              "default_family": DEFAULT_FAMILY}
    write_json(out / "quality.json", report)
    md = table(report)
    write_text(out / "quality.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
