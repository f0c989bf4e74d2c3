"""Defences: the cleaning methods, one module each behind one interface (:class:`~parclip.defences.base.Defence`),
found by name, the way triggers are. `parclip train --objective NAME` trains with one; `parclip defences list` shows
them and their presets.

    clip.py       plain CLIP-loss fine-tuning (the baseline; also plants backdoors); preset clip-cleanclip-recipe
    par.py        Perturb and Recover; preset par-no-perturb (the ablation without the perturbation term)
    cleanclip.py  CleanCLIP: CLIP loss + in-modal self-supervision (AutoAugment, EDA)
    roclip.py     RoCLIP: nearest-neighbour caption swap from a FIFO pool every K-th epoch, cross-augmentation
    augment.py    the image augmentations (PAR's noise + CutOut, AutoAugment view, RoCLIP's cross-augmentation)
    eda.py        EDA caption augmentation on offline WordNet
    schedule.py   learning-rate schedules as pure functions

Each defence's loss is a pure function in `parclip.objectives`, its equation in the docstring. A new defence is one
module here with a `@register`ed `Defence` subclass and one import line below.
"""
from .base import (PRESETS, Defence, Embeddings, Preset, defence_class, get_defence, list_defences, register,
                   register_preset, resolve_preset)

# defence modules (importing registers them)
from . import clip  # noqa: F401,E402  clip, preset clip-cleanclip-recipe
from . import par  # noqa: F401,E402  par, preset par-no-perturb
from . import cleanclip  # noqa: F401,E402  cleanclip
from . import roclip  # noqa: F401,E402  roclip

__all__ = ["Defence", "Embeddings", "Preset", "PRESETS", "register", "register_preset", "get_defence",
           "defence_class", "list_defences", "resolve_preset"]
