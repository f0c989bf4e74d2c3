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


def test_cosine_schedule():
    lrs = [cosine_lr(s, total_steps=100, lr_peak=1.0, warmup_steps=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert lrs[-1] < 0.001
    assert lr_at(3, schedule="constant", steps_per_epoch=5, epochs=1, lr=0.2, lr_start=1, lr_end=0, warmup=0) == 0.2
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, schedule="linear", steps_per_epoch=5, epochs=1, lr=0.2, lr_start=1, lr_end=0, warmup=0)
