"""Optimise a BadCLIP patch against a frozen CLIP model (baselines.md §4.7), reimplemented from the description.

    parclip attack optimize-patch --model RN50-quickgelu --pretrained clean_rn50.pt --data cc3m_10k.csv \\
        --target banana --out banana_rn50.png

The patch δ ∈ [0,1]^{3×l×l} is the only trainable tensor; the model stays in eval mode with frozen weights. Each step,
for a batch x of images whose captions do **not** mention the target:

1. with probability ``aug_prob`` (0.5) the whole batch is replaced by its AutoAugment view (torchvision's ImageNet
   policy, drawn per image, on the 8-bit images);
2. clip(δ) is pasted at the centre of the squash-resized ``S × S`` images in [0, 1] pixel space, rows and columns
   ``[s, s+l)`` with ``s = int(int(S/2) - l/2)`` exactly where the ``badclip`` trigger puts it; only then are the images
   resized to the model resolution (when ``image_size`` differs from it) and normalised with the model's mean/std;
3. with L2-normalised embeddings a_i = f_I(x_i ⊕ δ) (anchor), n_i = f_I(x_i) (the same view without the patch, no
   gradient) and p_i (positive, below),

       L(δ) = CLIP-InfoNCE(a, f_T(c))  +  triplet_weight · mean_i max(‖a_i − p_i‖ − ‖a_i − n_i‖ + margin, 0)

   where c_i is a target caption drawn (with replacement) for each image and the InfoNCE uses the model's frozen
   ``exp(logit_scale)``;
4. one Adam step (lr 1e-3) on δ, then δ is projected back onto [0, 1].

Target captions: the ``templates`` filled with the target when ``templates`` is given; otherwise the natural captions of
the table's rows that mention the target (what the reference did with its 1 922 "banana" CC3M captions); when no row
mentions it, the OpenAI templates. Positives p_i: embeddings of real target images when ``target_images`` is given
(a folder, searched recursively, an image–caption table, or ``"data"`` for the images of the table's target rows),
precomputed once with the model's eval transform and drawn at random per step; **without target images the positive is
the text embedding of the target** (the normalised mean of the target captions' embeddings, the zero-shot class
prototype), so the triplet pulls triggered images towards the target's text embedding instead of towards target photos.

"Mentions the target" is a case-insensitive whole-word match of the target or its plural (``target``, ``target+s``,
``target+es``): "Bananas on a table" mentions "banana", "bandana" does not.

Defaults follow the reference run that produced the released patch (``..._pos_neg_tri*500``): batch 64, lr 1e-3,
AutoAugment with p 0.5, triplet weight 500 and margin 1.0, 16 px at 224, init N(0.5, 0.25²) clipped, ≈ 7 800 steps
(50 epochs of 10 000 images). Differences from the reference, all deliberate:

* fully seeded (patch init, batch order, caption and positive draws from torch generators derived from ``seed``, the
  augmentation coin from ``random.Random(seed)``, AutoAugment's own draws from a forked, seeded torch RNG): the same
  seed, data and model give the same patch;
* the loss is chosen by flags, not by substrings of a run name; the EDA caption augmentation (a no-op in the reference)
  is not reproduced; any batch size works (the reference required exactly 64);
* δ is projected onto [0, 1] after each step (the reference clipped only in the forward pass, so an entry that left
  [0, 1] got no gradient any more and stayed saturated);
* the patch is saved as a **lossless RGB PNG** of ``round(255 · δ)``: no JPEG loss, and no red/blue swap (the reference
  wrote a JPEG with cv2, which swapped R and B; see :mod:`parclip.attacks.triggers.badclip`).

Next to the PNG a JSON sidecar (same name, ``.json``) records the model, checkpoint, target, settings, seed, data
counts and losses.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..data.targets import mentions, target_pattern  # noqa: F401  (re-exported)
from ..data import IMAGE_EXTENSIONS, CaptionDataset, DataError, fill, get_templates, open_rgb
from ..objectives import clip_loss
from ..utils.checks import check_int, check_number
from ..utils.files import atomic_write, write_json
from .triggers import pil_to_uint8, squash_resize, trigger_generator
from .triggers.badclip import center_offset, default_patch_size

__all__ = ["PatchResult", "optimize_patch", "mentions", "target_pattern", "init_patch", "paste_patch",
           "normalise", "save_patch_png", "read_patch_png", "target_similarity", "PATCH_FORMAT"]

logger = logging.getLogger("parclip")

PATCH_FORMAT = "parclip-patch/1"
DEFAULT_STEPS = 7800
MAX_TARGET_IMAGES = 4096
MAX_PROTOTYPE_CAPTIONS = 1024
_TEXT_BATCH = 256


# ----------------------------------------------------------------------------------------------------------------------
# small pure pieces
# ----------------------------------------------------------------------------------------------------------------------

def init_patch(patch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The reference's initialisation: N(0.5, 0.25²) per entry, clipped to [0, 1]; float32 ``[3, l, l]``."""
    return (0.5 + 0.25 * torch.randn(3, patch_size, patch_size, generator=generator)).clamp(0, 1)


def paste_patch(x: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Differentiable centre paste: ``x`` float ``[B, 3, S, S]`` in [0, 1], ``patch`` ``[3, l, l]`` (with grad).

    Same location as the ``badclip`` trigger: rows and columns ``[s, s+l)``, ``s = int(int(S/2) - l/2)``.
    """
    S, l = x.shape[-1], patch.shape[-1]
    s = center_offset(S, l)
    full = F.pad(patch, (s, S - s - l, s, S - s - l))                # [3, S, S], the patch at its place
    mask = torch.zeros(1, S, S, device=x.device, dtype=x.dtype)
    mask[:, s:s + l, s:s + l] = 1
    return x * (1 - mask) + full.to(x.dtype)[None] * mask


def normalise(x: torch.Tensor, preprocess_cfg: dict) -> torch.Tensor:
    """``(x - mean) / std`` with the model's statistics; ``x`` float ``[B, 3, H, W]`` in [0, 1]."""
    mean = torch.tensor(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=x.device,
                        dtype=x.dtype)
    std = torch.tensor(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), device=x.device,
                       dtype=x.dtype)
    return (x - mean[:, None, None]) / std[:, None, None]


def _model_size(preprocess_cfg: dict) -> int:
    size = preprocess_cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"patch optimisation needs a square model input, the model's size is {size}")
        size = size[0]
    return int(size)


def _to_model_input(x: torch.Tensor, model_size: int, preprocess_cfg: dict) -> torch.Tensor:
    """Squash-resized ``S x S`` images in [0, 1] -> the model's normalised input. The model's resize + centre crop of
    a square image is a plain resize to its size (a no-op when S equals it)."""
    if x.shape[-1] != model_size:
        x = F.interpolate(x, size=(model_size, model_size), mode="bicubic", align_corners=False,
                          antialias=model_size < x.shape[-1]).clamp(0, 1)
    return normalise(x, preprocess_cfg)


def save_patch_png(patch: torch.Tensor, path: str | os.PathLike) -> Path:
    """Save float ``[3, l, l]`` in [0, 1] as a lossless RGB PNG of ``round(255 · clip(patch))`` (no channel swap)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the patch is saved as a lossless PNG: give a file name ending in .png, got {path.name!r}")
    u8 = patch.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy(), "RGB").save(tmp, "PNG"))
    return path


def read_patch_png(path: str | os.PathLike) -> torch.Tensor:
    """A patch PNG back as uint8 ``[3, l, l]`` (RGB)."""
    with Image.open(path) as im:
        return pil_to_uint8(im.convert("RGB"))


# ----------------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------------

class _SquashedImages(Dataset):
    """uint8 ``[3, S, S]`` squash-resized images from a list of paths; an undecodable image is replaced by the next
    one in the list (logged once), never by an image outside the list."""

    def __init__(self, paths: Sequence[str], size: int):
        self.paths = list(paths)
        self.size = size
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self.paths)
        for k in range(n):
            j = (i + k) % n
            try:
                return pil_to_uint8(squash_resize(open_rgb(self.paths[j]), self.size))
            except DataError as e:
                if j not in self._warned:
                    self._warned.add(j)
                    logger.warning("%s; using the next image instead", e)
        raise DataError(f"none of the {n} images can be decoded")


class _TransformedImages(Dataset):
    def __init__(self, paths: Sequence[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[i]))


def _split_table(data, target_re: re.Pattern, *, img_key: str, caption_key: str, sep, root,
                 max_bad_fraction: float) -> tuple[list[str], list[str], list[str], int]:
    """(clean image paths, target-row image paths, target-row captions, rows examined)."""
    ds = CaptionDataset(data, img_key=img_key, caption_key=caption_key, sep=sep, root=root,
                        max_bad_fraction=max_bad_fraction)
    clean, tgt_paths, tgt_caps = [], [], []
    for p, c in zip(ds.paths, ds.captions):
        if target_re.search(c):
            tgt_paths.append(p)
            tgt_caps.append(c)
        else:
            clean.append(p)
    return clean, tgt_paths, tgt_caps, len(ds)


def _target_image_paths(target_images, data_target_paths: list[str], *, img_key: str, caption_key: str, sep,
                        root, max_bad_fraction: float) -> tuple[list[str], str]:
    if isinstance(target_images, str) and target_images == "data":
        if not data_target_paths:
            raise DataError("target_images='data' uses the images of the table rows that mention the target, but no "
                            "row mentions it; pass a folder or table of target images instead")
        return list(data_target_paths), "data (table rows that mention the target)"
    if isinstance(target_images, (list, tuple)):
        paths = [str(p) for p in target_images]
        return paths, f"list of {len(paths)} images"
    src = Path(target_images).expanduser()
    if src.is_dir():
        paths = sorted(str(p) for p in src.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not paths:
            raise DataError(f"no images found under {src} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        return paths, str(src)
    if src.is_file():
        ds = CaptionDataset(src, img_key=img_key, caption_key=caption_key, sep=sep, root=root,
                            max_bad_fraction=max_bad_fraction)
        return list(ds.paths), str(src)
    raise DataError(f"target images not found: {src} (expected a folder of images, an image-caption table, or 'data')")


@torch.no_grad()
def _encode_texts(model, tokenizer, texts: list[str], device) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), _TEXT_BATCH):
        tok = tokenizer(texts[i:i + _TEXT_BATCH]).to(device)
        out.append(model.encode_text(tok, normalize=True).float())
    return torch.cat(out)


@torch.no_grad()
def _encode_image_paths(model, preprocess_cfg: dict, paths: list[str], device, batch_size: int,
                        workers: int) -> torch.Tensor:
    from ..models import eval_transform

    loader = DataLoader(_TransformedImages(paths, eval_transform(preprocess_cfg)), batch_size=batch_size,
                        num_workers=workers, shuffle=False)
    return torch.cat([model.encode_image(x.to(device), normalize=True).float() for x in loader])


# ----------------------------------------------------------------------------------------------------------------------
# the optimisation
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class PatchResult:
    """Result of :func:`optimize_patch`.

    ``patch``: the optimised clip(δ), float32 ``[3, l, l]`` on CPU (what was saved, before rounding to 8 bits);
    ``initial_patch``: δ at step 0; ``losses`` / ``clip_losses`` / ``triplet_losses``: per step (the total is
    ``clip + triplet_weight · triplet``); ``info``: the sidecar dictionary; ``path`` / ``json_path``: the files written
    (None when ``out`` was None); ``clean_paths``: the images the patch was optimised on (rows that do not mention the
    target); ``excluded_paths``: the rows left out because their caption mentions the target.
    """

    patch: torch.Tensor
    initial_patch: torch.Tensor
    losses: list[float]
    clip_losses: list[float]
    triplet_losses: list[float]
    info: dict
    path: Path | None = None
    json_path: Path | None = None
    clean_paths: list[str] = field(default_factory=list, repr=False)
    excluded_paths: list[str] = field(default_factory=list, repr=False)


def _sidecar_path(out: Path) -> Path:
    return out.with_suffix(".json")


def optimize_patch(model: torch.nn.Module, preprocess_cfg: dict, tokenizer, data: str | os.PathLike, target: str, *,
                   out: str | os.PathLike | None = None, steps: int = DEFAULT_STEPS, batch_size: int = 64,
                   lr: float = 1e-3, aug_prob: float = 0.5, triplet_weight: float = 500.0, margin: float = 1.0,
                   templates: str | os.PathLike | Sequence[str] | None = None,
                   target_images: str | os.PathLike | Sequence[str] | None = None, seed: int = 0,
                   image_size: int | None = None, patch_size: int | None = None, device="cpu",
                   amp: bool | None = None, workers: int = 0, img_key: str = "image", caption_key: str = "caption",
                   sep: str | None = None, root: str | os.PathLike | None = None, max_bad_fraction: float = 0.01,
                   progress: bool = True, model_name: str | None = None, checkpoint: str | None = None) -> PatchResult:
    """Optimise a BadCLIP patch for ``model`` and ``target`` (see the module docstring for the objective).

    Args:
        model: an open_clip CLIP (``encode_image``, ``encode_text``, ``logit_scale``); it is put in eval mode and its
            parameters are frozen during the call (their ``requires_grad`` flags are restored afterwards).
        preprocess_cfg: the model's preprocessing (``size``, ``mean``, ``std``), as returned by
            :func:`parclip.models.create_model`.
        tokenizer: the model's tokenizer (:func:`parclip.models.get_tokenizer`).
        data: image-caption table (CSV/TSV). Rows whose caption mentions ``target`` are excluded from the images the
            patch is optimised on (DataError when no row is left); their captions are the default target captions.
        target: the target class name, e.g. ``"banana"``.
        out: where to save the patch (``.png``); the JSON sidecar goes next to it with the suffix ``.json``.
        steps, batch_size, lr: optimisation length, images per step (capped at the number of clean rows), Adam lr.
        aug_prob: probability that a step uses the AutoAugment view of its whole batch.
        triplet_weight, margin: weight and margin of the triplet term (0 disables it).
        templates: template set name/file or list of ``{}`` strings for the target captions (default: the table's
            natural target captions, or the OpenAI templates when there are none).
        target_images: positives for the triplet term: a folder (recursive), an image-caption table, a list of image
            paths, or ``"data"`` (the images of the table's target rows). Default: the target's text embedding.
        seed: seeds everything (see the module docstring).
        image_size: side S of the squash-resized images the patch is pasted into (default: the model's input size).
        patch_size: patch side l (default ``scaled_size(16, S)``: 16 at 224).
        device, amp: where to run; ``amp`` (default: on for CUDA) runs the model under bfloat16 autocast.
        workers: DataLoader worker processes for image decoding.
        img_key, caption_key, sep, root, max_bad_fraction: how to read the table(s), as in
            :class:`parclip.data.CaptionDataset`.
        progress: show a tqdm bar (also hidden when stderr is not a terminal).
        model_name, checkpoint: recorded in the sidecar.
    """
    t_start = time.perf_counter()
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_number("lr", lr, 0.0)
    check_number("aug_prob", aug_prob, 0.0, 1.0)
    check_number("triplet_weight", triplet_weight, 0.0)
    check_number("margin", margin, 0.0)
    check_int("workers", workers, 0)
    check_int("seed", seed)
    if out is not None and Path(out).suffix.lower() != ".png":
        raise ValueError(f"the patch is saved as a lossless PNG: give --out a name ending in .png, got {str(out)!r}")
    device = torch.device(device)
    amp = (device.type == "cuda") if amp is None else bool(amp)
    model_size = _model_size(preprocess_cfg)
    S = model_size if image_size is None else check_int("image_size", image_size, 2)
    l = default_patch_size(S) if patch_size is None else check_int("patch_size", patch_size, 1, S)
    target = target.strip() if isinstance(target, str) else target
    target_re = target_pattern(target)

    # -- data -----------------------------------------------------------------------------------------------------
    clean_paths, tgt_paths, tgt_caps, n_rows = _split_table(
        data, target_re, img_key=img_key, caption_key=caption_key, sep=sep, root=root,
        max_bad_fraction=max_bad_fraction)
    if not clean_paths:
        raise DataError(f"every usable row of {data} mentions the target {target!r}: the patch is optimised on images "
                        f"whose captions do not mention it, so none is left. Use a table with other images.")
    B = min(batch_size, len(clean_paths))
    if B < batch_size:
        logger.warning("only %d images whose captions do not mention %r: batch size %d -> %d",
                       len(clean_paths), target, batch_size, B)

    if templates is not None:
        tl = get_templates(templates) if isinstance(templates, (str, os.PathLike)) else [str(t) for t in templates]
        if not tl:
            raise ValueError("templates: empty list")
        captions = [fill(t, target) for t in tl]
        caption_source = f"templates: {templates if isinstance(templates, (str, os.PathLike)) else 'custom'}"
    elif tgt_caps:
        captions = tgt_caps
        caption_source = "natural captions of the table rows that mention the target"
    else:
        captions = [fill(t, target) for t in get_templates("openai")]
        caption_source = "templates: openai (no table row mentions the target)"
        logger.info("no row of %s mentions %r: using the OpenAI templates as target captions", data, target)

    g_init = trigger_generator(seed, 0)
    g_order = trigger_generator(seed, 1)
    g_draw = trigger_generator(seed, 2)
    g_aug = trigger_generator(seed, 3)
    coin = random.Random(seed)

    # -- model, frozen ----------------------------------------------------------------------------------------------
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        model.to(device)
        logit_scale = model.logit_scale.detach().float().exp()
        with torch.no_grad():
            cap_emb = _encode_texts(model, tokenizer, captions, device)                    # [C, d]
            if len(captions) > MAX_PROTOTYPE_CAPTIONS:
                idx = torch.randperm(len(captions), generator=trigger_generator(seed, 4))[:MAX_PROTOTYPE_CAPTIONS]
                proto_src = cap_emb[idx.to(device)]
            else:
                proto_src = cap_emb
            prototype = F.normalize(proto_src.mean(0), dim=-1)                             # [d]

        if target_images is not None:
            pos_paths, pos_source = _target_image_paths(
                target_images, tgt_paths, img_key=img_key, caption_key=caption_key, sep=sep, root=root,
                max_bad_fraction=max_bad_fraction)
            if len(pos_paths) > MAX_TARGET_IMAGES:
                keep = torch.randperm(len(pos_paths), generator=trigger_generator(seed, 5))[:MAX_TARGET_IMAGES]
                pos_paths = [pos_paths[int(i)] for i in sorted(keep.tolist())]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                pos_emb = _encode_image_paths(model, preprocess_cfg, pos_paths, device, max(B, 32), workers)
            pos_emb = F.normalize(pos_emb.float(), dim=-1)
            positive_desc = f"target images: {pos_source} ({len(pos_paths)} images)"
        else:
            pos_emb = None
            positive_desc = "text embedding of the target (mean of the target captions' embeddings)"

        # -- optimisation -------------------------------------------------------------------------------------------
        from torchvision.transforms import AutoAugment, AutoAugmentPolicy
        from tqdm.auto import tqdm

        augment = AutoAugment(AutoAugmentPolicy.IMAGENET)
        delta = init_patch(l, g_init).to(device).requires_grad_(True)
        initial = delta.detach().cpu().clone()
        opt = torch.optim.Adam([delta], lr=lr)
        dataset = _SquashedImages(clean_paths, S)
        sampler = RandomSampler(dataset, generator=g_order)
        loader = DataLoader(dataset, batch_size=B, sampler=sampler, drop_last=True, num_workers=workers,
                            persistent_workers=workers > 0)
        losses, clip_losses, trip_losses, augmented = [], [], [], 0
        bar = tqdm(total=steps, desc=f"patch -> {target}", unit="step", disable=None if progress else True,
                   dynamic_ncols=True)
        it = iter(loader)
        try:
            for step in range(steps):
                try:
                    xb = next(it)
                except StopIteration:
                    it = iter(loader)
                    xb = next(it)
                use_aug = coin.random() < aug_prob
                aug_seed = int(torch.randint(0, 2**62, (1,), generator=g_aug))  # drawn every step: stable streams
                if use_aug:
                    augmented += 1
                    with torch.random.fork_rng(devices=[]):           # the caller's RNG state is restored
                        torch.random.default_generator.manual_seed(aug_seed)  # AutoAugment draws from it
                        xb = torch.stack([augment(img) for img in xb])
                x = xb.to(device, non_blocking=True).float().div(255)
                cap_idx = torch.randint(0, len(captions), (B,), generator=g_draw)
                pos_idx = torch.randint(0, len(pos_emb), (B,), generator=g_draw) if pos_emb is not None else None

                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    with torch.no_grad():
                        neg = model.encode_image(_to_model_input(x, model_size, preprocess_cfg), normalize=True)
                    anchor = model.encode_image(
                        _to_model_input(paste_patch(x, delta.clamp(0, 1)), model_size, preprocess_cfg),
                        normalize=True)
                anchor = F.normalize(anchor.float(), dim=-1)
                neg = F.normalize(neg.float(), dim=-1)
                txt = cap_emb[cap_idx.to(device)]
                l_clip = clip_loss(anchor, txt, logit_scale)
                pos = pos_emb[pos_idx.to(device)] if pos_emb is not None else prototype[None].expand_as(anchor)
                l_trip = F.relu((anchor - pos).norm(dim=-1) - (anchor - neg).norm(dim=-1) + margin).mean()
                loss = l_clip + triplet_weight * l_trip
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    delta.clamp_(0, 1)
                losses.append(loss.item())
                clip_losses.append(l_clip.item())
                trip_losses.append(l_trip.item())
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", clip=f"{clip_losses[-1]:.3f}",
                                    triplet=f"{trip_losses[-1]:.4f}")
        finally:
            bar.close()
            del it
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)

    patch = delta.detach().clamp(0, 1).cpu()
    tail = losses[-min(len(losses), 50):]
    every = max(1, steps // 200)
    info = {
        "format": PATCH_FORMAT,
        "model": model_name,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "target": target,
        "steps": steps,
        "seed": seed,
        "batch_size": B,
        "lr": lr,
        "aug_prob": aug_prob,
        "augmented_steps": augmented,
        "triplet_weight": triplet_weight,
        "margin": margin,
        "image_size": S,
        "model_image_size": model_size,
        "patch_size": l,
        "location": f"centre, rows and columns [{center_offset(S, l)}, {center_offset(S, l) + l})",
        "data": str(data),
        "n_rows": n_rows,
        "n_clean_rows": len(clean_paths),
        "n_excluded_target_rows": len(tgt_paths),
        "target_captions": caption_source,
        "n_target_captions": len(captions),
        "positives": positive_desc,
        "final_loss": losses[-1],
        "final_loss_mean": float(np.mean(tail)),
        "final_loss_window": len(tail),
        "final_clip_loss": clip_losses[-1],
        "final_triplet_loss": trip_losses[-1],
        "loss_every": every,
        "loss_history": [round(v, 6) for v in losses[::every]],
        "device": str(device),
        "amp": amp,
        "seconds": round(time.perf_counter() - t_start, 2),
        "png": "lossless RGB PNG of round(255 * patch), no channel swap",
        "use": "parclip.attacks.triggers.get_trigger('badclip', image_size=%d, patch=PATH, patch_size=%d)" % (S, l),
    }
    try:
        from .. import __version__
        info["parclip_version"] = __version__
    except ImportError:  # pragma: no cover
        pass
    result = PatchResult(patch=patch, initial_patch=initial, losses=losses, clip_losses=clip_losses,
                         triplet_losses=trip_losses, info=info, clean_paths=clean_paths, excluded_paths=tgt_paths)
    if out is not None:
        out = Path(out)
        save_patch_png(patch, out)
        info["patch_file"] = out.name
        info["patch_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
        result.path = out
        result.json_path = _sidecar_path(out)
        write_json(result.json_path, info)
    return result


@torch.no_grad()
def target_similarity(model, preprocess_cfg: dict, patch: torch.Tensor, images: torch.Tensor,
                      target_embedding: torch.Tensor) -> float:
    """Mean cosine similarity between the embeddings of ``images`` (uint8 ``[B, 3, S, S]``, squash-resized) with
    ``patch`` pasted at the centre and ``target_embedding`` (``[d]``, e.g. the target's text embedding)."""
    model_size = _model_size(preprocess_cfg)
    dev = next(model.parameters()).device
    x = images.to(dev).float().div(255)
    x = paste_patch(x, patch.to(dev).float().clamp(0, 1))
    emb = model.encode_image(_to_model_input(x, model_size, preprocess_cfg), normalize=True).float()
    return float((emb @ F.normalize(target_embedding.to(dev).float(), dim=-1)).mean())
