"""Run configurations as dataclasses whose fields are also command-line flags.

* :class:`TrainConfig` (`parclip train`): filled from defaults < YAML file < command-line flags. The YAML keys and the
  flags are the same names; the resolved configuration is written into the run directory as `config.yaml`.
* :class:`PatchConfig` (`parclip attack optimize-patch`): defaults < flags, checked on construction.

One generator serves both: :func:`add_dataclass_arguments` adds one flag per field (`lr_start` → `--lr-start`), with
the help, choices and default from the field's metadata (:func:`_f`), and :func:`dataclass_from_args` builds the
dataclass from the flags that were given.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .utils.checks import check_fraction, check_int, check_number

__all__ = ["TrainConfig", "PatchConfig", "add_dataclass_arguments", "dataclass_values",
           "dataclass_from_args", "add_config_arguments", "config_from_args", "load_yaml", "make_config",
           "CLIP_DEFAULTS"]


def _f(default, help: str, choices=None, *, shown: str | None = None, metavar: str | None = None):
    """A dataclass field that is also a flag: `help`, `choices` and `metavar` go to argparse; `shown` is how the
    default reads in the help when the value itself would not teach (e.g. None meaning "the model's input size").
    `default=MISSING` makes the field (and its flag) required."""
    return field(default=default, metadata={"help": help, "choices": choices, "shown": shown, "metavar": metavar})


@dataclass
class TrainConfig:
    """Defaults are PAR's reference settings (par.md §5.1, trigger.sh): τ 2.15, lr 3e-5 → 3e-6 → 1e-9, 2 epochs,
    512 images per GPU (× 4 GPUs in the paper), AdamW (0.9, 0.98), weight decay 1e-4."""

    # model
    model: str = _f("ViT-B-32-quickgelu", "open_clip architecture name (e.g. ViT-B-32-quickgelu, RN50-quickgelu, "
                    "ViT-L-14-336-quickgelu, parclip-tiny) or local-dir:PATH")
    pretrained: str | None = _f(None, "starting checkpoint: the possibly poisoned model to clean (a local file: "
                                "state dict, CleanCLIP/PAR release .pt, safetensors). Omit to train from scratch")
    force_quick_gelu: bool = _f(False, "use QuickGELU activations (OpenAI-derived weights need it)")
    allow_unsafe_load: bool = _f(False, "allow pickled code in checkpoints (TorchScript/JIT); only for files you trust")
    # data
    train_data: str | None = _f(None, "image–caption table (CSV/TSV) of clean pairs")
    data_root: str | None = _f(None, "folder that image paths in the table are relative to (default: the table's folder)")
    csv_img_key: str = _f("image", "column with image paths")
    csv_caption_key: str = _f("caption", "column with captions")
    csv_separator: str | None = _f(None, "column separator (default: tab for .tsv, comma otherwise)")
    train_num_samples: int | None = _f(None, "use only this many rows (the first N)")
    max_bad_fraction: float = _f(0.01, "stop when more than this fraction of rows are missing/corrupt/empty")
    workers: int = _f(2, "data-loading worker processes per device")
    # objective
    objective: str = _f("par", "par: Perturb and Recover cleaning; clip: plain CLIP loss (fine-tuning, or planting "
                        "a backdoor on poisoned data)", ["par", "clip"])
    tau: float = _f(2.15, "PAR threshold τ on the batch-mean squared distance to the frozen model (0..4); larger "
                    "removes more backdoor and costs more clean accuracy")
    par_weight: float = _f(0.5, "weight w of each distance term")
    per_sample_threshold: bool = _f(False, "threshold each sample's distance instead of the batch mean (not in "
                                    "the reference)")
    logit_scale: str = _f("auto", "auto: frozen for par (as the reference), learned for clip",
                          ["auto", "frozen", "learned"])
    augment: str = _f("auto", "auto: PAR's noise+CutOut for par, none for clip", ["auto", "none", "par"])
    noise: str = _f("one_sided", "PAR noise: one_sided (reference) or symmetric", ["one_sided", "symmetric"])
    noise_sigma: float = _f(0.2, "σ of the augmentation noise")
    # optimisation
    epochs: int = _f(2, "passes over the training table")
    batch_size: int = _f(512, "images per device per step (global batch = this × world size)")
    lr: float = _f(3e-6, "peak learning rate (the reference's --lr)")
    lr_start: float = _f(3e-5, "learning rate at step 0 for the reference schedule (it decays linearly to --lr)")
    lr_end: float = _f(1e-9, "final learning rate")
    warmup: float = _f(0.5, "fraction of training before the cosine part starts")
    schedule: str = _f("reference", "reference: PAR's schedule (lr_start → lr linearly, then cosine to lr_end); "
                       "cosine: linear warm-up from 0 then cosine; constant", ["reference", "cosine", "constant"])
    wd: float = _f(1e-4, "AdamW weight decay on ≥2-D weights (biases, norms, embeddings of dim<2 get none)")
    beta1: float = _f(0.9, "AdamW β1")
    beta2: float = _f(0.98, "AdamW β2")
    eps: float = _f(1e-8, "AdamW ε")
    grad_clip: float | None = _f(None, "clip the global gradient norm to this value (off in the reference)")
    precision: str = _f("auto", "auto: amp (fp16 + GradScaler) on GPU, fp32 on CPU", ["auto", "fp32", "amp",
                        "amp_bf16"])
    device: str = _f("auto", "auto, cpu or cuda")
    bn_mode: str = _f("auto", "BatchNorm during training (RN50): frozen running statistics (what the reference "
                      "effectively does), train, or auto: frozen for par, train for clip", ["auto", "frozen", "train"])
    # run
    output_dir: str = _f("runs", "parent folder of run directories")
    name: str | None = _f(None, "run name (default: <date>-<objective>-<model>); re-using a name resumes it")
    seed: int = _f(0, "seed for data order, augmentation and initialisation")
    resume: str = _f("auto", "auto: continue the run in --name if it has a checkpoint; none: start over; or a "
                     "checkpoint path")
    save_every: int = _f(0, "also checkpoint every N steps (0: only at the end of each epoch)")
    log_every: int = _f(10, "write a metrics line every N steps")
    progress: bool = _f(True, "show a progress bar (rank 0)")


CLIP_DEFAULTS: dict[str, Any] = dict(lr=5e-4, lr_end=0.0, warmup=0.05, schedule="cosine", wd=0.1)
"""Defaults applied when --objective clip is chosen and the value was not set explicitly (open_clip-style training)."""


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
    steps: int = _f(7800, "optimisation steps (reference: 50 epochs x 156)")
    batch_size: int = _f(64, "images per step (capped at the number of rows that do not mention the target)")
    lr: float = _f(1e-3, "Adam learning rate")
    aug_prob: float = _f(0.5, "probability of a step using the AutoAugment view of its whole batch")
    triplet_weight: float = _f(500.0, "weight of the triplet term (0: off)")
    margin: float = _f(1.0, "triplet margin")
    # templates: in Python also a list of "{}" strings; target_images: also a list of image paths
    templates: str | os.PathLike | Sequence[str] | None = _f(
        None, "target captions from a template set (openai, simple, fashion) or file",
        shown="the table's captions that mention the target, else openai", metavar="SET|FILE")
    target_images: str | os.PathLike | Sequence[str] | None = _f(
        None, "positives: a folder (recursive) or table of target-class images, or 'data' for the table's target rows",
        shown="the target's text embedding", metavar="PATH|data")
    seed: int = _f(0, "seeds the patch initialisation, batch order, augmentation and draws")
    image_size: int | None = _f(None, "side S the images are squash-resized to and the patch is pasted at",
                                shown="the model's input size")
    patch_size: int | None = _f(None, "patch side", shown="16 at 224, scaled")
    # running
    device: str = _f("auto", "auto (cuda when available), cpu or cuda")
    amp: bool | None = _f(None, "bfloat16 autocast for the model; --no-amp runs in float32", shown="on for CUDA")
    workers: int = _f(2, "image-decoding worker processes")
    # the table(s)
    csv_img_key: str = _f("image", "column with image paths")
    csv_caption_key: str = _f("caption", "column with captions")
    csv_separator: str | None = _f(None, "column separator", shown="tab for .tsv, comma otherwise")
    data_root: str | None = _f(None, "folder image paths are relative to", shown="the table's folder", metavar="DIR")
    max_bad_fraction: float = _f(0.01, "stop when more than this fraction of rows is missing/corrupt/empty")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every value (ValueError naming the field and its range); strips the target name."""
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_number("lr", self.lr, 0.0)
        check_number("aug_prob", self.aug_prob, 0.0, 1.0)
        check_number("triplet_weight", self.triplet_weight, 0.0)
        check_number("margin", self.margin, 0.0)
        check_int("workers", self.workers, 0)
        check_int("seed", self.seed)
        if self.out is not None and Path(self.out).suffix.lower() != ".png":
            raise ValueError("the patch is saved as a lossless PNG: give --out a name ending in .png, got "
                             f"{str(self.out)!r}")
        if self.image_size is not None:
            check_int("image_size", self.image_size, 2)
        if self.patch_size is not None:  # the bound by the model's size, when image_size is None, comes later
            check_int("patch_size", self.patch_size, 1, self.image_size)
        if self.amp is not None and not isinstance(self.amp, bool):
            raise ValueError(f"amp must be True, False or None (on for CUDA), got {self.amp!r}")
        check_fraction("max_bad_fraction", self.max_bad_fraction)
        if not isinstance(self.target, str) or not self.target.strip():  # the rule of parclip.data.target_pattern
            raise ValueError(f"the target must be a non-empty class name, got {self.target!r}")
        self.target = self.target.strip()


def _base_type(tp) -> type:
    args = getattr(tp, "__args__", None)
    if args:  # Optional[X] / X | None / X | Y: the first type
        return next(a for a in args if a is not type(None))
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, required: Sequence[str] = ()) -> None:
    """Add one flag per field of the dataclass `cls` (`lr_start` → `--lr-start`), help and choices from its metadata.

    Every flag defaults to None, so that only explicit flags override lower layers (the dataclass defaults, a YAML
    file); the help shows the field's default. A bool field becomes `--x/--no-x`; `X | None` (or `X | Y`) is parsed as
    the first type X. Fields without a default, and those named in `required`, become required flags.
    """
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        meta = f.metadata
        needed = f.default is MISSING or f.name in required
        shown = meta.get("shown") or f.default
        help_ = meta["help"] if needed else f"{meta['help']} (default: {shown})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                required=needed, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=None, choices=meta.get("choices"),
                                required=needed, help=help_,
                                metavar=meta.get("metavar") or (None if meta.get("choices") else tp.__name__.upper()))


def dataclass_values(cls: type, args: argparse.Namespace) -> dict:
    """The fields of `cls` that were given as flags (not None in `args`)."""
    return {f.name: v for f in dataclasses.fields(cls) if (v := getattr(args, f.name, None)) is not None}


def dataclass_from_args(cls: type, args: argparse.Namespace, base: Mapping | None = None):
    """`cls(**values)` from defaults < `base` (e.g. a YAML file's values) < the flags given in `args`."""
    return cls(**{**(base or {}), **dataclass_values(cls, args)})


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`parclip train`'s flags: `--config` (a YAML file) and one flag per TrainConfig field."""
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    add_dataclass_arguments(parser, TrainConfig)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{p}: unknown option(s) {', '.join(unknown)}; see `parclip train --help`")
    return data


def make_config(**values) -> TrainConfig:
    """Build a TrainConfig from explicit values; objective-specific defaults fill what was not given."""
    if values.get("objective") == "clip":
        values = {**CLIP_DEFAULTS, **values}
    return TrainConfig(**values)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from defaults < the `--config` YAML file < the flags given."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    return make_config(**{**values, **dataclass_values(TrainConfig, args)})
