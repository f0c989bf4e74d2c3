"""Image–text retrieval evaluation: R@k both ways, clean and triggered, and the retrieval ASR (par.md §6.4).

The metrics and their formulas are in :mod:`parclip.evaluation.retrieval_metrics`. Here: encode every caption once,
every image clean and once per attack (triggered the way zero-shot evaluation triggers them: squash-resize to the
model resolution, trigger in uint8 space, then the model's preprocessing), and score.

Undecodable or missing images are counted, named and left out (with their captions) up to ``max_bad_fraction``;
above it a :class:`~parclip.data.DataError` says which.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from parclip.attacks.triggers import Trigger, trigger_generator
from parclip.data import BadRows, DataError, open_rgb
from parclip.data.retrieval import RetrievalSet
from parclip.data.targets import target_pattern
from parclip.models import eval_transform, image_size

from .retrieval_metrics import image_asr, recall_at_k, text_asr

__all__ = ["evaluate_retrieval"]


class _Images(Dataset):
    """The set's images, optionally triggered; a bad file gives a zero image and its error message."""

    def __init__(self, paths, transform, size: int, trigger: Trigger | None = None, seed: int = 0):
        self.paths, self.transform, self.size, self.trigger, self.seed = paths, transform, size, trigger, seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = open_rgb(self.paths[i])
        except DataError as e:
            return torch.zeros(3, self.size, self.size), str(e)
        if self.trigger is not None:
            img = self.trigger(img, generator=trigger_generator(self.seed, i))
        return self.transform(img), ""


@torch.no_grad()
def _encode_images(model, dataset, *, batch_size, workers, device, desc, progress):
    feats, errors = [], []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    for x, err in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            feats.append(model.encode_image(x.to(device), normalize=True).float().cpu())
        errors.extend(err)
    return torch.cat(feats), errors


@torch.no_grad()
def _encode_texts(model, tokenizer, captions, *, batch_size, device, progress):
    feats = []
    for b in tqdm(range(0, len(captions), batch_size), desc="captions", disable=not progress, leave=False):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            feats.append(model.encode_text(tokenizer(captions[b:b + batch_size]).to(device), normalize=True)
                         .float().cpu())
    return torch.cat(feats)


def evaluate_retrieval(model, preprocess_cfg: dict, tokenizer, data: RetrievalSet, *, attacks: list[Trigger] = (),
                       target: str | None = None, ks=(1, 5, 10), asr_k: int = 5, seed: int = 0,
                       max_bad_fraction: float = 0.01, batch_size: int = 256, workers: int = 2, device="cpu",
                       progress: bool = True) -> dict:
    """R@k (i2t, t2i) on clean images and, per attack, on triggered images, with the retrieval ASR.

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

    img, errors = _encode_images(model, _Images(data.images, transform, size), batch_size=batch_size,
                                 workers=workers, device=device, desc="clean images", progress=progress)
    bad = BadRows(data.source, unit="images")
    bad.examined = len(data.images)
    for i, e in enumerate(errors):
        if e:
            bad.add(None, str(data.images[i]), "unreadable", e)
    bad.check(max_bad_fraction)
    ok = torch.tensor([not e for e in errors])
    new_index = torch.cumsum(ok.long(), 0) - 1
    owner = torch.tensor(data.owner)
    keep_caption = ok[owner]
    captions = [c for c, k in zip(data.captions, keep_caption.tolist()) if k]
    owner = new_index[owner[keep_caption]]
    txt = _encode_texts(model, tokenizer, captions, batch_size=batch_size, device=device, progress=progress)
    img = img[ok]

    result = {"clean": recall_at_k(img, txt, owner, ks), "n_images": int(ok.sum()), "n_captions": len(captions),
              "n_bad_images": bad.total, "source": data.source, "attacks": {},
              "conventions": {"recall": "percent; i2t R@k: an own caption among the image's top k captions; "
                                        "t2i R@k: the caption's image among its top k images (reference "
                                        "TextPrec/ImagePrec)",
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
        timg, _ = _encode_images(model, _Images(data.images, transform, size, trigger, seed), batch_size=batch_size,
                                 workers=workers, device=device, desc=trigger.name, progress=progress)
        timg = timg[ok]
        result["attacks"][trigger.name] = {"recall": recall_at_k(timg, txt, owner, ks),
                                           **text_asr(timg, txt, names, owner, asr_k),
                                           **{k: v for k, v in image_asr(img, timg, txt, names, asr_k).items()
                                              if k != "k"},
                                           "params": trigger.params(), "seed": seed}
    return result
