"""Evaluation throughput: zero-shot and retrieval images/s, caption encoding, and the retrieval score matrix at COCO
size, with the time a full ImageNet / COCO evaluation would take on this machine at these rates.

    .venv/bin/python benchmarks/eval_speed.py [--models parclip-rn-tiny ViT-B-32] [--images 200] [--threads 2]

Images/s count image passes (clean and triggered); retrieval's excludes caption encoding, timed on its own.
Random weights (speed does not depend on them) on a folder of random 256×256 JPEGs in 10 class folders, with a
caption table of 5 captions per image. Each model is timed end to end through the public entry points
(`evaluate`: clean pass + one triggered pass; `evaluate_retrieval`: captions, clean pass, triggered pass, scoring),
after one warm-up run on a few images. The COCO-size score matrix (5 000 images × 25 000 captions, d = 512) is
timed on random unit vectors with the same blocked top-k the metrics use.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from parclip.attacks.triggers import build_triggers
from parclip.data.retrieval import read_retrieval
from parclip.evaluation import evaluate, evaluate_retrieval
from parclip.evaluation.retrieval_metrics import recall_at_k, text_asr
from parclip.models import create_model, get_tokenizer, image_size

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "a {} on a table.", "a close-up of the {}.", "itap of a {}."]


def make_data(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """n random JPEGs in class folders, and a caption table with 5 captions each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        c = CLASSES[i % len(CLASSES)]
        path = root / "folder" / c.replace(" ", "_") / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path, quality=90)
        rows += [{"filepath": str(path), "title": t.format(c) + f" number {i}"} for t in TEMPLATES]
    table = root / "captions.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["filepath", "title"], delimiter="\t")  # the default layout (open_clip_train's)
        w.writeheader()
        w.writerows(rows)
    return root / "folder", table


def time_model(name: str, folder: Path, table: Path, n: int, batch_size: int, workers: int) -> dict:
    model, pp = create_model(name)
    tok = get_tokenizer(name)
    (trigger,) = build_triggers(["badnet_rs"], image_size(pp))
    ret = read_retrieval(table)
    common = dict(attacks=[trigger], target="bag", batch_size=batch_size, workers=workers, progress=False)
    evaluate(model, pp, tok, folder, templates=TEMPLATES, **{**common, "batch_size": 8})  # warm-up
    t0 = time.perf_counter()
    evaluate(model, pp, tok, folder, templates=TEMPLATES, **common)
    zs = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_retrieval(model, pp, tok, ret, **common)
    rt = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(ret.captions), batch_size):
            model.encode_text(tok(ret.captions[b:b + batch_size]), normalize=True)
    txt = time.perf_counter() - t0
    return {"model": name, "image_size": image_size(pp), "zero_shot_images_per_s": 2 * n / zs,
            "retrieval_s": rt, "retrieval_images_per_s": 2 * n / (rt - txt), "captions_per_s": len(ret.captions) / txt}


def time_scoring(n_img: int = 5000, n_txt: int = 25000, dim: int = 512) -> float:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n_txt, dim, generator=g), dim=-1)
    owner = torch.arange(n_txt) // 5
    t0 = time.perf_counter()
    recall_at_k(img, txt, owner)
    text_asr(img, txt, torch.rand(n_txt, generator=g) < 0.01, owner)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["parclip-rn-tiny", "ViT-B-32"])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, table = make_data(Path(tmp), args.images)
        rows = [time_model(m, folder, table, args.images, args.batch_size, args.workers) for m in args.models]
    score = time_scoring()
    print(f"{torch.get_num_threads()} CPU threads, {args.images} images, batch {args.batch_size}, "
          f"{args.workers} loader worker(s)")
    print(f"{'model':<16} | {'px':>4} | {'zero-shot img/s':>15} | {'retrieval img/s':>15} | {'captions/s':>10} | "
          f"{'ImageNet val, 1 attack':>22} | {'COCO 5k, 1 attack':>17}")
    for r in rows:
        imagenet = 2 * 50000 / r["zero_shot_images_per_s"]
        coco = r["retrieval_s"] * 5000 / args.images + score  # captions and both image passes scale with the images
        print(f"{r['model']:<16} | {r['image_size']:>4} | {r['zero_shot_images_per_s']:>15.1f} | "
              f"{r['retrieval_images_per_s']:>15.1f} | {r['captions_per_s']:>10.1f} | "
              f"{imagenet / 60:>19.1f} min | {coco / 60:>13.1f} min")
    print(f"COCO-size scoring (5 000 × 25 000, d 512: R@1/5/10 both ways + retrieval ASR): {score:.1f} s")


if __name__ == "__main__":
    main()
