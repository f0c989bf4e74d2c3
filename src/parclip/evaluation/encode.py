"""Encoding evaluation images without letting one bad file stop the run: shared by zero-shot, retrieval and the
embedding maps.

:class:`Tolerant` turns a dataset's :class:`~parclip.data.DataError` (an undecodable or missing image) into a zero
image plus the error message; :func:`encode_images` encodes every item and returns the messages beside the
embeddings; :func:`usable` counts and names the bad images (:class:`~parclip.data.BadRows`), raises above
``max_bad_fraction`` and returns the mask of the images every number is computed on.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from parclip.data import BadRows, DataError
from parclip.data.captions import UNREADABLE

__all__ = ["Tolerant", "encode_images", "usable"]


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
                  progress: bool) -> tuple[torch.Tensor, list[str]]:
    """(L2-normalised float32 embeddings [N, d] on the CPU, the error of each item, "" for a good one); autocast on
    CUDA."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    feats, errors = [], []
    for x, err in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
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
