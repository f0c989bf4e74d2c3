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
3. PAR's frozen forward under bf16 autocast, with the frozen copy's weights in fp32 under ``torch.no_grad`` against
   the training loop's copy (weights in bf16, ``torch.inference_mode``).
"""
from __future__ import annotations

import argparse
import csv
import gc
import statistics
import tempfile
import time
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
from parclip.models import create_model, get_tokenizer, image_size
from parclip.train import accumulate_step, frozen_copy, param_groups, precision_policy


def random_batch(model_name: str, batch: int, device="cpu") -> tuple[torch.nn.Module, dict, torch.Tensor,
                                                                        torch.Tensor]:
    """(model with random weights (seed 0), its preprocess config, `batch` random images at its resolution, `batch`
    tokenised captions), on `device`."""
    torch.manual_seed(0)
    model, pp = create_model(model_name, device=device)
    size = image_size(pp)
    images = torch.randn(batch, 3, size, size, device=device)
    texts = get_tokenizer(model_name)([f"a photo of thing {i}" for i in range(batch)]).to(device)
    return model, pp, images, texts


def measure_steps(model_name: str, batch: int, steps: int, objective: str, *, accum: int = 1,
                  checkpointing: bool = False, device: str = "cpu", precision: str = "fp32",
                  compile_backend: str | None = None, warmup: int = 1) -> dict:
    """One configuration's optimiser steps of `batch` images (in `accum` micro-batches) on one fixed random batch:
    the training loop's own step (:func:`parclip.train.accumulate_step` with the run's precision policy and, for PAR,
    its frozen copy :func:`parclip.train.frozen_copy`) plus the scaler's AdamW update, `warmup` untimed steps first
    (torch.compile compiles there). `compile_backend`: None (eager) or a torch.compile backend, applied to the model and
    the frozen copy as `parclip train --torch-compile` does. Returns {"step_s": median seconds per step, "images_per_s",
    "peak_mem_gib": the device's peak allocated memory in the timed steps (weights, optimiser state, frozen copy and
    activations; not the warm-up's one-off copies and compilation buffers), None on CPU}."""
    dev = torch.device(device)
    gc.collect()  # what earlier configurations left in reference cycles must not count here
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    model, _, images, texts = random_batch(model_name, batch, dev)
    cfg = make_config(model=model_name, objective=objective, tau=2.0, batch_size=batch // accum, train_data="x",
                      pretrained="x")
    defence = get_defence(cfg)
    prec = precision_policy(precision, dev)
    frozen = frozen_copy(model, prec.name) if defence.frozen_copy() else None
    learn_scale = objective != "par"
    model.logit_scale.requires_grad_(learn_scale)
    if checkpointing:
        model.set_grad_checkpointing(True)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-6)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    if compile_backend and frozen is not None:
        frozen = torch.compile(frozen, backend=compile_backend)
    n = batch // accum
    micro = [(images[k * n:(k + 1) * n], texts[k * n:(k + 1) * n], torch.full((n,), -1)) for k in range(accum)]
    times = []
    try:
        for s in range(warmup + steps):
            if s == warmup and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)  # the peak starts again from what is allocated now
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            accumulate_step(forward, frozen, defence, micro, prec.scaler, prec.autocast, learn_scale, 0, model)
            prec.scaler.step(opt)
            prec.scaler.update()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if s >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        if compile_backend:
            torch._dynamo.reset()  # the next configuration compiles its own graphs; this one's model can go
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    step_s = statistics.median(times)
    return {"step_s": step_s, "images_per_s": batch / step_s, "peak_mem_gib": peak}


def step_times(model_name: str, batch: int, steps: int, objective: str, *, accum: int = 1,
               checkpointing: bool = False) -> float:
    """Median seconds per optimiser step on the CPU in fp32 (:func:`measure_steps`)."""
    return measure_steps(model_name, batch, steps, objective, accum=accum, checkpointing=checkpointing)["step_s"]


def frozen_forward_times(model_name: str, batch: int, steps: int) -> dict:
    """Median seconds of PAR's frozen forward on `batch` images under bf16 autocast: the copy kept in fp32 weights run
    under ``torch.no_grad`` (autocast casts its weights at every forward), against :func:`parclip.train.frozen_copy`
    at the autocast dtype run under ``torch.inference_mode`` (what the training loop does)."""
    model, _, images, texts = random_batch(model_name, batch)
    out = {}
    for name, frozen, mode in (("fp32 weights, no_grad", frozen_copy(model, "fp32"), torch.no_grad),
                               ("bf16 weights, inference_mode", frozen_copy(model, "amp_bf16"), torch.inference_mode)):
        times = []
        for s in range(steps + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16), mode():
                frozen(images, texts)
            if s:  # the first forward warms up
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


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
    frozen = frozen_forward_times(args.model, args.batch, args.steps)
    for name, t in frozen.items():
        print(f"  PAR's frozen forward, bf16 autocast, {name:<29} {t:7.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        table = make_images(Path(tmp), args.images)
        table_to_shards(table, Path(tmp) / "shards", maxcount=64)
        rates = pipeline_rates(args.model, table, Path(tmp) / "shards", args.images, args.batch)
    for kind, r in rates.items():
        print(f"  input pipeline, {kind:<10}  {r:7.1f} img/s per worker  → {rate / r:.2f} worker(s) keep PAR fed")


if __name__ == "__main__":
    main()
