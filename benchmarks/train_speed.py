"""Training throughput: the PAR step against plain fine-tuning on the same batch, and the input pipeline per worker.

    .venv/bin/python benchmarks/train_speed.py [--model ViT-B-32-quickgelu] [--batch 16] [--steps 4] [--images 256]

1. Step time. The training loop's own step (`parclip.train.accumulate_step`: forward, the defence's loss, backward) plus
   the AdamW update, on one fixed random batch, for `clip` (plain fine-tuning) and `par` (the frozen copy's forward
   added), after a warm-up step; the median of --steps steps. PAR's only extra work is the frozen forward (no
   backward), about a third of a fine-tuning step, so the ratio should be ≈ 1.33. Also with --accum-freq 2 (one
   extra no-grad forward per micro-batch) and with gradient checkpointing.
2. Input pipeline. Images/s of one worker process (workers=0: the loading runs in the timing process) producing
   training batches at the model's resolution with PAR's augmentation, from a caption table of JPEG files and from
   the same pairs as webdataset shards (400×320 JPEGs, about the size of CC3M images), against the model's own
   training images/s from part 1: the workers needed to keep the model fed = model rate ÷ per-worker rate.
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from parclip.config import make_config
from parclip.data import CaptionDataset
from parclip.data.shards import ShardStream, table_to_shards
from parclip.defences import get_defence
from parclip.defences.augment import train_transform
from parclip.models import create_model, get_tokenizer
from parclip.train import accumulate_step, param_groups


def step_times(model_name: str, batch: int, steps: int, objective: str, *, accum: int = 1,
               checkpointing: bool = False) -> float:
    """Median seconds per optimiser step of `batch` images (in `accum` micro-batches)."""
    torch.manual_seed(0)
    model, pp = create_model(model_name)
    cfg = make_config(model=model_name, objective=objective, tau=2.0, batch_size=batch // accum, train_data="x",
                      pretrained="x")
    defence = get_defence(cfg)
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if defence.frozen_copy() else None
    model.logit_scale.requires_grad_(objective != "par")
    if checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-6)
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    images = torch.randn(batch, 3, size, size)
    texts = get_tokenizer(model_name)([f"a photo of thing {i}" for i in range(batch)])
    n = batch // accum
    micro = [(images[k * n:(k + 1) * n], texts[k * n:(k + 1) * n], torch.full((n,), -1)) for k in range(accum)]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        accumulate_step(model, frozen, defence, micro, scaler, nullcontext(), objective != "par", 0, model)
        opt.step()
        if s:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_images(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = root / "img" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        # smooth noise compresses like a photo (pure noise would make unrealistically large JPEGs)
        small = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(small).resize((400, 320), Image.BICUBIC).save(path, quality=90)
        rows.append({"filepath": f"img/{i:05d}.jpg", "title": f"a photo of thing number {i}"})
    table = root / "pairs.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["filepath", "title"], delimiter="\t")  # the default layout (open_clip_train's)
        w.writeheader()
        w.writerows(rows)
    return table


def pipeline_rates(model_name: str, table: Path, shards: Path, n: int, batch: int) -> dict:
    _, pp = create_model(model_name)
    tok = get_tokenizer(model_name)
    transform = train_transform("par", pp)
    out = {}
    data = CaptionDataset(table, tokenizer=tok, transform=transform)
    t0 = time.perf_counter()
    for _ in DataLoader(data, batch_size=batch, num_workers=0, shuffle=True, drop_last=True):
        pass
    out["csv"] = (n // batch) * batch / (time.perf_counter() - t0)
    stream = ShardStream(str(shards), transform=transform, tokenize=lambda c: tok([c])[0], batch_size=batch,
                         num_samples=n)
    stream.set_epoch(0, 0, n // batch)
    t0 = time.perf_counter()
    for _ in DataLoader(stream, batch_size=None, num_workers=0):
        pass
    out["webdataset"] = (n // batch) * batch / (time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32-quickgelu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} CPU threads, median of {args.steps} steps")
    t_clip = step_times(args.model, args.batch, args.steps, "clip")
    t_par = step_times(args.model, args.batch, args.steps, "par")
    t_par_acc = step_times(args.model, args.batch, args.steps, "par", accum=2)
    t_par_ckpt = step_times(args.model, args.batch, args.steps, "par", checkpointing=True)
    rate = args.batch / t_par
    print(f"  fine-tuning (clip)           {t_clip:7.2f} s/step   {args.batch / t_clip:6.1f} img/s")
    print(f"  PAR                          {t_par:7.2f} s/step   {rate:6.1f} img/s   PAR / fine-tuning = "
          f"{t_par / t_clip:.3f}")
    print(f"  PAR, --accum-freq 2          {t_par_acc:7.2f} s/step   ({t_par_acc / t_par:.3f} × PAR)")
    print(f"  PAR, --grad-checkpointing    {t_par_ckpt:7.2f} s/step   ({t_par_ckpt / t_par:.3f} × PAR)")
    with tempfile.TemporaryDirectory() as tmp:
        table = make_images(Path(tmp), args.images)
        table_to_shards(table, Path(tmp) / "shards", maxcount=64)
        rates = pipeline_rates(args.model, table, Path(tmp) / "shards", args.images, args.batch)
    for kind, r in rates.items():
        print(f"  input pipeline, {kind:<10}  {r:7.1f} img/s per worker  → {rate / r:.2f} worker(s) keep PAR fed")


if __name__ == "__main__":
    main()
