"""Defences: what cleaning a model needs besides the training loop (which lives in `parclip.train`).

    augment.py    training-time augmentation (PAR's one-sided noise + CutOut)
    schedule.py   learning-rate schedules (PAR's reference schedule, cosine, constant) as pure functions

The losses of every defence are pure functions in `parclip.objectives` (CLIP, PAR). A new defence adds its loss
there, its augmentation and schedule here, and one `--objective` choice in `parclip.config`.
"""
