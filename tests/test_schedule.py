import math

import numpy as np
import pytest

from parclip.defences.schedule import cosine_lr, lr_at, reference_lr


def reference_table(K, E, start, peak, end, w):
    """Independent construction of the reference's table (np.linspace warm-up, cosine over the rest)."""
    T, Wu = E * (K + 1), int(w * E * (K + 1))
    warm = np.linspace(start, peak, Wu)
    iters = np.arange(T - Wu)
    cos = end + 0.5 * (peak - end) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warm, cos])


def test_reference_schedule_matches_the_table_and_its_indexing():
    K, E = 122, 2
    table = reference_table(K, E, 3e-5, 3e-6, 1e-9, 0.5)
    ours = [reference_lr(s, steps_per_epoch=K, epochs=E) for s in range(K * E)]
    expected = [table[K * e + i] for e in range(E) for i in range(K)]
    assert np.allclose(ours, expected, rtol=1e-12, atol=0)
    assert ours[0] == pytest.approx(3e-5)
    assert 3e-6 < ours[K - 1] < 3.3e-6          # last step of epoch 0: just above the "peak"
    assert ours[K] == pytest.approx(3e-6)       # first step of epoch 1
    assert 1e-9 < ours[-1] < 1e-8               # a few × 1e-9 at the end (the last entries are never used)
    assert all(a >= b for a, b in zip(ours, ours[1:]))


def test_reference_schedule_rejects_steps_out_of_range():
    with pytest.raises(ValueError):
        reference_lr(10, steps_per_epoch=5, epochs=2)


def test_cosine_schedule_warms_up_linearly_from_zero():
    """Catches the cosine schedule (cosine_lr, or lr_at's dispatch to it) dropping its warm-up."""
    peak, total, warm = 0.4, 20, 5
    lrs = [cosine_lr(s, total_steps=total, lr_peak=peak, warmup_steps=warm) for s in range(total)]
    assert lrs[:warm] == pytest.approx([peak * (s + 1) / warm for s in range(warm)], rel=1e-12)
    assert lrs[warm:] == pytest.approx([0.5 * peak * (1 + math.cos(math.pi * k / (total - warm)))
                                        for k in range(total - warm)], rel=1e-12)
    # lr_at's cosine: warm-up = int(warmup fraction × all steps) = 5 of 2 epochs × 10 steps
    via = [lr_at(s, schedule="cosine", steps_per_epoch=10, epochs=2, lr=peak, lr_start=1.0, lr_end=0.0, warmup=0.25)
           for s in range(total)]
    assert via == pytest.approx(lrs, rel=1e-12)


def test_constant_and_unknown_schedules():
    assert lr_at(3, schedule="constant", steps_per_epoch=5, epochs=1, lr=0.2, lr_start=1, lr_end=0, warmup=0) == 0.2
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, schedule="linear", steps_per_epoch=5, epochs=1, lr=0.2, lr_start=1, lr_end=0, warmup=0)
