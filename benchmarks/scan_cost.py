"""What `parclip scan` costs for an architecture, measured on a few batches and extrapolated to its defaults.

    .venv/bin/python benchmarks/scan_cost.py --model ViT-B-32 [--threads 2] [--repeats 3] [--classes 1000]

Random weights (the cost does not depend on them): it times the two operations a scan is made of, at the model's
resolution, and multiplies by how many of each a default scan performs (parclip.scan.ScanConfig and the sweep's
variants, the encoder-level inversion, `max_classes` class-level inversions):

* encoding: images/s of the forward pass in inference mode, batch 256 (the sweep encodes 2 × n_images per variant,
  plus the clean pass);
* an inversion step: forward and backward to the input, batch `batch_size` (encoder_steps + max_classes ×
  class_steps of them).

Image decoding and trigger application are left out (they overlap with the encoding on a loader's workers). Prints
the measured rates and the extrapolated minutes.
"""
from __future__ import annotations

import argparse
import time

import torch

from parclip.models import create_model, image_size
from parclip.scan import ScanConfig
from parclip.scan.sweep import variants


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--classes", type=int, default=1000, help="classes of the data set (ImageNet: 1000)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, pp = create_model(args.model)
    model.eval().requires_grad_(False)
    S, cfg = image_size(pp), ScanConfig()
    enc_batch = torch.rand(64, 3, S, S)
    with torch.inference_mode():
        t_enc = _time(lambda: model.encode_image(enc_batch), args.repeats) / 64

    def step():
        x = torch.rand(cfg.batch_size, 3, S, S, requires_grad=True)
        model.encode_image(x).sum().backward()
    t_step = _time(step, args.repeats)
    n_var = len(variants(S))
    encoded = cfg.n_images * (1 + 2 * n_var)
    steps = cfg.encoder_steps + min(args.classes, cfg.max_classes) * cfg.class_steps
    sweep_min, inv_min = encoded * t_enc / 60, steps * t_step / 60
    print(f"{args.model} at {S} px, {args.threads} threads: encoding {1 / t_enc:.1f} images/s, an inversion step "
          f"(batch {cfg.batch_size}) {t_step:.2f} s")
    print(f"default scan: sweep {n_var} variants × 2 × {cfg.n_images} images + the clean pass = {encoded} encodings "
          f"≈ {sweep_min:.1f} min; inversion {steps} steps ≈ {inv_min:.1f} min; "
          f"total ≈ {sweep_min + inv_min:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
