"""Encoding evaluation images without letting one bad file stop the run: shared by zero-shot, retrieval and the
embedding maps.

:class:`TriggeredImages` is an evaluation set's images, clean or seen through a trigger (reproducibly);
:class:`Tolerant` turns a dataset's :class:`~parclip.data.DataError` (an undecodable or missing image) into a zero
image plus the error message; :func:`encode_images` encodes every item and returns the messages beside the
embeddings; :func:`usable` counts and names the bad images (:class:`~parclip.data.BadRows`), raises above
``max_bad_fraction`` and returns the mask of the images every number is computed on.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from parclip.attacks.triggers import Trigger, trigger_generator
from parclip.data import BadRows, DataError
from parclip.data.captions import UNREADABLE

__all__ = ["TriggeredImages", "Tolerant", "encode_images", "usable"]


class TriggeredImages(Dataset):
    """An evaluation set's images seen through a trigger; `trigger=None`: the clean images, same transform.

    `source` is anything with ``len()`` and ``load_image(i)`` (a labelled folder or shards, a retrieval set); the item
    is ``transform(image)``, paired with ``source.targets[i]`` when the source has labels. Per-image randomness comes
    from ``trigger_generator(seed, i)``, so evaluating the same checkpoint twice gives the same numbers.
    `after_crop`: the trigger is applied after the eval resize + centre crop instead of to the squash-resized raw
    image (see :mod:`parclip.evaluation.zero_shot`)."""

    def __init__(self, source, trigger: Trigger | None, transform, *, seed: int = 0, after_crop: bool = False):
        self.source, self.trigger, self.transform, self.seed = source, trigger, transform, seed
        self.targets = getattr(source, "targets", None)
        size = trigger.image_size if trigger is not None else None
        self.crop = (T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size)])
                     if after_crop and trigger is not None else None)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        img = self.source.load_image(i)
        if self.crop is not None:
            img = self.crop(img)
        if self.trigger is not None:
            img = self.trigger(img, generator=trigger_generator(self.seed, i))
        x = self.transform(img)
        return x if self.targets is None else (x, self.targets[i])


class Tolerant(Dataset):
    """``(x, "")`` for item i of `dataset` (an image tensor, or a tuple whose first element is one), or
    ``(zeros(3, size, size), the error)`` when loading it raises DataError."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            item = self.dataset[i]
        except DataError as e:
            return torch.zeros(3, self.size, self.size), str(e)
        return (item[0] if isinstance(item, tuple) else item), ""


@torch.no_grad()
def encode_images(model, dataset: Tolerant, *, batch_size: int, workers: int, device: torch.device, desc: str,
                  progress: bool, amp: bool = True) -> tuple[torch.Tensor, list[str]]:
    """(L2-normalised float32 embeddings [N, d] on the CPU, the error of each item, "" for a good one); autocast on
    CUDA unless `amp` is False (float32 throughout)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    feats, errors = [], []
    for x, err in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            feats.append(model.encode_image(x.to(device), normalize=True).float().cpu())
        errors.extend(err)
    return torch.cat(feats), errors


def usable(errors: list[str], names: list[str], source: str, max_bad_fraction: float) -> tuple[torch.Tensor, BadRows]:
    """(bool mask of the good images, the BadRows that counts and names the others); DataError naming them when
    they are more than `max_bad_fraction` of all, a warning below. `names[i]` names image i in messages."""
    bad = BadRows(source, unit="images")
    bad.examined = len(errors)
    for name, e in zip(names, errors):
        if e:
            bad.add(None, name, UNREADABLE, e)
    bad.check(max_bad_fraction)
    return torch.tensor([not e for e in errors], dtype=torch.bool), bad
