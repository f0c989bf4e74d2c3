"""`parclip scan`: the three parts on one model and one folder of clean images (docs/scan.md).

:func:`scan` computes everything and returns the result (a JSON-able dict) and the inverted triggers;
:mod:`parclip.scan.report` writes them. Order: the clean pass (the model's own class of every image), the known-trigger
sweep (:mod:`~parclip.scan.sweep`), the encoder-level inversion, the classifier-level inversion per candidate class
(:mod:`~parclip.scan.invert`), the verdict (:mod:`~parclip.scan.verdict`).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from parclip import __version__
from parclip.attacks.triggers import pil_to_uint8, squash_resize, trigger_generator
from parclip.data import DataError, get_templates
from parclip.data.folder import ImageFiles, read_classnames
from parclip.data.shards import is_shard_spec
from parclip.data.sources import open_labelled
from parclip.evaluation.encode import Tolerant, TriggeredImages, encode_images, usable
from parclip.evaluation.zero_shot import zero_shot_classifier
from parclip.models import denormalize, eval_transform, image_size, normalize

from .controls import DonorBlend, DonorPatch, matched_alpha, mean_abs_change
from .invert import anomaly_index, class_objective, cluster_tightness, collapse_objective, invert, kmeans
from .sweep import flip_rates, lift, variants
from .verdict import decide

__all__ = ["ScanConfig", "ScanError", "MIN_IMAGES", "scan", "Artefacts", "open_images", "check_reference",
           "compare_reference"]

MIN_IMAGES = 64


@dataclasses.dataclass
class Artefacts:
    """What a scan found besides numbers: the inverted triggers by name and a few clean images [n, 3, S, S] in
    [0, 1] to show them on."""
    inversions: dict
    images: torch.Tensor


class ScanError(RuntimeError):
    """The scan cannot go on (non-finite embeddings, a reference scan of other settings); the message says why."""


@dataclasses.dataclass
class ScanConfig:
    """What a scan does; every field is in the result's ``settings``. Sizes are image counts, steps are Adam steps."""
    n_images: int = 1000         # images of the sweep (a seeded draw from the folder)
    n_invert: int = 512          # of those, the pool the inversions draw batches from
    encoder_steps: int = 200
    class_steps: int = 100
    batch_size: int = 64         # inversion batch
    max_classes: int = 10        # classes inverted at the classifier level (the likeliest ones when there are more)
    success_rate: float = 0.9    # classifier level: share of images that must reach the class
    collapse: float = 0.8        # encoder level: how far from the clean spread toward one class's tightness
    clusters: int = 10           # k of the k-means whose clusters define "one class's tightness"
    triggers: list | None = None  # sweep triggers (default: the library); trigger_params as --trigger-param
    trigger_params: dict = dataclasses.field(default_factory=dict)
    parts: tuple = ("sweep", "encoder", "classifier")
    seed: int = 0


def open_images(data, classnames=None):
    """(the images, the zero-shot class names) of a scan's data: clip_benchmark shards or a folder of class
    sub-folders (its classes, or `classnames` — a file or a list — in its folder order), or a folder of images
    without sub-folders (unlabelled: the classes are `classnames`, None when not given)."""
    root = Path(str(data))
    names = read_classnames(classnames) if isinstance(classnames, (str, Path)) else classnames
    flat = root.is_dir() and not is_shard_spec(data) and not any(
        e.is_dir() and not e.name.startswith(".") for e in root.iterdir())
    if flat:
        return ImageFiles(root), (list(names) if names else None)
    source = open_labelled(data, classnames=names)
    return source, list(source.classnames)


def _finite(z: torch.Tensor, step: str) -> torch.Tensor:
    if not torch.isfinite(z).all():
        raise ScanError(f"non-finite embeddings at step '{step}' ({int((~torch.isfinite(z)).any(1).sum())} images): "
                        f"the model's weights or its preprocessing produce NaN/inf; check the checkpoint")
    return z


class _Subset:
    def __init__(self, source, idx: list[int]):
        self.source, self.idx, self.targets = source, idx, None

    def __len__(self):
        return len(self.idx)

    def load_image(self, i):
        return self.source.load_image(self.idx[i])

    def describe(self, i):
        return self.source.describe(self.idx[i])


def _draw(source, cfg: ScanConfig) -> _Subset:
    n = len(source)
    if n < MIN_IMAGES:
        raise DataError(f"{getattr(source, 'root', source)} has {n} images; the scan needs at least {MIN_IMAGES} "
                        f"(to tell a backdoor from chance; {cfg.n_images} by default)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:cfg.n_images]
    return _Subset(source, order.tolist())


def _sweep(ctx, cfg: ScanConfig) -> list[dict]:
    """Every variant and its matched control: the flips, the lift, the suspected class (module sweep)."""
    S, sub, ok, ref = ctx["S"], ctx["subset"], ctx["ok"], ctx["clean_pred"]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    donor_idx = torch.randint(len(sub), (min(64, len(sub)),), generator=gen).tolist()
    donors = torch.stack([pil_to_uint8(squash_resize(sub.load_image(i), S)) for i in donor_idx])
    sample = torch.stack([pil_to_uint8(squash_resize(sub.load_image(i), S)) for i in range(len(donors))])
    rows = []
    for label, trig in variants(S, cfg.trigger_params, cfg.triggers):
        if trig.kind == "patch":
            control = DonorPatch(donors, S, trig.patch_size)
        else:
            changed = torch.stack([trig.apply(u8, trigger_generator(cfg.seed, i)) for i, u8 in enumerate(sample)])
            control = DonorBlend(donors, S, matched_alpha(mean_abs_change(sample, changed), sample, donors))
        flips = []
        for t in (trig, control):
            z, _ = encode_images(ctx["model"], Tolerant(TriggeredImages(sub, t, ctx["transform"], seed=cfg.seed), S),
                                 desc=label, **ctx["encode"])
            pred = (_finite(z, f"sweep {label}")[ok] @ ctx["W"]).argmax(1)
            flips.append(flip_rates(pred, ref, len(ctx["classnames"])))
        c, value = lift(*flips)
        rows.append({"variant": label, "trigger": trig.name, "params": trig.params(), "control": control.params(),
                     "target": ctx["classnames"][c], "lift": value, "flip": float(flips[0][c]),
                     "control_flip": float(flips[1][c]),
                     "lift_by_class": [round(float(v), 2) for v in torch.nan_to_num(flips[0] - flips[1])]})
    return rows


def _candidates(ctx, cfg: ScanConfig, encoder_hits: torch.Tensor | None, sweep: list[dict]) -> list[int]:
    """Classes for the classifier-level inversion: all when at most `max_classes`; else, in this order, the class the
    encoder-level trigger sends most images to, the sweep's targets by lift, then the rest by how many images the
    encoder-level trigger sends to them."""
    C, names = len(ctx["classnames"]), ctx["classnames"]
    if C <= cfg.max_classes:
        return list(range(C))
    hits = torch.zeros(C) if encoder_hits is None else encoder_hits.float()
    order = [] if encoder_hits is None else [int(hits.argmax())]
    order += [names.index(r["target"]) for r in sorted(sweep, key=lambda r: -r["lift"]) if r["lift"] > 0]
    order += hits.argsort(descending=True).tolist()
    return list(dict.fromkeys(order))[:cfg.max_classes]


def _inversions(ctx, cfg: ScanConfig, sweep: list[dict], progress: bool) -> tuple[dict | None, dict | None, dict]:
    """(encoder summary, classifier summary, {name: Inversion}) for the parts asked for."""
    model, pp, X = ctx["model"], ctx["preprocess"], ctx["X"]

    def embed(x):
        return model.encode_image(normalize(x, pp), normalize=True)

    kw = dict(batch_size=cfg.batch_size, progress=progress)
    found, encoder, classes, hits = {}, None, None, None
    if "encoder" in cfg.parts:
        z = ctx["Z"][:len(X)]
        s0 = z.mean(0).pow(2).sum().item()
        target = s0 + cfg.collapse * (cluster_tightness(z, kmeans(z, cfg.clusters, seed=cfg.seed)) - s0)
        inv = invert(embed, X, collapse_objective(target), steps=cfg.encoder_steps, seed=cfg.seed,
                     desc="encoder inversion", **kw)
        found["encoder"] = inv
        encoder = {**inv.summary(), "target_similarity": target, "clean_similarity": s0}
        if ctx["W"] is not None:
            with torch.no_grad():
                pred = (_finite(embed(inv.stamp(X)), "encoder inversion") @ ctx["W"]).argmax(1)
            hits = torch.bincount(pred, minlength=len(ctx["classnames"]))
            encoder.update(top_class=ctx["classnames"][int(hits.argmax())],
                           top_class_share=float(hits.max() / len(X)))
        else:
            encoder["top_class"] = None
    if "classifier" in cfg.parts and ctx["W"] is not None and len(ctx["classnames"]) >= 2:
        scale = float(model.logit_scale.exp())
        rows = []
        for c in _candidates(ctx, cfg, hits, sweep):
            name = ctx["classnames"][c]
            inv = invert(embed, X, class_objective(ctx["W"], scale, c, cfg.success_rate), steps=cfg.class_steps,
                         seed=cfg.seed + 1 + c, desc=f"class {name}", **kw)
            found[f"class {name}"] = inv
            rows.append({"class": name, **inv.summary()})
        median = torch.tensor([r["area"] for r in rows]).median().item()
        for r, a in zip(rows, anomaly_index([r["area"] for r in rows])):
            r.update(anomaly_index=a, relative_area=r["area"] / median if median > 0 else float("nan"))
        classes = {"per_class": rows, "median_area": median}
    return encoder, classes, found


def _prepare(model, preprocess_cfg, tokenizer, source, classnames, templates, cfg, device, encode_kw) -> dict:
    """The clean pass: the subset, its usable images, embeddings, the model's classes and the inversion pool."""
    S, transform = image_size(preprocess_cfg), eval_transform(preprocess_cfg)
    sub = _draw(source, cfg)
    z, errors = encode_images(model, Tolerant(TriggeredImages(sub, None, transform), S), desc="clean", **encode_kw)
    ok, _ = usable(errors, [sub.describe(i) for i in range(len(sub))], str(getattr(source, "root", "")), 0.05)
    if int(ok.sum()) < MIN_IMAGES:
        raise DataError(f"only {int(ok.sum())} readable images; the scan needs at least {MIN_IMAGES}")
    z = _finite(z, "clean images")[ok]
    W = (zero_shot_classifier(model, tokenizer, classnames, get_templates(templates), device).float().cpu()
         if classnames else None)
    good = ok.nonzero().flatten()[:cfg.n_invert].tolist()
    X = denormalize(torch.stack([transform(sub.load_image(i)) for i in good]), preprocess_cfg).clamp(0, 1).to(device)
    return {"S": S, "transform": transform, "subset": sub, "ok": ok, "Z": z, "W": W, "model": model,
            "preprocess": preprocess_cfg, "classnames": list(classnames or []), "X": X, "encode": encode_kw,
            "clean_pred": (z @ W).argmax(1) if W is not None else None}


def scan(model, preprocess_cfg: dict, tokenizer, source, *, classnames: list[str] | None, templates="openai",
         config: ScanConfig | None = None, reference: dict | None = None, device="cpu", batch_size: int = 256,
         workers: int = 2, progress: bool = True, thresholds: dict | None = None) -> tuple[dict, Artefacts]:
    """Scan `model` with the clean images of `source` (anything with ``len`` and ``load_image(i)``: a labelled
    folder or shards, :class:`parclip.data.folder.ImageFiles`). `classnames`: the zero-shot classes (None or one:
    the sweep and the classifier-level inversion are skipped and say so). `reference`: the result of a scan of a
    clean model with the same settings and images, to judge mask sizes against. Returns (result, :class:`Artefacts`)."""
    cfg = config or ScanConfig()
    device = torch.device(device)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    started, times = time.time(), {}
    encode_kw = dict(batch_size=batch_size, workers=workers, device=device, progress=progress)
    if reference is not None:
        check_reference(reference, cfg, classnames, image_size(preprocess_cfg))
    ctx = _prepare(model, preprocess_cfg, tokenizer, source, classnames, templates, cfg, device, encode_kw)
    skipped = [] if len(ctx["classnames"]) >= 2 else ["sweep", "classifier"]
    sweep = []
    if "sweep" in cfg.parts and not skipped:
        t = time.time()
        sweep = _sweep(ctx, cfg)
        times["sweep"] = time.time() - t
    t = time.time()
    encoder, classes, found = _inversions(ctx, cfg, sweep, progress)
    times["inversion"] = time.time() - t
    if reference is not None:
        compare_reference(reference, sweep, encoder, classes, ctx["classnames"])
    result = {"verdict": decide(sweep, encoder, classes, thresholds), "sweep": sweep, "encoder": encoder,
              "classifier": classes, "skipped": {p: "fewer than two classes" for p in skipped},
              "n_images": int(ctx["ok"].sum()), "n_invert": len(ctx["X"]), "classnames": ctx["classnames"],
              "image_size": ctx["S"], "settings": dataclasses.asdict(cfg), "reference": bool(reference),
              "seconds": {**times, "total": time.time() - started}, "parclip_version": __version__}
    return result, Artefacts(found, ctx["X"][:8].cpu())


def compare_reference(reference: dict, sweep: list[dict], encoder: dict | None, classes: dict | None,
                      classnames: list[str]) -> None:
    """Judge this scan against a clean model's (same settings and images), in place:

    * each sweep row gets ``reference_lift`` and ``excess = max_c (lift(c) - lift_ref(c))`` toward ``excess_target``
      (a trigger that moves the clean model too is a property of the data, not a backdoor);
    * the encoder summary gets ``reference_ratio`` = its mask area ÷ the reference's;
    * each classifier row gets ``reference_ratio`` = its relative area ÷ the reference's for that class.
    """
    ref_rows = {r["variant"]: r for r in reference.get("sweep") or []}
    for r in sweep:
        if r["variant"] in ref_rows:
            gap = torch.tensor(r["lift_by_class"]) - torch.tensor(ref_rows[r["variant"]]["lift_by_class"])
            c = int(gap.argmax())
            r.update(excess=float(gap[c]), excess_target=classnames[c],
                     reference_lift=ref_rows[r["variant"]]["lift_by_class"][c])
    if encoder and reference.get("encoder"):
        encoder["reference_ratio"] = encoder["area"] / max(reference["encoder"]["area"], 1e-12)
    if classes and reference.get("classifier"):
        ref = {r["class"]: r["relative_area"] for r in reference["classifier"]["per_class"]}
        for r in classes["per_class"]:
            r["reference_ratio"] = r["relative_area"] / ref[r["class"]] if r["class"] in ref else float("nan")


COMPARED = ("n_images", "n_invert", "encoder_steps", "class_steps", "batch_size", "success_rate", "collapse",
            "clusters", "seed")


def check_reference(reference: dict, cfg: ScanConfig, classnames, size: int) -> None:
    """ScanError listing every difference between a reference scan and this one's settings, classes and image size:
    mask sizes are only comparable on the same images, steps and classes."""
    if not isinstance(reference, dict) or "settings" not in reference or "verdict" not in reference:
        raise ScanError("the reference is not a scan result (expected the scan.json that `parclip scan` writes)")
    mine = dataclasses.asdict(cfg)
    diffs = [f"{k}: {reference['settings'].get(k)!r} (reference) vs {mine[k]!r}" for k in COMPARED
             if reference["settings"].get(k) != mine[k]]
    if reference.get("image_size") != size:
        diffs.append(f"image_size: {reference.get('image_size')} (reference) vs {size}")
    if list(reference.get("classnames") or []) != list(classnames or []):
        diffs.append("classnames differ")
    if diffs:
        raise ScanError("the reference scan was made with other settings; scan the clean model again with this "
                        "scan's settings, or drop --reference: " + "; ".join(diffs))
