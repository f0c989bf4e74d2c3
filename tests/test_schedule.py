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
    via = [lr_at(s, schedule="cosine", steps_per_epoch=10, epochs=2, lr=peak, lr_end=0.0, warmup_fraction=0.25)
           for s in range(total)]
    assert via == pytest.approx(lrs, rel=1e-12)


def test_constant_and_unknown_schedules():
    assert lr_at(3, schedule="constant", steps_per_epoch=5, epochs=1, lr=0.2, lr_end=0, warmup=0) == 0.2
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, schedule="linear", steps_per_epoch=5, epochs=1, lr=0.2, lr_end=0, warmup=0)


def test_lr_is_the_peak_and_the_reference_schedule_starts_there():
    """open_clip_train's --lr is the highest rate of the run: the reference schedule starts at it (PAR's defaults,
    TrainConfig's: 3e-5 → 3e-6 → 1e-9) and cosine reaches it at the end of its warm-up."""
    from parclip.config import make_config

    cfg = make_config()
    kw = dict(steps_per_epoch=122, epochs=2, lr=cfg.lr, lr_decay_ratio=cfg.lr_decay_ratio, lr_end=cfg.lr_end,
              warmup=cfg.warmup, warmup_fraction=cfg.warmup_fraction)
    ref = [lr_at(s, schedule=cfg.schedule, **kw) for s in range(244)]
    assert (cfg.lr, cfg.schedule) == (3e-5, "reference") and max(ref) == ref[0] == cfg.lr
    assert ref == [reference_lr(s, steps_per_epoch=122, epochs=2) for s in range(244)]  # the reference, exactly
    cos = [lr_at(s, schedule="cosine", **{**kw, "warmup": 10}) for s in range(244)]
    assert max(cos) == pytest.approx(cfg.lr) and cos.index(max(cos)) == 9


def _lr_before(step, *, schedule, steps_per_epoch, epochs, lr, lr_start, lr_end, warmup, warmup_steps=None):
    """parclip's lr_at before --lr took open_clip_train's meaning (commit 72afe4a), verbatim: `lr` was the rate at
    the end of the reference's first phase, `lr_start` its start, `warmup` a fraction below 1 and steps from 1 on."""
    if warmup_steps is None and warmup >= 1:
        warmup_steps = int(warmup)
    if schedule == "reference":
        return reference_lr(step, steps_per_epoch=steps_per_epoch, epochs=epochs, lr_start=lr_start, lr_peak=lr,
                            lr_end=lr_end, warmup_frac=warmup, warmup_steps=warmup_steps)
    if schedule == "cosine":
        total = steps_per_epoch * epochs
        warm = int(warmup * total) if warmup_steps is None else min(int(warmup_steps), total)
        return cosine_lr(step, total_steps=total, lr_peak=lr, warmup_steps=warm, lr_end=lr_end)
    return lr


def _old(**values):
    """A run's schedule settings under the old meanings (the old TrainConfig defaults filled in)."""
    return {"schedule": "reference", "lr": 3e-6, "lr_start": 3e-5, "lr_end": 1e-9, "warmup": 0.5,
            "warmup_steps": None, **values}


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 78, 122])
def test_the_protocol_and_the_recipes_train_at_the_same_rates_as_before_the_change(steps_per_epoch):
    """Catches the move to open_clip's meanings changing any run's learning rates: the protocol's stages (foundation,
    planting, every defence's cleaning, the par_recovery study's reference variant), PAR's reference defaults and the
    recipes (CleanCLIP's 50 warm-up steps, plain CLIP's 5 %) give the same rate at every step as before."""
    import importlib.util
    from pathlib import Path

    from parclip.config import make_config
    from parclip.protocol.settings import BASE_LR, CLEAN, DEFENCES, FOUNDATION, PLANT

    cases = [  # (new configuration values, the same run's values before the change)
        ({}, _old()),
        (dict(objective="cleanclip"), _old(schedule="cosine", lr=1e-5, lr_end=0.0, warmup_steps=50)),
        (dict(objective="clip"), _old(schedule="cosine", lr=5e-4, lr_end=0.0, warmup=0.05)),
        (FOUNDATION, _old(schedule="cosine", lr=1e-3, lr_end=0.0, warmup=0.05)),
        (PLANT["train"], _old(schedule="cosine", lr=3e-4, lr_end=0.0, warmup=0.05)),
        ({**PLANT["train"], **PLANT["by_attack"]["badnet"]}, _old(schedule="cosine", lr=5e-4, lr_end=0.0,
                                                                   warmup=0.05)),
        *[({**CLEAN, **DEFENCES[d], "lr": BASE_LR}, _old(schedule="cosine", lr=BASE_LR, lr_end=0.0, warmup=0.05))
          for d in DEFENCES if DEFENCES[d]],
    ]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "par_recovery.py"
    spec = importlib.util.spec_from_file_location("par_recovery", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    ref = {k: v for k, v in study.VARIANTS["reference-3e-4"].items() if k != "defence"}
    ref_old = _old(lr=3e-5, lr_start=3e-4, lr_end=0.0, warmup=0.5)
    for new, old in cases + [({**CLEAN, **DEFENCES["par"], **ref}, ref_old)]:
        cfg = make_config(**new)
        epochs = cfg.epochs
        now = [lr_at(s, schedule=cfg.schedule, steps_per_epoch=steps_per_epoch, epochs=epochs, lr=cfg.lr,
                     lr_decay_ratio=cfg.lr_decay_ratio, lr_end=cfg.lr_end, warmup=cfg.warmup,
                     warmup_fraction=cfg.warmup_fraction) for s in range(steps_per_epoch * epochs)]
        before = [_lr_before(s, steps_per_epoch=steps_per_epoch, epochs=epochs, **old)
                  for s in range(steps_per_epoch * epochs)]
        # exact but for the study's variant, whose 3e-4 × 0.1 is one rounding away from the literal 3e-5
        assert now == pytest.approx(before, rel=1e-15, abs=0), (new, old)
        assert (now == before) or new.get("lr_decay_ratio") == 0.1, new
