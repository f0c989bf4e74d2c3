"""Where a data argument becomes a reader: the one place that decides whether a source is webdataset shards.

* :func:`open_training_data`: image–caption pairs for training, a caption table (:class:`~parclip.data.CaptionDataset`)
  or shards (:class:`~parclip.data.shards.ShardStream`), behind one :class:`TrainingData` that gives the training loop
  what it needs whatever the format: the samples per epoch (``len``), the loader of an epoch's batches from any batch
  on (a resumed run starts mid-epoch), ``describe(i)`` for a sample named in a message, and ``is_shards``.
* :func:`validation_pairs`: image–caption pairs to validate on (open_clip's --val-data), a table or shards, in order.
* :func:`open_labelled`: a labelled evaluation set, a folder ``root/<class>/*`` or clip_benchmark's shards.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .captions import CAPTION_KEY, IMG_KEY, CaptionDataset, DataError
from .folder import LabelledFolder
from .labelled import LabelledImages
from .shards import LabelledShards, ShardStream, expand_urls, is_shard_spec, shard_sizes

__all__ = ["open_training_data", "TrainingData", "open_labelled", "validation_pairs"]

# (captions, keys=None) -> (captions, [extra caption lists]): a defence's caption views (keys seed their randomness)
CaptionViews = Callable[..., "tuple[list[str], list[list[str]]]"]


def open_training_data(source: str, *, transform: Callable, tokenizer: Callable, batch_size: int,
                       dataset_type: str = "auto", caption_views: CaptionViews | None = None,
                       num_samples: int | None = None, rows: int | None = None, world_size: int = 1, rank: int = 0,
                       seed: int = 0, workers: int = 0, pin_memory: bool = False, shuffle_buffer: int = 1000,
                       resampled: bool = False, img_key: str = IMG_KEY, caption_key: str = CAPTION_KEY,
                       sep: str | None = None, root: str | os.PathLike | None = None,
                       max_bad_fraction: float = 0.01, split: tuple[Callable, Callable | None] | None = None,
                       memory_gib: float = 0.0) -> TrainingData:
    """The training pairs of `source`: shards when `dataset_type` is "webdataset", or "auto" and the source names
    shards (a .tar path, URL or pattern, a ``pipe:`` command, ``::``-joined sources, a folder of .tar files); a
    caption table otherwise.

    `transform` maps a PIL image to the image tensor (or a tuple of views), `tokenizer` a list of captions to tokens;
    `caption_views`, when given, adds a defence's caption views (a table's captions pass through it once, a shard
    sample's caption as it is read, keyed by ``shard#index``). `num_samples`: the samples per epoch of shards (open_clip's
    --train-num-samples; needed there unless a ``sizes.json`` or img2dataset's ``*_stats.json`` says it), refused for
    a table (open_clip ignores it there); `rows`: a table's first N usable rows (--train-rows), refused for shards.
    `batch_size` is per process; `world_size`, `rank` and `seed` fix each process's share and order of every epoch
    (and, for shards, `workers`: each DataLoader worker reads shards of its own). `resampled`: shards drawn with
    replacement, an endless stream cut into epochs of `num_samples` (open_clip's ``--dataset-resampled``; shards only).
    `split`: `transform` as ``(fixed, random)``, ``transform(im) == random(fixed(im))`` where `fixed` gives the same
    output for an image every time and `random` (None: nothing) draws random numbers; with it, a table whose fixed
    outputs fit `memory_gib` GiB is decoded and put through `fixed` once, into memory (:meth:`TrainingData.
    keep_in_memory`), instead of every epoch.
    """
    shards = dataset_type == "webdataset" or (dataset_type == "auto" and is_shard_spec(source))
    loading = dict(batch_size=batch_size, world_size=world_size, rank=rank, seed=seed, workers=workers,
                   pin_memory=pin_memory)
    if not shards and num_samples:
        raise DataError(f"--train-num-samples {num_samples}: open_clip_train's samples per epoch of webdataset shards "
                        f"(open_clip ignores it for a table); to train on the first {num_samples} rows of the table "
                        f"{source}, pass --train-rows {num_samples} (what --train-num-samples meant for a table "
                        f"before)")
    if shards and rows:
        raise DataError(f"--train-rows keeps the first rows of a table, and {source} names shards: their samples "
                        f"per epoch are --train-num-samples")
    if not shards:
        if resampled:
            raise DataError(f"--dataset-resampled is for webdataset shards (drawn with replacement); {source} is a "
                            f"caption table: drop the flag (a table's epoch already visits every row once)")
        table = CaptionDataset(source, img_key=img_key, caption_key=caption_key, sep=sep, root=root,
                               tokenizer=tokenizer, transform=transform, max_bad_fraction=max_bad_fraction,
                               num_samples=rows)
        if caption_views is not None:
            table.captions, table.caption_views = caption_views(table.captions)
        data = TrainingData(table, is_shards=False, **loading)
        if split is not None and memory_gib > 0:
            data.keep_in_memory(int(memory_gib * 2**30), *split)
        return data
    n = num_samples or shard_sizes(expand_urls(source))
    if not n:
        raise DataError(f"{source}: the shards do not say how many samples they hold (no sizes.json or "
                        f"img2dataset *_stats.json beside them, or pipe: sources); pass --train-num-samples N "
                        f"(samples per epoch)")

    def views(caption: str, key: str):
        captions, extra = caption_views([caption], keys=[key])
        return captions[0], [v[0] for v in extra]

    stream = ShardStream(source, transform=transform, tokenize=lambda c: tokenizer([c])[0], batch_size=batch_size,
                         num_samples=n, world_size=world_size, rank=rank, seed=seed, shuffle_buffer=shuffle_buffer,
                         captions=views if caption_views is not None else None, workers=workers, resampled=resampled)
    return TrainingData(stream, is_shards=True, **loading)


class TrainingData:
    """Training pairs, table or shards, as the training loop uses them (made by :func:`open_training_data`).

    ``len(data)``: samples per epoch. ``loader(epoch, first_batch, n_batches)``: this process's batches
    ``(images, tokens, failed)`` of `epoch` from batch `first_batch` on (of `n_batches` per epoch), where ``failed``
    holds -1 or the id of a sample that could not be read and was replaced (``describe(id)`` names it).
    :attr:`in_memory`: whether a table's samples were transformed once into memory (:meth:`keep_in_memory`).
    """

    def __init__(self, dataset: CaptionDataset | ShardStream, *, is_shards: bool, batch_size: int, world_size: int,
                 rank: int, seed: int, workers: int, pin_memory: bool):
        self.dataset, self.is_shards = dataset, is_shards
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.workers, self.pin_memory = workers, pin_memory
        self._stored: _Stored | None = None  # the table's fixed transform outputs, once kept in memory
        self._random: Callable | None = None  # the transform's random part, drawn per sample from them

    @property
    def in_memory(self) -> bool:
        return self._stored is not None

    def keep_in_memory(self, budget_bytes: int, fixed: Callable, random: Callable | None = None) -> bool:
        """Decode every sample of a table once, now, and keep ``fixed(image)`` in memory, when that fits
        `budget_bytes` (the size of sample 0 times the number of samples); the table's transform must be
        ``random(fixed(image))``, `fixed` using no random numbers. Then every epoch's batches come from memory, in
        this process, with no worker and no decoding: sliced (no `random`), or each sample put through `random`
        after the seeding the files' loader does (:class:`_SeededItems`), with the global random state restored
        afterwards, as it is when workers do that. The batches are the ones the table's loader gives, bit for bit
        (bad rows replaced and counted the same way). Returns whether it kept them. The decoding uses the run's
        workers, with its own random generator."""
        if self.is_shards or self.in_memory:
            return self.in_memory
        table = copy.copy(self.dataset)
        table.transform = fixed
        size = sum(t.numel() * t.element_size() for t in _tensors(table[0]))
        if size * len(table) > budget_bytes:
            return False
        loader = DataLoader(table, batch_size=max(self.batch_size, 1), num_workers=self.workers,
                            generator=torch.Generator().manual_seed(0))
        self._stored, self._random = _Stored(_concat(list(loader))), random
        return True

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, sample_id: int) -> str:
        return self.dataset.describe(sample_id)

    def loader(self, epoch: int, first_batch: int, n_batches: int) -> DataLoader:
        """The epoch's shuffled share of this process from batch `first_batch` on: the shard stream's own order, or a
        DistributedSampler over the table (every process the same number of whole batches)."""
        if self.is_shards:
            self.dataset.set_epoch(epoch, first_batch, n_batches)
            # in_order: the DataLoader takes its workers' batches in turn, the order the stream's schedule is made for
            return DataLoader(self.dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                              persistent_workers=False, in_order=True)
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)[first_batch * self.batch_size:]
        if self.in_memory and self._random is None:  # batches by slicing (the DataLoader draws its base seed as below)
            return DataLoader(self._stored, batch_size=self.batch_size, sampler=indices, num_workers=0,
                              drop_last=True, collate_fn=_whole_batch)
        if self.in_memory:
            return DataLoader(_Restored(_SeededItems(_Finished(self._stored, self._random), self.seed, epoch)),
                              batch_size=self.batch_size, sampler=indices, num_workers=0, drop_last=True)
        return DataLoader(_SeededItems(self.dataset, self.seed, epoch), batch_size=self.batch_size, sampler=indices,
                          num_workers=self.workers, drop_last=True, pin_memory=self.pin_memory,
                          persistent_workers=False)

    def __repr__(self) -> str:
        return f"TrainingData({self.dataset!r}, {len(self)} samples per epoch)"


def _tensors(item) -> list[torch.Tensor]:
    """The tensors of a sample or batch (nested tuples and lists of tensors; anything else, e.g. an int, has none)."""
    if isinstance(item, torch.Tensor):
        return [item]
    return [t for part in item for t in _tensors(part)] if isinstance(item, (tuple, list)) else []


def _concat(batches: list):
    """Collated batches joined into one: tensors concatenated along the first axis, tuples and lists field by field."""
    if isinstance(batches[0], torch.Tensor):
        return torch.cat(batches)
    return type(batches[0])(_concat([b[k] for b in batches]) for k in range(len(batches[0])))


def _take(stored, indices):
    """Rows `indices` (an int or a tensor of them) of every tensor of `stored`, in its structure."""
    return stored[indices] if isinstance(stored, torch.Tensor) else type(stored)(_take(s, indices) for s in stored)


def _whole_batch(batch):
    return batch


class _Stored(Dataset):
    """A table's samples transformed once (:meth:`TrainingData.keep_in_memory`): the collated form of all of them;
    ``__getitems__`` gives a batch by indexing, so the DataLoader collates nothing."""

    def __init__(self, stored):
        self.stored, self.n = stored, len(_tensors(stored)[0])

    def __len__(self):
        return self.n

    def __getitem__(self, i: int):
        return _take(self.stored, i)

    def __getitems__(self, indices):
        return _take(self.stored, torch.as_tensor(indices))


class _Finished(Dataset):
    """Sample i of the fixed outputs kept in memory, its image put through `random` (the transform's random part)."""

    def __init__(self, stored: _Stored, random: Callable):
        self.stored, self.random = stored, random

    def __len__(self):
        return len(self.stored)

    def __getitem__(self, i: int):
        image, *rest = self.stored[i]
        return (self.random(image), *rest)


class _Restored(Dataset):
    """A batch's items read with the global random state saved before and restored after (`torch.random.fork_rng`):
    items seeded in this process leave the training's random numbers as workers would."""

    def __init__(self, items: Dataset):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitems__(self, indices):
        with torch.random.fork_rng(devices=[]):
            return [self.items[i] for i in indices]


class _SeededItems(Dataset):
    """Seeds the RNG per (seed, epoch, index) before each item, so augmentation is identical whatever the number
    of workers or ranks, and a resumed run sees the same augmented images as an uninterrupted one."""

    def __init__(self, data, seed: int, epoch: int):
        self.data, self.seed, self.epoch = data, seed, epoch

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        torch.random.default_generator.manual_seed(hash((self.seed, self.epoch, i)) % (2**63))
        return self.data[i]


def open_labelled(data, *, transform: Callable | None = None, classnames=None) -> LabelledImages:
    """A labelled evaluation set: webdataset shards in clip_benchmark's layout (a .tar pattern, a folder holding .tar
    files, or a data set root with classnames.txt and test/*.tar) as :class:`~parclip.data.shards.LabelledShards`,
    any other folder as :class:`~parclip.data.LabelledFolder`."""
    root = Path(str(data))
    if root.is_dir() and (root / "classnames.txt").is_file() and is_shard_spec(root / "test"):
        data = root / "test"  # clip_benchmark: <dataset>/classnames.txt, <dataset>/test/0.tar …
    if is_shard_spec(data):
        return LabelledShards(str(data), transform=transform, classnames=classnames)
    return LabelledFolder(data, transform=transform, classnames=classnames)


def validation_pairs(source: str, *, img_key: str, caption_key: str, sep: str | None = None,
                     root: str | os.PathLike | None = None, limit: int | None = None, max_bad_fraction: float = 0.01):
    """The image–caption pairs of a validation set (open_clip's --val-data) in their stored order, as ``(PIL RGB
    image, caption)``: a caption table's usable rows (checked as a training table is: :class:`CaptionDataset`), or the
    samples of webdataset shards, shard by shard (caption from ``.txt``). `limit`: the first N pairs only. A pair
    whose image does not decode, or a shard sample without image or caption, is skipped and counted; the count is
    logged at the end. The table is read, and its rows checked, when this is called; shards as they are iterated."""
    import logging

    from .shards import decode_image, read_shard

    log = logging.getLogger("parclip")
    if not is_shard_spec(source):
        table = CaptionDataset(source, img_key=img_key, caption_key=caption_key, sep=sep, root=root,
                               max_bad_fraction=max_bad_fraction, num_samples=limit)

        def rows():
            skipped = 0
            for i in range(len(table)):
                try:
                    yield table.load_image(i), table.captions[i]
                except DataError as e:
                    skipped += 1
                    log.warning("--val-data: %s; skipped", e)
            if skipped:
                log.warning("--val-data %s: %d pairs skipped (their images do not decode)", source, skipped)
        return rows()

    def samples():
        n = skipped = 0
        for url in expand_urls(source):
            for sample in read_shard(url):
                if limit is not None and n >= limit:
                    return
                raw = sample.get("txt")
                caption = raw.decode("utf-8", errors="replace").strip() if isinstance(raw, bytes) else ""
                try:
                    if "__error__" in sample or not caption:
                        raise DataError(sample.get("__error__") or f"no caption in {sample.get('__key__')!r}")
                    image = decode_image(sample)
                except DataError as e:
                    skipped += 1
                    log.warning("--val-data: %s; skipped", e)
                    continue
                n += 1
                yield image, caption
        if skipped:
            log.warning("--val-data %s: %d samples skipped", source, skipped)
    return samples()
