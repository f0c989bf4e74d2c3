"""Learning-rate schedules as pure functions of the optimiser step.

`reference_lr` reproduces the PAR reference schedule exactly, in the reference's own terms (lr_start, lr_peak,
docs/reference_differences.md#lr-schedule); `cosine_lr` is the usual open_clip schedule (linear warm-up from 0, cosine
decay) used to plant backdoors / train from scratch. `lr_at` is what training calls, with open_clip_train's meanings:
--lr is the peak (highest) rate, --warmup whole steps.
"""

from __future__ import annotations

import math

__all__ = ["reference_lr", "cosine_lr", "lr_at", "warmup_steps", "SCHEDULES"]


def reference_lr(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    lr_start: float = 3e-5,
    lr_peak: float = 3e-6,
    lr_end: float = 1e-9,
    warmup_frac: float = 0.5,
    warmup_steps: int | None = None,
) -> float:
    """The PAR reference schedule, entry for optimiser step `step` (0-based, counted over all epochs).

    With K = steps_per_epoch and E = epochs the reference builds a table one entry per epoch too long:
        T  = E·(K+1),   Wu = int(warmup_frac·E·(K+1))
        k < Wu:  lr_k = lr_start + k·(lr_peak − lr_start)/(Wu − 1)                 (linear, both ends included)
        k ≥ Wu:  lr_k = lr_end + ½(lr_peak − lr_end)·(1 + cos(π·(k − Wu)/(T − Wu)))
    and step i of epoch e reads lr_{K·e + i}, so the last E entries are never used. `warmup_steps` sets Wu directly.
    With the reference values (3e-5 → 3e-6, warm-up half of training) the "warm-up" is a linear *decay* from a 10×
    higher start.
    """
    if not 0 <= step < steps_per_epoch * epochs:
        raise ValueError(f"step {step} outside [0, {steps_per_epoch * epochs})")
    e, i = divmod(step, steps_per_epoch)
    k = steps_per_epoch * e + i  # = step; kept explicit to mirror the reference's indexing
    total = epochs * (steps_per_epoch + 1)
    warm = int(warmup_frac * epochs * (steps_per_epoch + 1)) if warmup_steps is None else int(warmup_steps)
    if k < warm:
        return lr_start if warm == 1 else lr_start + k * (lr_peak - lr_start) / (warm - 1)
    return lr_end + 0.5 * (lr_peak - lr_end) * (1 + math.cos(math.pi * (k - warm) / (total - warm)))


def cosine_lr(step: int, *, total_steps: int, lr_peak: float, warmup_steps: int = 0, lr_end: float = 0.0) -> float:
    """Linear warm-up then cosine decay:
        step < W:  lr = lr_peak·(step+1)/W
        else:      lr = lr_end + ½(lr_peak − lr_end)·(1 + cos(π·(step − W)/(total − W)))
    """
    if step < warmup_steps:
        return lr_peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return lr_end + 0.5 * (lr_peak - lr_end) * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))


SCHEDULES = ("reference", "cosine", "constant")


def warmup_steps(*, steps_per_epoch: int, epochs: int, schedule: str, warmup: int | None,
                 warmup_fraction: float) -> int:
    """The warm-up in optimiser steps: `warmup` when given (open_clip_train's --warmup, whole steps), else
    `warmup_fraction` of the run: for the reference schedule int(f·E·(K+1)) (its table is one entry per epoch too
    long, see :func:`reference_lr`), for the others int(f·E·K)."""
    if warmup is not None:
        return int(warmup)
    if schedule == "reference":
        return int(warmup_fraction * epochs * (steps_per_epoch + 1))
    return int(warmup_fraction * (epochs * steps_per_epoch))


def lr_at(step: int, *, schedule: str, steps_per_epoch: int, epochs: int, lr: float, lr_end: float,
          lr_decay_ratio: float = 0.1, warmup: int | None = None, warmup_fraction: float = 0.0) -> float:
    """The learning rate of optimiser step `step` (0-based) under `schedule`, with `lr` the peak rate (open_clip's
    --lr) and W = :func:`warmup_steps` (`warmup` whole steps, or `warmup_fraction` of the run):

        reference:  :func:`reference_lr` with lr_start = lr, lr_peak = lr·lr_decay_ratio, Wu = W
                    (linear from lr down to lr·R over W steps, then cosine to lr_end)
        cosine:     :func:`cosine_lr` with lr_peak = lr, warm-up min(W, all steps) (linear from 0, then cosine)
        constant:   lr
    """
    warm = warmup_steps(steps_per_epoch=steps_per_epoch, epochs=epochs, schedule=schedule, warmup=warmup,
                        warmup_fraction=warmup_fraction)
    if schedule == "reference":
        return reference_lr(step, steps_per_epoch=steps_per_epoch, epochs=epochs, lr_start=lr,
                            lr_peak=lr * lr_decay_ratio, lr_end=lr_end, warmup_steps=warm)
    if schedule == "cosine":
        total = steps_per_epoch * epochs
        return cosine_lr(step, total_steps=total, lr_peak=lr, warmup_steps=min(warm, total), lr_end=lr_end)
    if schedule == "constant":
        return lr
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
