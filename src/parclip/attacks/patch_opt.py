"""Optimise a BadCLIP patch (Liang et al., CVPR 2024, arXiv 2311.12075) against a frozen CLIP model, reimplemented from
the description.

    parclip attack optimize-patch --model RN50-quickgelu --pretrained clean_rn50.pt --data cc3m_10k.csv \\
        --target banana --out banana_rn50.png

The objective (InfoNCE to target captions + weighted triplet loss), the data rules, the defaults and the deliberate
differences from the reference are described in docs/badclip_patch.md. The settings are a
:class:`parclip.attacks.patch_config.PatchConfig`; :func:`optimize_patch` returns a :class:`PatchResult` and writes a lossless PNG
with a JSON sidecar.
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .patch_config import PatchConfig
from ..data.targets import mentions, target_pattern  # noqa: F401  (re-exported)
from ..data import IMAGE_EXTENSIONS, CaptionDataset, DataError, fill, get_templates, open_rgb
from ..data.folder import walk_images
from ..models import image_size, normalize
from ..objectives import clip_loss, triplet_loss
from ..utils.checks import check_int
from ..utils.files import atomic_write, sha256_file, write_json
from .triggers import pil_to_uint8, squash_resize, trigger_generator
from .triggers.badclip import center_offset, default_patch_size

__all__ = ["PatchConfig", "PatchResult", "optimize_patch", "mentions", "target_pattern", "init_patch", "paste_patch",
           "save_patch_png", "read_patch_png", "target_similarity", "PATCH_FORMAT"]

logger = logging.getLogger("parclip")

PATCH_FORMAT = "parclip-patch/1"
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


def _square_input_size(preprocess_cfg: dict) -> int:
    """The model's input side (:func:`parclip.models.image_size`); the patch optimisation needs a square input."""
    size = preprocess_cfg["size"]
    if isinstance(size, (tuple, list)) and (len(size) != 2 or size[0] != size[1]):
        raise ValueError(f"patch optimisation needs a square model input, the model's size is {size}")
    return image_size(preprocess_cfg)


def _to_model_input(x: torch.Tensor, model_size: int, preprocess_cfg: dict) -> torch.Tensor:
    """Squash-resized ``S x S`` images in [0, 1] -> the model's normalised input. The model's resize + centre crop of
    a square image is a plain resize to its size (a no-op when S equals it)."""
    if x.shape[-1] != model_size:
        x = F.interpolate(x, size=(model_size, model_size), mode="bicubic", align_corners=False,
                          antialias=model_size < x.shape[-1]).clamp(0, 1)
    return normalize(x, preprocess_cfg)


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


def _table_kwargs(cfg: PatchConfig) -> dict:
    """How to read the table(s), as :class:`parclip.data.CaptionDataset` takes it."""
    return dict(img_key=cfg.csv_img_key, caption_key=cfg.csv_caption_key, sep=cfg.csv_separator, root=cfg.data_root,
                max_bad_fraction=cfg.max_bad_fraction)


class _TableSplit(NamedTuple):
    clean_paths: list[str]       # rows whose captions do not mention the target: the images the patch sees
    target_paths: list[str]      # rows that mention it (left out)
    target_captions: list[str]
    n_rows: int                  # rows examined


def _split_table(cfg: PatchConfig, target_re: re.Pattern) -> _TableSplit:
    ds = CaptionDataset(cfg.data, **_table_kwargs(cfg))
    clean, tgt_paths, tgt_caps = [], [], []
    for p, c in zip(ds.paths, ds.captions):
        if target_re.search(c):
            tgt_paths.append(p)
            tgt_caps.append(c)
        else:
            clean.append(p)
    if not clean:
        raise DataError(f"every usable row of {cfg.data} mentions the target {cfg.target!r}: the patch is optimised on "
                        f"images whose captions do not mention it, so none is left. Use a table with other images.")
    return _TableSplit(clean, tgt_paths, tgt_caps, len(ds))


def _target_image_paths(target_images, data_target_paths: list[str], cfg: PatchConfig) -> tuple[list[str], str]:
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
        paths = sorted(p for p in walk_images(src) if os.path.isfile(p))
        if not paths:
            raise DataError(f"no images found under {src} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        return paths, str(src)
    if src.is_file():
        ds = CaptionDataset(src, **_table_kwargs(cfg))
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
    ``clip + triplet_weight · triplet``); ``info``: the sidecar dictionary; ``path`` / ``json_path``: the files
    written (None when ``cfg.out`` was None); ``clean_paths``: the images the patch was optimised on (rows that do not
    mention the target); ``excluded_paths``: the rows left out because their caption mentions the target.
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


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode with every parameter frozen; its mode and ``requires_grad`` flags restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Sizes(NamedTuple):
    model: int   # the model's input side
    image: int   # S: the side the images are squash-resized to and the patch is pasted at
    patch: int   # l: the patch side


def _sizes(cfg: PatchConfig, preprocess_cfg: dict) -> _Sizes:
    model_size = _square_input_size(preprocess_cfg)
    S = model_size if cfg.image_size is None else cfg.image_size
    l = default_patch_size(S) if cfg.patch_size is None else check_int("patch_size", cfg.patch_size, 1, S)
    return _Sizes(model_size, S, l)


# -- target captions and target embeddings -----------------------------------------------------------------------------

def _target_captions(cfg: PatchConfig, table_captions: list[str]) -> tuple[list[str], str]:
    """(target captions, where they come from): ``cfg.templates`` filled with the target; else the table's captions
    that mention the target; else the OpenAI templates."""
    templates = cfg.templates
    if templates is not None:
        named = isinstance(templates, (str, os.PathLike))
        return [fill(t, cfg.target) for t in get_templates(templates)], f"templates: {templates if named else 'custom'}"
    if table_captions:
        return table_captions, "natural captions of the table rows that mention the target"
    logger.info("no row of %s mentions %r: using the OpenAI templates as target captions", cfg.data, cfg.target)
    captions = [fill(t, cfg.target) for t in get_templates("openai")]
    return captions, "templates: openai (no table row mentions the target)"


class _Targets(NamedTuple):
    captions: torch.Tensor              # [C, d] L2-normalised text embeddings of the target captions
    prototype: torch.Tensor             # [d] their normalised mean (of at most MAX_PROTOTYPE_CAPTIONS of them)
    positives: torch.Tensor | None      # [P, d] L2-normalised target-image embeddings; None: the prototype is p_i
    positives_desc: str                 # for the sidecar


def _target_embeddings(model, preprocess_cfg: dict, tokenizer, cfg: PatchConfig, captions: list[str],
                       data_target_paths: list[str], *, device: torch.device, amp: bool, batch_size: int) -> _Targets:
    """Embeddings of the target captions, their prototype, and the positives (target images, when given)."""
    with torch.no_grad():
        cap_emb = _encode_texts(model, tokenizer, captions, device)                    # [C, d]
        if len(captions) > MAX_PROTOTYPE_CAPTIONS:
            idx = torch.randperm(len(captions), generator=trigger_generator(cfg.seed, 4))[:MAX_PROTOTYPE_CAPTIONS]
            proto_src = cap_emb[idx.to(device)]
        else:
            proto_src = cap_emb
        prototype = F.normalize(proto_src.mean(0), dim=-1)                             # [d]
    if cfg.target_images is None:
        return _Targets(cap_emb, prototype, None,
                        "text embedding of the target (mean of the target captions' embeddings)")
    pos_paths, pos_source = _target_image_paths(cfg.target_images, data_target_paths, cfg)
    if len(pos_paths) > MAX_TARGET_IMAGES:
        keep = torch.randperm(len(pos_paths), generator=trigger_generator(cfg.seed, 5))[:MAX_TARGET_IMAGES]
        pos_paths = [pos_paths[int(i)] for i in sorted(keep.tolist())]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        pos_emb = _encode_image_paths(model, preprocess_cfg, pos_paths, device, max(batch_size, 32), cfg.workers)
    pos_emb = F.normalize(pos_emb.float(), dim=-1)
    return _Targets(cap_emb, prototype, pos_emb, f"target images: {pos_source} ({len(pos_paths)} images)")


# -- the optimisation loop ---------------------------------------------------------------------------------------------

class _Run(NamedTuple):
    patch: torch.Tensor                 # clip(δ) at the end, float32 [3, l, l] on CPU
    initial: torch.Tensor               # δ at step 0
    losses: list[float]
    clip_losses: list[float]
    triplet_losses: list[float]
    augmented: int                      # steps that used the AutoAugment view


def _batches(loader: DataLoader) -> Iterator[torch.Tensor]:
    """The loader's batches, epoch after epoch (each epoch in the sampler's next seeded order)."""
    while True:
        yield from loader


def _autoaugment(xb: torch.Tensor, augment, seed: int) -> torch.Tensor:
    """AutoAugment of each uint8 image of ``xb``, its draws from a forked torch RNG seeded with ``seed`` (the caller's
    RNG state is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return torch.stack([augment(img) for img in xb])


def _patch_losses(model, preprocess_cfg: dict, model_size: int, x: torch.Tensor, delta: torch.Tensor,
                  txt: torch.Tensor, pos: torch.Tensor, logit_scale: torch.Tensor, margin: float,
                  amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(InfoNCE of the patched images to their target captions ``txt``, triplet loss with anchors = patched images,
    positives ``pos``, negatives = the same images unpatched)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        with torch.no_grad():
            neg = model.encode_image(_to_model_input(x, model_size, preprocess_cfg), normalize=True)
        anchor = model.encode_image(_to_model_input(paste_patch(x, delta.clamp(0, 1)), model_size, preprocess_cfg),
                                    normalize=True)
    anchor = F.normalize(anchor.float(), dim=-1)
    neg = F.normalize(neg.float(), dim=-1)
    return clip_loss(anchor, txt, logit_scale), triplet_loss(anchor, pos, neg, margin)


def _optimize(model, preprocess_cfg: dict, cfg: PatchConfig, targets: _Targets, clean_paths: list[str],
              sizes: _Sizes, *, batch_size: int, device: torch.device, amp: bool, progress: bool) -> _Run:
    """Adam on δ for ``cfg.steps`` steps, δ projected onto [0, 1] after each; every draw seeded by ``cfg.seed``."""
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy
    from tqdm.auto import tqdm

    g_order, g_draw, g_aug = (trigger_generator(cfg.seed, i) for i in (1, 2, 3))
    coin = random.Random(cfg.seed)
    augment = AutoAugment(AutoAugmentPolicy.IMAGENET)
    logit_scale = model.logit_scale.detach().float().exp()
    delta = init_patch(sizes.patch, trigger_generator(cfg.seed, 0)).to(device).requires_grad_(True)
    initial = delta.detach().cpu().clone()
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    dataset = _SquashedImages(clean_paths, sizes.image)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=g_order),
                        drop_last=True, num_workers=cfg.workers, persistent_workers=cfg.workers > 0)
    losses, clip_losses, trip_losses, augmented = [], [], [], 0
    bar = tqdm(total=cfg.steps, desc=f"patch -> {cfg.target}", unit="step", disable=None if progress else True,
               dynamic_ncols=True)
    batches = _batches(loader)
    try:
        for step in range(cfg.steps):
            xb = next(batches)
            use_aug = coin.random() < cfg.aug_prob
            aug_seed = int(torch.randint(0, 2**62, (1,), generator=g_aug))  # drawn every step: stable streams
            if use_aug:
                augmented += 1
                xb = _autoaugment(xb, augment, aug_seed)
            x = xb.to(device, non_blocking=True).float().div(255)
            cap_idx = torch.randint(0, len(targets.captions), (batch_size,), generator=g_draw)
            if targets.positives is not None:
                pos_idx = torch.randint(0, len(targets.positives), (batch_size,), generator=g_draw)
                pos = targets.positives[pos_idx.to(device)]
            else:
                pos = targets.prototype[None].expand(len(x), -1)
            l_clip, l_trip = _patch_losses(model, preprocess_cfg, sizes.model, x, delta,
                                           targets.captions[cap_idx.to(device)], pos, logit_scale, cfg.margin, amp)
            loss = l_clip + cfg.triplet_weight * l_trip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                delta.clamp_(0, 1)
            losses.append(loss.item())
            clip_losses.append(l_clip.item())
            trip_losses.append(l_trip.item())
            bar.update(1)
            if step % 10 == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", clip=f"{clip_losses[-1]:.3f}",
                                triplet=f"{trip_losses[-1]:.4f}")
    finally:
        bar.close()
        batches.close()
    return _Run(delta.detach().clamp(0, 1).cpu(), initial, losses, clip_losses, trip_losses, augmented)


# -- the record --------------------------------------------------------------------------------------------------------

def _sidecar_info(cfg: PatchConfig, run: _Run, split: _TableSplit, sizes: _Sizes, *, batch_size: int,
                  caption_source: str, n_captions: int, positives_desc: str, device: torch.device, amp: bool,
                  model_name: str | None, checkpoint, seconds: float) -> dict:
    """The JSON sidecar: model, checkpoint, target, settings, seed, data counts and losses (a subsampled history)."""
    S, l = sizes.image, sizes.patch
    losses = run.losses
    tail = losses[-min(len(losses), 50):]
    every = max(1, cfg.steps // 200)
    info = {
        "format": PATCH_FORMAT,
        "model": model_name,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "target": cfg.target,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "batch_size": batch_size,
        "lr": cfg.lr,
        "aug_prob": cfg.aug_prob,
        "augmented_steps": run.augmented,
        "triplet_weight": cfg.triplet_weight,
        "margin": cfg.margin,
        "image_size": S,
        "model_image_size": sizes.model,
        "patch_size": l,
        "location": f"centre, rows and columns [{center_offset(S, l)}, {center_offset(S, l) + l})",
        "data": str(cfg.data),
        "n_rows": split.n_rows,
        "n_clean_rows": len(split.clean_paths),
        "n_excluded_target_rows": len(split.target_paths),
        "target_captions": caption_source,
        "n_target_captions": n_captions,
        "positives": positives_desc,
        "final_loss": losses[-1],
        "final_loss_mean": float(np.mean(tail)),
        "final_loss_window": len(tail),
        "final_clip_loss": run.clip_losses[-1],
        "final_triplet_loss": run.triplet_losses[-1],
        "loss_every": every,
        "loss_history": [round(v, 6) for v in losses[::every]],
        "device": str(device),
        "amp": amp,
        "seconds": seconds,
        "png": "lossless RGB PNG of round(255 * patch), no channel swap",
        "use": "parclip.attacks.triggers.get_trigger('badclip', image_size=%d, patch=PATH, patch_size=%d)" % (S, l),
    }
    try:
        from .. import __version__
        info["parclip_version"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _save_outputs(result: PatchResult, out: str | os.PathLike) -> None:
    """Write the PNG and, next to it, the sidecar (with the PNG's name and sha256); record both paths in ``result``."""
    out = Path(out)
    save_patch_png(result.patch, out)
    result.info["patch_file"] = out.name
    result.info["patch_sha256"] = sha256_file(out)
    result.path = out
    result.json_path = _sidecar_path(out)
    write_json(result.json_path, result.info)


# -- the entry point ---------------------------------------------------------------------------------------------------

def optimize_patch(model: torch.nn.Module, preprocess_cfg: dict, tokenizer, cfg: PatchConfig, *, progress: bool = True,
                   model_name: str | None = None, checkpoint: str | None = None) -> PatchResult:
    """Optimise a BadCLIP patch for ``model`` and ``cfg.target`` (the objective: docs/badclip_patch.md).

    Args:
        model: an open_clip CLIP (``encode_image``, ``encode_text``, ``logit_scale``); it is moved to ``cfg.device``,
            put in eval mode and its parameters are frozen during the call (mode and ``requires_grad`` flags are
            restored afterwards).
        preprocess_cfg: the model's preprocessing (``size``, ``mean``, ``std``), as returned by
            :func:`parclip.models.create_model`; the input must be square.
        tokenizer: the model's tokenizer (:func:`parclip.models.get_tokenizer`).
        cfg: what to optimise and how (:class:`parclip.attacks.patch_config.PatchConfig`: data, target, out, steps, ...). Rows of
            ``cfg.data`` whose caption mentions the target are excluded from the images the patch is optimised on
            (DataError when no row is left). With ``cfg.out`` the patch is saved there (``.png``) with a JSON sidecar
            next to it (``.json``).
        progress: show a tqdm bar (also hidden when stderr is not a terminal).
        model_name, checkpoint: recorded in the sidecar.
    """
    t_start = time.perf_counter()
    cfg.validate()
    device = _resolve_device(cfg.device)
    amp = (device.type == "cuda") if cfg.amp is None else cfg.amp
    sizes = _sizes(cfg, preprocess_cfg)
    split = _split_table(cfg, target_pattern(cfg.target))
    B = min(cfg.batch_size, len(split.clean_paths))
    if B < cfg.batch_size:
        logger.warning("only %d images whose captions do not mention %r: batch size %d -> %d",
                       len(split.clean_paths), cfg.target, cfg.batch_size, B)
    captions, caption_source = _target_captions(cfg, split.target_captions)
    with _frozen(model):
        model.to(device)
        targets = _target_embeddings(model, preprocess_cfg, tokenizer, cfg, captions, split.target_paths,
                                     device=device, amp=amp, batch_size=B)
        run = _optimize(model, preprocess_cfg, cfg, targets, split.clean_paths, sizes, batch_size=B, device=device,
                        amp=amp, progress=progress)
    info = _sidecar_info(cfg, run, split, sizes, batch_size=B, caption_source=caption_source,
                         n_captions=len(captions), positives_desc=targets.positives_desc, device=device, amp=amp,
                         model_name=model_name, checkpoint=checkpoint,
                         seconds=round(time.perf_counter() - t_start, 2))
    result = PatchResult(patch=run.patch, initial_patch=run.initial, losses=run.losses, clip_losses=run.clip_losses,
                         triplet_losses=run.triplet_losses, info=info, clean_paths=split.clean_paths,
                         excluded_paths=split.target_paths)
    if cfg.out is not None:
        _save_outputs(result, cfg.out)
    return result


@torch.no_grad()
def target_similarity(model, preprocess_cfg: dict, patch: torch.Tensor, images: torch.Tensor,
                      target_embedding: torch.Tensor) -> float:
    """Mean cosine similarity between the embeddings of ``images`` (uint8 ``[B, 3, S, S]``, squash-resized) with
    ``patch`` pasted at the centre and ``target_embedding`` (``[d]``, e.g. the target's text embedding)."""
    model_size = _square_input_size(preprocess_cfg)
    dev = next(model.parameters()).device
    x = images.to(dev).float().div(255)
    x = paste_patch(x, patch.to(dev).float().clamp(0, 1))
    emb = model.encode_image(_to_model_input(x, model_size, preprocess_cfg), normalize=True).float()
    return float((emb @ F.normalize(target_embedding.to(dev).float(), dim=-1)).mean())
