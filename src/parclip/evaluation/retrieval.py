"""Image–text retrieval evaluation: R@k both ways, clean and triggered, and the retrieval ASR (the reference's protocol
and where we differ: docs/reference_differences.md#retrieval).

The metrics and their formulas are in :mod:`parclip.evaluation.retrieval_metrics`. Here: encode every caption once,
every image clean and once per attack (triggered the way zero-shot evaluation triggers them: squash-resize to the
model resolution, trigger in uint8 space, then the model's preprocessing), and score.

Undecodable or missing images are counted, named and left out (with their captions) up to ``max_bad_fraction``;
above it a :class:`~parclip.data.DataError` says which.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from parclip.attacks.triggers import Trigger
from parclip.data.retrieval import RetrievalSet
from parclip.data.targets import target_pattern
from parclip.models import eval_transform, image_size

from .encode import Tolerant, TriggeredImages, encode_images, usable
from .retrieval_metrics import image_asr, pair_ranks, recall_at_k, text_asr, text_ids

__all__ = ["evaluate_retrieval", "validate_pairs"]


@torch.no_grad()
def _encode_texts(model, tokenizer, captions, *, batch_size, device, progress, amp=True):
    feats = []
    for b in tqdm(range(0, len(captions), batch_size), desc="captions", disable=not progress, leave=False):
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            feats.append(model.encode_text(tokenizer(captions[b:b + batch_size]).to(device), normalize=True)
                         .float().cpu())
    return torch.cat(feats)


def evaluate_retrieval(model, preprocess_cfg: dict, tokenizer, data: RetrievalSet, *, attacks: list[Trigger] = (),
                       target: str | None = None, ks=(1, 5, 10), asr_k: int = 5, seed: int = 0,
                       max_bad_fraction: float = 0.01, batch_size: int = 256, workers: int = 2, device="cpu",
                       progress: bool = True, merge_identical: bool = False, trigger_after_crop: bool = False,
                       amp: bool = True) -> dict:
    """R@k (i2t, t2i) on clean images and, per attack, on triggered images, with the retrieval ASR.

    `trigger_after_crop`: as in zero-shot evaluation (:mod:`parclip.evaluation.zero_shot`). `amp`: autocast on CUDA
    (False: float32 throughout).
    `merge_identical`: identical captions are interchangeable in R@k (for templated captions; see
    :func:`~parclip.evaluation.retrieval_metrics.recall_at_k`); the default is the reference's rule.

    Returns {"clean": {"i2t": {k: R@k}, "t2i": {…}}, "n_images", "n_captions", "target", "n_target_captions",
    "attacks": {name: {"recall": {…}, "asr_text", "asr_text_strict", "n_strict", "asr_image", "n_queries", "k",
    "params"}}, "conventions": {…}}. Percentages.
    """
    attacks = list(attacks)
    if attacks and target is None:
        raise ValueError("the retrieval ASR needs a target word: pass --target WORD")
    pattern = target_pattern(target) if target is not None else None  # checked before any image is encoded
    device = torch.device(device)
    model = model.to(device).eval()
    transform, size = eval_transform(preprocess_cfg), image_size(preprocess_cfg)

    encode = dict(batch_size=batch_size, workers=workers, device=device, progress=progress, amp=amp)
    clean = Tolerant(TriggeredImages(data, None, transform), size)
    img, errors = encode_images(model, clean, desc="clean images", **encode)
    ok, bad = usable(errors, [str(p) for p in data.images], data.source, max_bad_fraction)
    new_index = torch.cumsum(ok.long(), 0) - 1
    owner = torch.tensor(data.owner)
    keep_caption = ok[owner]
    captions = [c for c, k in zip(data.captions, keep_caption.tolist()) if k]
    owner = new_index[owner[keep_caption]]
    txt = _encode_texts(model, tokenizer, captions, batch_size=batch_size, device=device, progress=progress, amp=amp)
    img = img[ok]
    tid = text_ids(captions) if merge_identical else None

    result = {"clean": recall_at_k(img, txt, owner, ks, tid), "n_images": int(ok.sum()), "n_captions": len(captions),
              "n_bad_images": bad.total, "source": data.source, "attacks": {},
              "conventions": {"recall": "percent; i2t R@k: an own caption among the image's top k captions; "
                                        "t2i R@k: the caption's image among its top k images (reference "
                                        "TextPrec/ImagePrec)" + (
                                            "; identical captions interchangeable (a hit is a caption with the "
                                            "text of one of the image's own)" if merge_identical else ""),
                              "asr_text": f"percent of triggered images whose top {asr_k} captions include one "
                                          f"naming the target (reference ASR-Text, all images)",
                              "asr_text_strict": "asr_text over the images none of whose own captions names the "
                                                 "target",
                              "asr_image": f"percent of target-naming captions whose top {asr_k} images, among the "
                                           f"clean and the triggered images, include a triggered one"}}
    if pattern is not None:
        names = torch.tensor([pattern.search(c) is not None for c in captions])
        result.update(target=target, n_target_captions=int(names.sum()))
    for trigger in attacks:
        triggered = TriggeredImages(data, trigger, transform, seed=seed, after_crop=trigger_after_crop)
        timg, _ = encode_images(model, Tolerant(triggered, size), desc=trigger.name, **encode)
        timg = timg[ok]
        result["attacks"][trigger.name] = {"recall": recall_at_k(timg, txt, owner, ks, tid),
                                           **text_asr(timg, txt, names, owner, asr_k),
                                           **{k: v for k, v in image_asr(img, timg, txt, names, asr_k).items()
                                              if k != "k"},
                                           "params": trigger.params(), "seed": seed,
                                           "trigger_after_crop": trigger_after_crop}
    return result


@torch.no_grad()
def validate_pairs(model, pairs, *, transform, tokenizer, batch_size: int, device, autocast=None) -> dict:
    """open_clip_train's `evaluate` on validation pairs (``(PIL image, caption)``, e.g.
    :func:`parclip.data.sources.validation_pairs`): in batches of `batch_size` in the pairs' order, with s the
    model's exp(logit_scale) and F, G a batch's L2-normalised image and caption embeddings,

        batch loss = ½ [ CE(s·F Gᵀ, I) + CE(s·G Fᵀ, I) ]
        clip_val_loss = Σ_batches (batch loss × batch size) / N

    and the ranking metrics of all N pairs at once (:func:`~parclip.evaluation.retrieval_metrics.pair_ranks`).
    Returns {"clip_val_loss", "num_samples", "image_to_text_R@1", ..., "text_to_image_median_rank"}; the model is
    left in eval mode."""
    import torch.nn.functional as F

    model.eval()
    scale = model.logit_scale.exp().float()
    imgs, txts, total, n = [], [], 0.0, 0
    batch: list = []

    def flush():
        nonlocal total, n
        images = torch.stack([transform(im) for im, _ in batch]).to(device)
        texts = tokenizer([c for _, c in batch]).to(device)
        with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
            f = model.encode_image(images, normalize=True).float()
            g = model.encode_text(texts, normalize=True).float()
        logits = scale * f @ g.T
        labels = torch.arange(len(batch), device=device)
        total += ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).item() * len(batch)
        n += len(batch)
        imgs.append(f.cpu())
        txts.append(g.cpu())
        batch.clear()

    for pair in pairs:
        batch.append(pair)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if n == 0:
        raise ValueError("no validation pairs to evaluate")
    return {"clip_val_loss": total / n, "num_samples": n, **pair_ranks(torch.cat(imgs), torch.cat(txts))}
