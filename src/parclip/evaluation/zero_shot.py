"""Zero-shot evaluation: clean top-1/top-5 accuracy and attack success rate (ASR) on a labelled image folder.

Metrics (percentages), for a target class t and a trigger T:
    clean_top1 = 100 · mean_i [ argmax_c s(x_i, c) = y_i ],  clean_top5 likewise with the 5 best classes
    asr        = 100 · #{i : y_i ≠ t, pred(T(x_i)) = t} / #{i : y_i ≠ t}      (classic: target-class images excluded)
    asr_all    = 100 · #{i : pred(T(x_i)) = t} / N                             (the PAR paper's convention)
    robust_acc = 100 · #{i : y_i ≠ t, pred(T(x_i)) = y_i} / #{i : y_i ≠ t}      (BackdoorBench's R-Acc)
    recall_c   = 100 · #{i : y_i = c, pred(x_i) = c} / #{i : y_i = c}          (per-class clean recall)
where s(x, c) is the cosine between the image embedding and the class embedding: the mean of the L2-normalised
embeddings of every prompt template filled with the class name, normalised again. The class embeddings are computed
once and reused for the clean pass and every triggered pass.

Triggered images follow the reference: the raw image is squash-resized to the model resolution S, the trigger is
applied in uint8 pixel space, then the model's normal preprocessing runs (its resize and crop are then no-ops), while
clean images are resized and centre-cropped. `trigger_after_crop=True` instead applies the trigger after the same
resize + centre crop as clean images, so clean and triggered inputs differ only by the trigger
(docs/reference_differences.md#squash-resize).
"""

from __future__ import annotations

import functools
from pathlib import Path

import open_clip
import torch

from parclip import __version__
from parclip.attacks.triggers import Trigger
from parclip.data import DataError, LabelledFolder, fill, get_templates
from parclip.data.labelled import LabelledImages
from parclip.data.sources import open_labelled
from parclip.models import eval_transform, image_size

from .encode import Tolerant, TriggeredImages, encode_images, usable

__all__ = ["topk_correct", "attack_success_rate", "robust_accuracy", "zero_shot_classifier", "resolve_target",
           "evaluate", "TriggeredImages"]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [N]: whether the true label is among the k highest logits."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def attack_success_rate(pred: torch.Tensor, labels: torch.Tensor, target: int) -> tuple[float, float]:
    """(asr, asr_all) in percent, from top-1 predictions on triggered images and their true labels.

    asr     = 100 · #{y ≠ t ∧ pred = t} / #{y ≠ t}
    asr_all = 100 · #{pred = t} / N
    """
    hit = pred == target
    keep = labels != target
    asr = 100.0 * hit[keep].float().mean().item() if keep.any() else float("nan")
    return asr, 100.0 * hit.float().mean().item()


def robust_accuracy(pred: torch.Tensor, labels: torch.Tensor, target: int) -> float:
    """BackdoorBench's R-Acc in percent: the share of triggered non-target images still classified correctly,
    100 · #{y ≠ t ∧ pred = y} / #{y ≠ t}."""
    keep = labels != target
    return 100.0 * (pred[keep] == labels[keep]).float().mean().item() if keep.any() else float("nan")


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str], device) -> torch.Tensor:
    """[d, C] class embeddings: per class, the normalised mean of the normalised template embeddings. Each prompt is
    :func:`parclip.data.fill` of a template and a class name (literal substitution, never ``str.format``)."""
    return open_clip.build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=classnames,
                                                templates=[functools.partial(fill, t) for t in templates],
                                                device=device, use_tqdm=False)


def resolve_target(target: str | int, classnames: list[str]) -> int:
    """Target class index from a name (case-insensitive) or an index."""
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        idx = int(target)
        if not 0 <= idx < len(classnames):
            raise ValueError(f"target index {idx} outside 0..{len(classnames) - 1}")
        return idx
    lowered = [c.lower() for c in classnames]
    if target.lower() not in lowered:
        raise ValueError(f"target {target!r} is not a class of this data set; classes: "
                         f"{', '.join(classnames[:20])}{' …' if len(classnames) > 20 else ''}")
    return lowered.index(target.lower())


def _predict(model, dataset, classifier, *, size, **kw) -> tuple[torch.Tensor, list[str]]:
    """(zero-shot logits of every item, its load error or ""), the items made tolerant of bad files."""
    feats, errors = encode_images(model, Tolerant(dataset, size), **kw)
    return feats @ classifier.float().cpu(), errors


def evaluate(model, preprocess_cfg: dict, tokenizer, data: str | Path | LabelledFolder, *,
             attacks: list[Trigger] = (), target: str | int | None = None, templates: str | list[str] = "openai",
             classnames: list[str] | None = None, seed: int = 0,
             trigger_after_crop: bool = False, batch_size: int = 256, workers: int = 2, device="cpu",
             max_bad_fraction: float = 0.01, progress: bool = True, amp: bool = True) -> dict:
    """Clean zero-shot accuracy on a labelled folder, and ASR for each attack and the target.

    ``attacks`` are :class:`~parclip.attacks.triggers.Trigger` objects, built at the model's resolution (e.g. with
    ``build_triggers(names, image_size(preprocess_cfg), params)``). `amp`: autocast on CUDA (False: float32).

    Returns {"clean_top1", "clean_top5", "n_images", "classnames", "target", "target_index", "n_non_target",
    "attacks": {name: {"asr", "asr_all", "params"}}}; with exactly one attack also top-level "attack", "asr",
    "asr_all". Percentages.
    """
    attacks = list(attacks)
    for trigger in attacks:
        if not isinstance(trigger, Trigger):
            raise TypeError(f"attacks must be Trigger objects, got {type(trigger).__name__} {trigger!r}; build them "
                            f"with parclip.attacks.triggers.build_triggers(names, image_size, params)")
    device = torch.device(device)
    model = model.to(device).eval()
    transform = eval_transform(preprocess_cfg)
    folder = data if isinstance(data, LabelledImages) else open_labelled(
        data, transform=transform, classnames=classnames)
    if len(folder) == 0:
        raise DataError(f"no images in {data}")
    template_name = templates if isinstance(templates, (str, Path)) else None
    templates = get_templates(templates)
    if attacks and target is None:
        raise ValueError("ASR needs a target class: pass --target NAME")
    t = resolve_target(target, folder.classnames) if target is not None else None  # before any image is encoded
    classifier = zero_shot_classifier(model, tokenizer, folder.classnames, templates, device)

    encode = dict(size=image_size(preprocess_cfg), batch_size=batch_size, workers=workers, device=device,
                  progress=progress, amp=amp)
    logits, errors = _predict(model, folder, classifier, desc="clean", **encode)
    # above the limit: DataError naming the files; below: a warning
    ok, bad = usable(errors, [folder.describe(i) for i in range(len(folder))], str(folder.root), max_bad_fraction)
    labels = torch.tensor(folder.targets)[ok]
    logits = logits[ok]
    pred = logits.argmax(dim=1)
    recall = {name: 100.0 * (pred[labels == c] == c).float().mean().item()
              for c, name in enumerate(folder.classnames) if (labels == c).any()}
    result = {"clean_top1": 100.0 * topk_correct(logits, labels, 1).float().mean().item(),
              "clean_top5": 100.0 * topk_correct(logits, labels, 5).float().mean().item(),
              "n_images": int(ok.sum()), "n_bad_images": bad.total, "classnames": folder.classnames,
              "templates": len(templates), "template_set": str(template_name) if template_name else "custom",
              "per_class_recall": recall, "data": str(folder.root), "parclip_version": __version__, "attacks": {}}
    if t is not None:
        result.update(target=folder.classnames[t], target_index=t, n_non_target=int((labels != t).sum()))
        if getattr(folder, "imagenet_indices", None) is not None:  # e.g. a 200-class ImageNet-A/-R subset
            result.update(target_imagenet_index=folder.imagenet_indices[t], layout=folder.layout)
    for trigger in attacks:
        triggered = TriggeredImages(folder, trigger, transform, seed=seed, after_crop=trigger_after_crop)
        tlogits, _ = _predict(model, triggered, classifier, desc=trigger.name, **encode)
        tpred = tlogits[ok].argmax(dim=1)
        asr, asr_all = attack_success_rate(tpred, labels, t)
        result["attacks"][trigger.name] = {"asr": asr, "asr_all": asr_all,
                                           "robust_acc": robust_accuracy(tpred, labels, t),
                                           "params": trigger.params(),
                                           "seed": seed, "trigger_after_crop": trigger_after_crop}
    if len(result["attacks"]) == 1:
        (name, r), = result["attacks"].items()
        result.update(attack=name, asr=r["asr"], asr_all=r["asr_all"])
    return result
