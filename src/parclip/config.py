"""Training configuration: one dataclass, filled from defaults < YAML file < command-line flags.

Every field becomes a `parclip train` flag (`lr_start` → `--lr-start`), so the YAML keys and the flags are the same
names. The resolved configuration is written into the run directory as `config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

__all__ = ["TrainConfig", "add_config_arguments", "config_from_args", "load_yaml", "make_config", "CLIP_DEFAULTS"]


def _f(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


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


def _base_type(tp) -> type:
    args = getattr(tp, "__args__", None)
    if args:  # Optional[X] / X | None
        return next(a for a in args if a is not type(None))
    return tp


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field (defaults None, so that only explicit flags override the YAML)."""
    parser.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        help_ = f"{f.metadata['help']} (default: {f.default})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=tp, default=None, choices=f.metadata.get("choices"),
                                help=help_, metavar=None if f.metadata.get("choices") else tp.__name__.upper())


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
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return make_config(**values)
