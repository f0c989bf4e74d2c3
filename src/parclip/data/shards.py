"""webdataset shards as img2dataset writes them (``00000.tar`` holding ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` per
sample), for training, poisoning and evaluation.

Sources are named as in open_clip: a path, a brace pattern (``cc3m/{00000..00331}.tar``), a folder of ``.tar`` files,
or several of these joined by ``::``; each shard may also be ``file:PATH``, ``pipe:COMMAND`` (the command writes the
tar to its standard output) or an ``http(s)://`` URL (brace patterns work there too): every shard is opened with
webdataset's own opener (:mod:`.shard_io`). Only the spec the user typed is parsed so: the files a folder holds are
names from data, each one local file whatever it is called (``pipe:x.tar`` in a folder is a file; its absolute path
is what is opened, :func:`~parclip.data.names.local_source`). A local pattern that matches no file is an error that
says so; a remote shard is only known when it is read. A shard's size comes from a ``sizes.json`` beside it (fetched
from the same place for a URL) or, locally, img2dataset's ``*_stats.json``; a ``pipe:`` source has none (pass
``--train-num-samples``).

**Training stream** (:class:`ShardStream`): every shard is read by one reader. The epoch's shards are shuffled (seeded
by seed and epoch), dealt to the ranks round-robin, then to the rank's readers: one per DataLoader worker (the calling
process when there are none), at most as many as the rank has shards (extra workers stay idle, with a warning). A
reader's samples are one deterministic sequence: its shards read in turn (cycling, reshuffled, when it needs more
samples than they hold) through a seeded shuffle buffer, emptied at the end of each pass. The readers take turns
batch by batch (the order in which the DataLoader collects its workers' batches), each for a share of the epoch's
fixed number of batches proportional to the samples its shards hold (sizes known; equal shares otherwise), so an
epoch as large as the data reads every sample exactly once, and every rank yields the same number of batches (DDP
never waits on a rank that ran out). Batch content depends on (seed, epoch, world size, workers); with those the same,
a run resumed at batch b starts exactly there (each reader replays its sequence and skips, read but not decoded, the
batches before b): no sample is repeated or skipped. Augmentation is seeded per (seed, epoch, rank, position).

**Resampled** (``--dataset-resampled``, open_clip's meaning): every reader draws shards with replacement from all the
shards (seeded per seed, epoch, rank and reader), an endless stream cut into epochs of ``--train-num-samples`` (or the
shards' recorded size); any number of shards works with any number of workers. Resuming replays the epoch's draws
from its start and skips the batches already done, so a resumed run sees exactly what the killed run would have seen.

**Bad samples** (an image that does not decode, a sample without image or caption, the rest of a truncated shard, a
``pipe:`` command that fails, a download that fails or stops mid-file): each takes its slot in the sequence (so
positions never shift), is counted and named (``shard.tar #k``, the source as given), and is replaced in its batch by
a good sample of the same batch; above ``--max-bad-fraction`` the training loop stops.

**Evaluation** (:class:`LabelledShards`): clip_benchmark's webdataset layout (``KEY.cls`` label, ``KEY.webp``/``jpg``/
``png`` image, ``classnames.txt`` next to the shards or one folder up, fetched for a URL), indexed once for random
access; a remote shard is copied once into a private temporary folder (removed with the data set) to be indexed.

**Writing** (:func:`write_shards`): ``webdataset.TarWriter``, one atomic file per shard, plus a ``sizes.json``
(open_clip's convention: samples per shard), which lets training know the epoch size without
``--train-num-samples``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ..utils.files import replacing, write_json, write_text
from .captions import CAPTION_KEY, IMG_KEY, DataError, logger
from .labelled import LabelledImages
from .names import local_source, name_part
from .shard_io import beside, finish, is_remote, local_path, open_shard

__all__ = ["is_shard_spec", "expand_urls", "shard_sizes", "known_sizes", "read_shard", "write_shard", "write_shards",
           "ShardStream",
           "table_to_shards", "shards_to_table", "folder_to_shards",
           "LabelledShards", "IMAGE_EXTS", "decode_image"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
SIZES = "sizes.json"


def is_shard_spec(spec: str | os.PathLike | None) -> bool:
    """Whether a data argument names webdataset shards (a .tar path, URL or pattern, a ``pipe:`` command, ``::``-joined
    sources, or a folder holding .tar files)."""
    if spec is None:
        return False
    s = str(spec)
    if ".tar" in s or "::" in s or s.startswith("pipe:"):
        return True
    p = Path(s)
    return p.is_dir() and any(p.glob("*.tar"))


def _expand_one(part: str) -> list[str]:
    from braceexpand import braceexpand

    part = part.strip()
    p = Path(part)
    if "{" not in part and not is_remote(part) and p.is_dir():
        # a folder's files are names from data: each is a local file, whatever its name (pipe:…, a::b, {…})
        tars = [local_source(p, name) for name in sorted(t.name for t in p.glob("*.tar"))]
        if not tars:
            raise DataError(f"{part} is a folder without .tar shards")
        return tars
    try:
        urls = list(braceexpand(part))
    except Exception as e:  # braceexpand raises its own UnbalancedBracesError
        raise DataError(f"{part!r} is not a valid brace pattern: {e}") from e
    local = [u for u in urls if not is_remote(u)]  # a command or a download is only known when it is read
    missing = [u for u in local if not local_path(u).is_file()]
    if local and len(missing) == len(local):
        raise DataError(f"the shard pattern {part!r} matches no file ({len(urls)} names, e.g. {urls[0]}); "
                        f"check the folder and the range")
    if missing:
        raise DataError(f"{len(missing)} of the {len(urls)} shards of {part!r} do not exist, e.g. "
                        f"{', '.join(missing[:3])}")
    return urls


def expand_urls(spec: str | os.PathLike) -> list[str]:
    """The shard sources a spec names (see the module docstring); DataError if a local one is missing."""
    urls = [u for part in str(spec).split("::") if part.strip() for u in _expand_one(part)]
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    return urls


def _name(url: str) -> str:
    """The shard's file name (the last path component of a path or URL; a ``pipe:`` command has none)."""
    return "" if url.startswith("pipe:") else url.rstrip("/").rsplit("/", 1)[-1]


def known_sizes(urls: list[str]) -> dict[str, int]:
    """Samples per shard, where a ``sizes.json`` in the shard's folder (open_clip's convention; fetched from the same
    place for a URL) or, for a local shard, img2dataset's ``NNNNN_stats.json`` ("successes") says it. A ``pipe:``
    source has no folder: its size is unknown."""
    sizes: dict[str, int] = {}
    cache: dict[str, dict] = {}
    for u in urls:
        name = _name(u)
        if not name:
            continue
        folder = u[: len(u) - len(name)]
        if folder not in cache:
            raw = beside(u, SIZES)
            try:
                cache[folder] = json.loads(raw) if raw is not None else {}
            except ValueError:
                cache[folder] = {}
            if not isinstance(cache[folder], dict):
                cache[folder] = {}
        if name in cache[folder]:
            with contextlib.suppress(ValueError, TypeError):
                sizes[u] = int(cache[folder][name])
            continue
        path = local_path(u)
        if path is None or not name.endswith(".tar"):
            continue
        try:
            sizes[u] = int(json.loads(path.with_name(name[:-len(".tar")] + "_stats.json").read_text())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return sizes


def shard_sizes(urls: list[str]) -> int | None:
    """Total samples of the shards (:func:`known_sizes`); None when a shard's size is unknown."""
    sizes = known_sizes(urls)
    return sum(sizes.values()) if len(sizes) == len(urls) else None


def read_shard(url: str, expected: int | None = None) -> Iterator[dict]:
    """The samples of one shard as dicts ``{"__key__", "__url__", "__index__", ext: bytes, ...}`` (grouped by key
    with webdataset's own tar reader), read through ``webdataset.gopen`` (a path, ``pipe:``, a URL). A truncated or
    corrupt shard ends with one ``{"__error__": message}``, and so does one that holds fewer than `expected` samples
    (a tar cut at a member boundary reads as a shorter tar), a command that exits with an error status and a download
    that fails (an HTTP error, a server that closes mid-file). Stopping early closes the source (a command is ended)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def files(stream):
        for f in tar_file_iterator(stream):
            f["__url__"] = url
            yield f

    n, stream, failed = 0, None, None
    try:
        stream = open_shard(url)
        for sample in group_by_keys(files(stream)):
            sample["__index__"] = n
            n += 1
            yield sample
        failed = finish(stream)
        stream = None
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        failed = finish(stream) or f"{type(e).__name__}: {e}"
        stream = None
    finally:
        finish(stream, abandon=True)  # only when the reader stopped early (or a KeyboardInterrupt)
    if failed:
        yield {"__error__": f"{url}: unreadable after {n} samples ({failed})", "__url__": url, "__index__": n}
    elif expected is not None and n < expected:
        yield {"__error__": f"{url}: {n} samples, but its size record says {expected} (a truncated shard?)",
               "__url__": url, "__index__": n}


def decode_image(sample: dict) -> Image.Image:
    """The sample's image as RGB (fully decoded); DataError if it has none or it does not decode."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise DataError(f"no image ({'/'.join(IMAGE_EXTS)}) in sample {sample.get('__key__')!r}; it has "
                        f"{sorted(k for k in sample if not k.startswith('__'))}")
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad data
        raise DataError(f"image of sample {sample.get('__key__')!r} does not decode: {e}") from e


def _caption(sample: dict, key: str) -> str:
    raw = sample.get(key)
    text = raw.decode("utf-8", errors="replace").strip() if isinstance(raw, bytes) else ""
    if not text:
        raise DataError(f"no caption ({key}) in sample {sample.get('__key__')!r}")
    return text


def write_shard(samples: Iterable[dict], path: str | os.PathLike, *, mtime: float | None = None) -> int:
    """Write samples (as :func:`write_shards` takes them) into the one shard ``path``, atomically; returns how many.
    ``mtime``: the members' modification time (default: now; a fixed value makes the tar reproducible byte for byte)."""
    import webdataset as wds

    n = 0
    with replacing(path) as tmp, wds.TarWriter(tmp, mtime=mtime) as sink:
        for sample in samples:
            sink.write(sample)
            n += 1
    return n


def write_shards(samples: Iterable[dict], pattern: str | os.PathLike, *, maxcount: int = 10000) -> list[str]:
    """Write samples (dicts with "__key__" and ext → bytes/str/dict, encoded by ``webdataset.TarWriter``) into shards
    ``pattern % 0, pattern % 1, …`` (e.g. ``out/%05d.tar``) of ``maxcount`` samples, and a ``sizes.json`` beside them;
    returns the shard paths. Each shard is written atomically (:func:`~parclip.utils.files.replacing`), so a killed
    conversion never leaves a short shard under a final name; shards of an earlier, longer run of the same pattern
    are removed."""
    import webdataset as wds

    pattern = str(pattern)
    folder = Path(pattern).parent
    folder.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    written: list[str] = []
    it = iter(samples)
    nxt = next(it, None)
    while nxt is not None or not written:
        path = pattern % len(written)
        n = 0
        with replacing(path) as tmp, wds.TarWriter(tmp) as sink:
            while nxt is not None and n < maxcount:
                sink.write(nxt)
                n += 1
                nxt = next(it, None)
        sizes[Path(path).name] = n
        written.append(path)
    k = len(written)
    while Path(pattern % k).is_file():  # a stale shard of an earlier conversion into this folder
        Path(pattern % k).unlink()
        k += 1
    write_json(folder / SIZES, sizes, indent=1)
    return written


class ShardStream(IterableDataset):
    """The training stream over shards (see the module docstring). Yields ``(images, texts, failed)`` batches:
    ``images``/``texts`` as the CSV loader gives them (a tensor, or a tuple of views), ``failed`` a LongTensor [B] of
    -1 or the id of a bad sample (:meth:`describe` names it). Call :meth:`set_epoch` before iterating.

    `workers`: the DataLoader workers that will iterate it (0: the calling process), one reader ("lane") each;
    `resampled`: shards drawn with replacement (open_clip's ``--dataset-resampled``)."""

    def __init__(self, spec: str, *, transform: Callable, tokenize: Callable, batch_size: int, num_samples: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, shuffle_buffer: int = 1000,
                 caption_key: str = "txt", captions: Callable | None = None, workers: int = 0,
                 resampled: bool = False):
        self.urls = expand_urls(spec)
        self.spec, self.transform, self.tokenize = spec, transform, tokenize
        self.batch_size, self.num_samples = int(batch_size), int(num_samples)
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.shuffle_buffer, self.caption_key = max(1, int(shuffle_buffer)), caption_key.lstrip(".")
        self.captions = captions  # (caption, key) -> (caption, [views]): the defence's caption views
        self.workers, self.resampled = max(0, int(workers)), bool(resampled)
        self.sizes = known_sizes(self.urls)  # to notice a shard cut at a member boundary
        self.lanes = self._count_lanes()
        self.epoch, self.first_batch, self.n_batches = 0, 0, 0

    def _count_lanes(self) -> int:
        """Readers per process: one per DataLoader worker, each with shards of its own (not resampled: at most the
        process's share of shards; workers beyond it stay idle, with a warning)."""
        wanted = max(1, self.workers)
        if self.resampled:
            return wanted
        share = len(self.urls) // self.world_size
        if share == 0:
            raise DataError(f"{self.spec}: {len(self.urls)} shard(s) for {self.world_size} processes; every process "
                            f"needs at least one shard of its own. Split the data into more shards (`parclip data "
                            f"convert --maxcount`), or pass --dataset-resampled (shards drawn with replacement)")
        if share < wanted:
            logger.warning("%s: %d shard(s) for %d process(es) × %d data-loader workers; every shard is read by one "
                           "worker, so only %d worker(s) per process read and the others stay idle. Use --workers %d, "
                           "more shards, or --dataset-resampled", self.spec, len(self.urls), self.world_size, wanted,
                           share, share)
        return min(wanted, share)

    def __len__(self) -> int:
        """Samples per epoch (what the training loop divides into steps)."""
        return self.num_samples

    def set_epoch(self, epoch: int, first_batch: int, n_batches: int) -> None:
        """Batches first_batch … n_batches-1 of `epoch` (a resumed run starts mid-epoch)."""
        self.epoch, self.first_batch, self.n_batches = epoch, first_batch, n_batches

    def describe(self, sample_id: int) -> str:
        return f"{self.urls[sample_id >> 32]} #{sample_id & 0xFFFFFFFF}"

    def lane_shards(self, lane: int) -> list[int]:
        """The shards (indices into ``urls``) reader `lane` of this process reads in the epoch (not resampled): the
        epoch's seeded shuffle of all shards, dealt to the processes, then to the process's readers, round-robin."""
        order = list(range(len(self.urls)))
        random.Random(f"parclip-shards|{self.seed}|{self.epoch}").shuffle(order)
        return order[self.rank::self.world_size][lane::self.lanes]

    def schedule(self) -> list[int]:
        """The reader of each of the epoch's batches: the readers take turns (as the DataLoader takes its workers'
        batches), each for its share of the batches, proportional to the samples of its shards where their sizes
        are known (so an epoch as large as the data reads each sample once), equal otherwise."""
        n, lanes = self.n_batches, self.lanes
        weights = [1] * lanes
        if not self.resampled and lanes > 1:
            held = [[self.sizes.get(self.urls[s]) for s in self.lane_shards(k)] for k in range(lanes)]
            if all(x is not None for h in held for x in h) and sum(map(sum, held)) > 0:
                weights = [sum(h) for h in held]
        total = sum(weights)
        counts = [n * w // total for w in weights]
        by_remainder = sorted(range(lanes), key=lambda k: (-(n * weights[k] % total), k))
        for k in by_remainder[: n - sum(counts)]:
            counts[k] += 1
        order: list[int] = []
        while len(order) < n:
            for k in range(lanes):
                if counts[k]:
                    order.append(k)
                    counts[k] -= 1
        return order

    def _who(self, lane: int) -> str:
        """Reader `lane` of this rank in its seeds (reader 0 seeds as the single reader of a rank did before readers
        were split, so a run without workers keeps its earlier order)."""
        return f"{self.rank}|{lane}" if lane else f"{self.rank}"

    def _passes(self, lane: int) -> Iterator[list[int]]:
        """Reader `lane`'s shards, pass after pass: its own shards (reshuffled from the second pass on), or, resampled,
        ``len(urls)`` shards drawn with replacement from all of them (seeded per seed, epoch, rank and reader)."""
        if self.resampled:
            draw = random.Random(f"parclip-resampled|{self.seed}|{self.epoch}|{self._who(lane)}")
            while True:
                yield [draw.randrange(len(self.urls)) for _ in self.urls]
        mine = self.lane_shards(lane)
        for cycle in range(1 << 30):
            shards = list(mine)
            if cycle:
                random.Random(f"parclip-cycle|{self.seed}|{self.epoch}|{self._who(lane)}|{cycle}").shuffle(shards)
            yield shards

    def _sequence(self, lane: int) -> Iterator[dict]:
        """Reader `lane`'s samples of the epoch, endless, in their deterministic order: its passes over shards through
        a seeded shuffle buffer, emptied at the end of every pass."""
        rng = random.Random(f"parclip-buffer|{self.seed}|{self.epoch}|{self._who(lane)}")
        buffer: list[dict] = []
        for shards in self._passes(lane):
            got = 0
            for s in shards:
                with contextlib.closing(read_shard(self.urls[s], self.sizes.get(self.urls[s]))) as samples:
                    for sample in samples:
                        sample["__shard__"] = s
                        got += 1
                        if len(buffer) < self.shuffle_buffer:
                            buffer.append(sample)
                            continue
                        k = rng.randrange(len(buffer))
                        buffer[k], sample = sample, buffer[k]
                        yield sample
            if not got:
                raise DataError(f"{self.spec}: the {len(shards)} shard(s) of this reader hold no sample")
            while buffer:  # every pass ends with an empty buffer: an epoch of all the samples sees each once
                yield buffer.pop(rng.randrange(len(buffer)))

    def _item(self, sample: dict, position: int):
        """(image views, caption tokens, failed id) of one sample; DataError when it is bad."""
        if "__error__" in sample:
            raise DataError(sample["__error__"])
        caption = _caption(sample, self.caption_key)
        img = decode_image(sample)
        torch.random.default_generator.manual_seed(
            hash((self.seed, self.epoch, self.rank, position)) % (2**63))  # augmentation: same draw on resume
        image = self.transform(img)
        if self.captions is not None:
            caption, views = self.captions(caption, f"{self.urls[sample['__shard__']]}#{sample['__index__']}")
            return image, (self.tokenize(caption), *(self.tokenize(v) for v in views))
        return image, self.tokenize(caption)

    def _batch(self, b: int, samples: list[dict]):
        """Batch `b` of the epoch from its samples: bad ones counted, named and replaced by good ones of the batch."""
        items, failed = [], []
        for k, s in enumerate(samples):
            try:
                items.append(self._item(s, b * self.batch_size + k))
                failed.append(-1)
            except DataError as e:
                items.append(None)
                failed.append((s.get("__shard__", 0) << 32) | s.get("__index__", 0))
                logger.warning("%s; replaced by another sample of its batch", e)
        good = [it for it in items if it is not None]
        if not good:
            raise DataError(f"every sample of a batch is bad (batch {b} of epoch {self.epoch}, {self.spec})")
        items = [it if it is not None else good[k % len(good)] for k, it in enumerate(items)]
        images, texts = default_collate(items)  # tensors, or lists of per-view tensors
        return images, texts, torch.tensor(failed, dtype=torch.long)

    def _lane_batches(self, lane: int, positions: list[int]):
        """Reader `lane`'s batches at `positions` of the epoch; those before ``first_batch`` (a resumed run did them)
        are read but not decoded."""
        if not positions or positions[-1] < self.first_batch:
            return  # nothing of this reader's is left this epoch: nothing to read
        seq = self._sequence(lane)
        try:
            for b in positions:
                samples = [next(seq) for _ in range(self.batch_size)]
                if b >= self.first_batch:
                    yield self._batch(b, samples)
        finally:
            seq.close()  # ends the shard being read (a command or a download is stopped)

    def __iter__(self):
        """The epoch's batches from ``first_batch`` on, in order. In a DataLoader worker: that worker's reader's
        batches only (the DataLoader interleaves its workers in turn, which is the schedule's order); in the calling
        process: every reader's, interleaved by the schedule."""
        order = self.schedule()
        positions: list[list[int]] = [[] for _ in range(self.lanes)]
        for b, lane in enumerate(order):
            positions[lane].append(b)
        info = get_worker_info()
        if info is None:
            readers = [self._lane_batches(k, positions[k]) for k in range(self.lanes)]
            try:
                for b in range(self.first_batch, self.n_batches):
                    yield next(readers[order[b]])
            finally:
                for reader in readers:
                    reader.close()
            return
        if info.num_workers != max(1, self.workers):
            raise DataError(f"this shard stream was set up for {max(1, self.workers)} data-loader workers but runs in "
                            f"{info.num_workers}; pass the same number to both")
        if self.first_batch >= self.n_batches or info.id >= self.lanes:
            return  # nothing left this epoch, or an idle worker (fewer shards than workers)
        # the DataLoader asks its workers in turn from worker 0: worker 0 takes the reader of the first batch
        yield from self._lane_batches((order[self.first_batch] + info.id) % self.lanes,
                                      positions[(order[self.first_batch] + info.id) % self.lanes])


class LabelledShards(LabelledImages):
    """clip_benchmark's webdataset layout as a labelled data set with the interface of
    :class:`~parclip.data.LabelledFolder` (``classnames``, ``samples``, ``targets``, ``load_image``, ``describe``).

    ``spec``: shards (pattern, folder, ``::``-joined; paths, URLs or ``pipe:`` commands, see the module docstring);
    class names from ``classnames`` or a ``classnames.txt`` beside the shards or one folder up (clip_benchmark keeps
    it at the data set's root, the shards in ``test/``), fetched for URLs. A shard that cannot be read (a failed
    command or download too) is counted and named among the bad rows."""

    def __init__(self, spec: str, *, transform: Callable | None = None, classnames=None,
                 label_key: str = "cls", max_bad_fraction: float = 0.01):
        from .captions import BadRows
        from .folder import read_classnames

        self.urls = expand_urls(spec)
        first = local_path(self.urls[0])
        self.root = first.parent if first is not None else self.urls[0][: len(self.urls[0]) - len(_name(self.urls[0]))]
        self.transform, self.layout, self.imagenet_indices = transform, "webdataset", None
        self._copies: str | None = None  # private folder of the remote shards' local copies
        if classnames is None:
            found = [raw for up in (0, 1) if (raw := beside(self.urls[0], "classnames.txt", up=up)) is not None]
            if not found:
                raise DataError(f"no classnames.txt beside {self.urls[0]} or one folder up (clip_benchmark's layout); "
                                f"pass --classnames FILE")
            classnames = [c.strip() for c in found[0].decode("utf-8").splitlines() if c.strip()]
        self.classnames = (read_classnames(classnames) if isinstance(classnames, (str, os.PathLike))
                           else [str(c) for c in classnames])
        self.bad_rows = BadRows(str(spec), unit="samples")
        self.samples: list[tuple[str, int]] = []  # ("shard.tar #k", label)
        self._where: list[tuple[str, str, int, int]] = []  # (shard, image member, offset, size)
        for url in self.urls:
            self._index(url, label_key)
        if not self.samples:
            raise DataError(f"no labelled samples in {spec}: {self.bad_rows}")
        self.bad_rows.check(max_bad_fraction)
        self.targets = [label for _, label in self.samples]

    def _index(self, url: str, label_key: str) -> None:
        from webdataset.tariterators import base_plus_ext  # the key/extension split webdataset itself uses

        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            path = self._local_copy(url)
            with tarfile.open(path) as tar:
                for m in tar:
                    key, ext = base_plus_ext(m.name) if m.isreg() else (None, None)
                    if key is not None:
                        members.setdefault(key, {})[ext.lower()] = m
                labels = {k: tar.extractfile(v[label_key]).read() for k, v in members.items() if label_key in v}
        except (tarfile.TarError, OSError, EOFError) as e:
            self.bad_rows.examined += 1
            self.bad_rows.add(None, url, "unreadable shard", str(e))
            return
        for k, (key, parts) in enumerate(members.items()):
            self.bad_rows.examined += 1
            ext = next((e for e in IMAGE_EXTS if e in parts), None)
            try:
                label = int(labels[key].decode().strip())
            except (KeyError, ValueError, UnicodeDecodeError):
                self.bad_rows.add(None, f"{url} {key}", f"no integer label ({label_key})")
                continue
            if ext is None:
                self.bad_rows.add(None, f"{url} {key}", "no image")
                continue
            if not 0 <= label < len(self.classnames):
                raise DataError(f"{url} {key}: label {label} but {len(self.classnames)} class names")
            m = parts[ext]
            self.samples.append((f"{url} #{k}", label))
            self._where.append((str(path), ext, m.offset_data, m.size))

    def _local_copy(self, url: str) -> Path:
        """The shard as a local file (random access): itself, or for a remote source (``pipe:``, a URL) a copy read
        once through :func:`~.shard_io.open_shard` into a private temporary folder, removed with this object. OSError
        naming the failure when the copy fails (a command's exit status, an HTTP error)."""
        path = local_path(url)
        if path is not None:
            return path
        if self._copies is None:
            self._copies = tempfile.mkdtemp(prefix="parclip-eval-shards-")
            weakref.finalize(self, _remove_copies, self._copies, os.getpid())
        path = Path(self._copies) / f"{len(os.listdir(self._copies)):06d}.tar"
        stream = None
        try:
            stream = open_shard(url)
            with replacing(path) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(stream, out)
                failed = finish(stream)
                stream = None
                if failed:
                    raise OSError(failed)
        finally:
            finish(stream, abandon=True)
        return path

    def describe(self, i: int) -> str:
        return self.samples[i][0]

    def load_image(self, i: int) -> Image.Image:
        url, ext, offset, size = self._where[i]
        with open(url, "rb") as f:
            f.seek(offset)
            raw = f.read(size)
        return decode_image({ext: raw, "__key__": self.samples[i][0]})

    def __repr__(self) -> str:
        return f"LabelledShards({len(self.urls)} shards, {len(self)} images, {len(self.classnames)} classes)"


def _remove_copies(folder: str, owner: int) -> None:
    """Remove the private copies of remote shards, in the process that made them (not in a forked DataLoader worker
    that inherited the object)."""
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def table_to_shards(table: str | os.PathLike, out_dir: str | os.PathLike, *, img_key: str = IMG_KEY,
                    caption_key: str = CAPTION_KEY, sep: str | None = None, root: str | os.PathLike | None = None,
                    maxcount: int = 10000, max_bad_fraction: float = 0.01) -> dict:
    """A caption table as shards ``out_dir/00000.tar …`` (img2dataset's layout: ``KEY.<image ext>`` with the file's
    own bytes, ``KEY.txt``, ``KEY.json`` with the source row) plus ``sizes.json``. Rows whose image is missing or
    empty are counted and left out up to ``max_bad_fraction``. Returns {"shards", "n_samples", "bad_rows"}."""
    from .captions import BadRows, check_row, read_table_lines

    table = Path(table)
    _, rows, lines, _ = read_table_lines(table, sep=sep, columns=(img_key, caption_key))
    root_abs = os.path.abspath(Path(root) if root is not None else table.parent)
    bad = BadRows(str(table))
    kept = []
    for line, row in zip(lines, rows):
        bad.examined += 1
        rel, full, caption = check_row(row, line, img_key, caption_key, root_abs, bad)
        if full is None:
            continue
        path, caption = Path(full), caption.strip()
        ext = path.suffix.lower().lstrip(".")
        if path.stat().st_size == 0:
            bad.add(line, rel, "empty image file")
        elif ext not in IMAGE_EXTS:
            bad.add(line, rel, f"not an image extension ({'/'.join(IMAGE_EXTS)})")
        else:
            kept.append((line, rel, path, ext, caption, row))
    if not kept:
        raise DataError(f"no usable rows in {table}: {bad}")
    bad.check(max_bad_fraction)
    width = max(9, len(str(len(kept))))

    def samples():
        for k, (line, rel, path, ext, caption, row) in enumerate(kept):
            yield {"__key__": f"{k:0{width}d}", "jpg" if ext == "jpeg" else ext: path.read_bytes(), "txt": caption,
                   "json": {"source": str(table), "line": line, "image": rel,
                            **{c: v for c, v in row.items() if c not in (img_key, caption_key)}}}

    shards = write_shards(samples(), Path(out_dir) / "%05d.tar", maxcount=maxcount)
    return {"shards": shards, "n_samples": len(kept), "bad_rows": bad}


def shards_to_table(spec: str, out_dir: str | os.PathLike, *, caption_key: str = "txt") -> dict:
    """Shards as a caption table: every image extracted to ``out_dir/images/SSSSS_KEY.<ext>`` (``SSSSS`` the shard's
    number; bytes unchanged) and ``out_dir/captions.csv`` (the default table layout: tab-separated, filepath and
    title). A key is a name from data: it is one file name part (:func:`~parclip.data.names.name_part`: ``a/../x``
    becomes ``a_.._x``), and a key met twice gets ``~1``, ``~2`` … so no image overwrites another. Bad samples (no
    image, no caption, a truncated shard) are counted and left out. Returns {"table", "n_samples", "bad"}."""
    from .captions import write_table

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, bad, written = [], [], set()
    for s_i, url in enumerate(expand_urls(spec)):
        for sample in read_shard(url):
            if "__error__" in sample:
                bad.append(sample["__error__"])
                continue
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            try:
                caption = _caption(sample, caption_key.lstrip("."))
            except DataError as e:
                bad.append(str(e))
                continue
            if ext is None:
                bad.append(f"{url}: sample {sample['__key__']!r} has no image")
                continue
            stem = f"images/{s_i:05d}_{name_part(sample['__key__'])}"  # a key is a name from data
            name, again = f"{stem}.{ext}", 1
            while name in written:  # a key twice in a shard, or two that differ in a '/' only: one file each
                name, again = f"{stem}~{again}.{ext}", again + 1
            written.add(name)
            with replacing(out / name) as tmp:
                Path(tmp).write_bytes(sample[ext])
            rows.append({IMG_KEY: name, CAPTION_KEY: caption})
    if not rows:
        raise DataError(f"no usable samples in {spec}")
    write_table(out / "captions.csv", [IMG_KEY, CAPTION_KEY], rows)
    for b in bad[:5]:
        logger.warning("left out: %s", b)
    return {"table": out / "captions.csv", "n_samples": len(rows), "bad": bad}


def folder_to_shards(folder: str | os.PathLike, out_dir: str | os.PathLike, *, maxcount: int = 10000) -> dict:
    """A labelled folder (``root/<class>/*``, ImageNet layouts included) in clip_benchmark's webdataset layout:
    ``out_dir/test/00000.tar …`` with ``KEY.cls`` (the label) and ``KEY.<ext>`` (the file's bytes), and
    ``out_dir/classnames.txt``. Returns {"shards", "n_samples", "classnames"}."""
    from .folder import LabelledFolder

    src = LabelledFolder(folder)
    broken = [c for c in src.classnames if c.splitlines() != [c]]  # a folder name is a name from data
    if broken:
        raise DataError(f"class {broken[0]!r} of {folder} holds a line break, but classnames.txt holds one name per "
                        f"line (every later class would be read with the wrong name); rename that class folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "classnames.txt", "".join(f"{c}\n" for c in src.classnames))

    def samples():
        for k, (path, label) in enumerate(src.samples):
            ext = Path(path).suffix.lower().lstrip(".")
            yield {"__key__": f"s{k:08d}", "jpg" if ext == "jpeg" else ext: Path(path).read_bytes(), "cls": str(label)}

    shards = write_shards(samples(), out / "test" / "%05d.tar", maxcount=maxcount)
    return {"shards": shards, "n_samples": len(src), "classnames": src.classnames}
