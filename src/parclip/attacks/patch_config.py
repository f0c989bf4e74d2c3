"""The settings of BadCLIP patch optimisation (:func:`parclip.attacks.patch_opt.optimize_patch`), also the flags of
`parclip attack optimize-patch`. Kept apart from patch_opt.py so that building the command line imports no torch."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path

from ..data.captions import CAPTION_KEY, IMG_KEY, SEPARATOR
from ..utils.checks import COUNT, FRACTION, NATURAL, NONNEGATIVE, POSITIVE, check_int, integers
from ..utils.flags import check_domains, option_name
from ..utils.flags import flag as _f

__all__ = ["PatchConfig"]


@dataclass
class PatchConfig:
    """What :func:`parclip.attacks.patch_opt.optimize_patch` does; every field is also a flag of
    `parclip attack optimize-patch` (`aug_prob` → `--aug-prob`). The defaults follow the BadCLIP reference run that
    produced the released patch (docs/badclip_patch.md). Every value is checked on construction, so a bad flag fails
    before any model is loaded."""

    # what
    data: str | os.PathLike = _f(MISSING, "image–caption table (CSV/TSV); the patch is optimised on its rows whose "
                                 "captions do NOT mention the target", metavar="TABLE")
    target: str = _f(MISSING, "target class name, e.g. banana", metavar="NAME")
    out: str | os.PathLike | None = _f(None, "output patch, .png; a JSON sidecar (same name, .json) goes next to it",
                                       shown="nothing is written", metavar="PNG")
    # objective
    steps: int = _f(7800, "optimisation steps (reference: 50 epochs x 156)", domain=COUNT)
    batch_size: int = _f(64, "images per step (capped at the number of rows that do not mention the target)",
                         domain=COUNT)
    lr: float = _f(1e-3, "Adam learning rate", domain=POSITIVE)
    aug_prob: float = _f(0.5, "probability of a step using the AutoAugment view of its whole batch",
                         domain=FRACTION)
    triplet_weight: float = _f(500.0, "weight of the triplet term (0: off)", domain=NONNEGATIVE)
    margin: float = _f(1.0, "triplet margin", domain=NONNEGATIVE)
    # templates: in Python also a list of "{}" strings; target_images: also a list of image paths
    templates: str | os.PathLike | Sequence[str] | None = _f(
        None, "target captions from a template set (openai, simple, fashion) or file",
        shown="the table's captions that mention the target, else openai", metavar="SET|FILE")
    target_images: str | os.PathLike | Sequence[str] | None = _f(
        None, "positives: a folder (recursive) or table of target-class images, or 'data' for the table's target rows",
        shown="the target's text embedding", metavar="PATH|data")
    seed: int = _f(0, "seeds the patch initialisation, batch order, augmentation and draws",
                   domain=NATURAL)
    image_size: int | None = _f(None, "side S the images are squash-resized to and the patch is pasted at",
                                shown="the model's input size", domain=integers(2))
    patch_size: int | None = _f(None, "patch side", shown="16 at 224, scaled", domain=COUNT)
    # running
    device: str = _f("auto", "auto (cuda when available), cpu or cuda")
    amp: bool | None = _f(None, "bfloat16 autocast for the model; --no-amp runs in float32", shown="on for CUDA")
    workers: int = _f(2, "image-decoding worker processes", domain=NATURAL)
    # the table(s)
    csv_img_key: str = _f(IMG_KEY, "column with image paths (open_clip_train's default)")
    csv_caption_key: str = _f(CAPTION_KEY, "column with captions (open_clip_train's default)")
    csv_separator: str = _f(SEPARATOR, "column separator (open_clip_train's default: tab)", shown="tab")
    data_root: str | None = _f(None, "folder image paths are relative to", shown="the table's folder", metavar="DIR")
    max_bad_fraction: float = _f(0.01, "stop when more than this fraction of rows is missing/corrupt/empty",
                                  domain=FRACTION)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every value (ValueError naming the flag and its domain, e.g. "--steps must be an int >= 1, got 0");
        strips the target name."""
        check_domains(self)
        if self.out is not None and Path(self.out).suffix.lower() != ".png":
            raise ValueError("the patch is saved as a lossless PNG: give --out a name ending in .png, got "
                             f"{str(self.out)!r}")
        if self.patch_size is not None:  # the bound by the model's size, when image_size is None, comes later
            check_int(option_name("patch_size"), self.patch_size, 1, self.image_size)
        if self.amp is not None and not isinstance(self.amp, bool):
            raise ValueError(f"amp must be True, False or None (on for CUDA), got {self.amp!r}")
        if not isinstance(self.target, str) or not self.target.strip():  # the rule of parclip.data.target_pattern
            raise ValueError(f"the target must be a non-empty class name, got {self.target!r}")
        self.target = self.target.strip()
