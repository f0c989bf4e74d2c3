"""Write synthetic image–caption pairs: prompts in, a caption table (or webdataset shards) of generated images out,
seeded, resumable, with a manifest of what made them.

Output folder ``OUT``:

* ``OUT/images/CCCCC/IIIIIIII.png`` (image ``I`` of chunk ``C``) and ``OUT/synthetic.csv``: parclip's default table
  layout (open_clip_train's: tab-separated, columns ``filepath`` and ``title``; plus ``label`` and ``classname`` when
  the prompts have classes), paths relative to ``OUT``. ``parclip train --train-data OUT/synthetic.csv`` reads it.
* or, with ``shards=True``: ``OUT/shards/CCCCC.tar`` (one shard per chunk: ``KEY.png``, ``KEY.txt``, ``KEY.json``)
  and ``OUT/shards/sizes.json``; ``parclip train --train-data OUT/shards`` reads them.
* ``OUT/manifest.json``: the settings that determine the output (the generator's ``describe()``, the seed, the
  caption source with its checksum, the templates, counts, chunk and batch sizes, image size), the parclip version,
  and the chunks committed so far.

**Seeding.** Image ``i`` is made under :func:`image_seed` ``(seed, i)`` from prompt ``i``; the template of a class-name
prompt is drawn from ``(seed, i)`` too. Nothing depends on a global random state.

**Chunks, resume.** The images are made in chunks of ``chunk_size`` (in batches of ``batch_size``). A chunk is
generated and checked whole, then its images (or its shard) are written atomically, then the manifest records the
chunk: that write is the commit. A run stopped at any moment (an error, a full disk, a kill) keeps its committed
chunks (a kill may leave a hidden ``.NAME.RANDOM.tmp`` file, removed when the run is resumed); running it again with
the same arguments makes the remaining chunks, and the result is byte for byte what an uninterrupted run writes. A
committed chunk whose files have gone is made again. The table (or ``sizes.json``) is written when every chunk is
done. Running into a folder that holds a manifest with different settings is an error that lists the differences
(paths are not compared: a moved caption file with the same checksum is the same source); one run per folder at a
time.

**Checks.** An image that is not an image, has non-finite values (reported by the generator) or is constant (every
pixel the same: a collapsed generator) stops the run with the prompt's index and caption; nothing of its chunk is
written. A full disk (``ENOSPC``) stops it with what was kept and how to continue.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .. import __version__
from ..data.captions import CAPTION_KEY, IMG_KEY, DataError, logger, write_table
from ..data.shards import SIZES, write_shard
from ..utils.files import replacing, sha256_file, write_json
from ..utils.progress import progress_bar
from .base import Generator, GeneratorError, Prompt

__all__ = ["synthesize", "image_seed", "SynthesisError", "TABLE", "MANIFEST", "FORMAT"]

TABLE, MANIFEST, IMAGES, SHARDS = "synthetic.csv", "manifest.json", "images", "shards"
FORMAT = "parclip-synth/1"


class SynthesisError(RuntimeError):
    """A synthesis run stopped: a generator that collapsed, a full disk. The message says what was kept."""


def image_seed(seed: int, i: int) -> int:
    """The seed of image ``i`` of a run seeded ``seed``: 63 bits of sha256("parclip-synth:seed:i")."""
    digest = hashlib.sha256(f"parclip-synth:{int(seed)}:{int(i)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ------------------------------------------------------------------------------------------------ settings, manifest
def settings_of(generator: Generator, source: dict, *, seed: int, n_images: int, chunk_size: int, batch_size: int,
                shards: bool, image_size: int | None) -> dict:
    """What determines the output's bytes, compared when a run is resumed."""
    return {"generator": generator.describe(), "source": source, "seed": int(seed), "n_images": int(n_images),
            "chunk_size": int(chunk_size), "batch_size": int(batch_size), "output": "shards" if shards else "table",
            "image_size": image_size}


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            if k != "path":  # where a file lies is not what it is: checksums are compared
                out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _short(v) -> str:
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def differences(old: dict, new: dict) -> list[str]:
    """``key: old → new`` for every setting that differs (nested keys dotted; ``path`` keys ignored)."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {_short(a.get(k))} → {_short(b.get(k))}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def _check_chunks(path: Path, manifest: dict, settings: dict) -> None:
    """The committed chunks of a manifest to resume are the ones these settings make: chunk ``k`` starts at image
    ``k × chunk_size`` and holds ``min(chunk_size, n - first)`` images, each chunk once. The manifest is data (the
    chunks name the files kept and the sizes written): anything else is a DataError, never a file name or a count
    taken on trust."""
    n, size = settings["n_images"], settings["chunk_size"]
    chunks = manifest.get("chunks")
    seen = set()
    for c in chunks if isinstance(chunks, list) else [None]:
        k = c.get("chunk") if isinstance(c, dict) else None
        ok = (type(k) is int and 0 <= k * size < n and k not in seen and c.get("first") == k * size
              and c.get("count") == min(size, n - k * size) and isinstance(c.get("sha256"), str))
        if not ok:
            raise DataError(f"{path}: the committed chunk {_short(c)} is not one these settings make ({n} images in "
                            f"chunks of {size}); the manifest was changed or is corrupt: write into another folder")
        seen.add(k)
    if not isinstance(manifest.get("complete"), bool):
        raise DataError(f"{path}: 'complete' is not true or false; the manifest was changed or is corrupt: write into "
                        f"another folder")


def _open_manifest(out: Path, settings: dict, paths: dict) -> dict:
    """The manifest of a run in ``out``: the one there (same settings), or a new one for an empty folder."""
    path = out / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise DataError(f"{path} is not a readable synthesis manifest ({e}); use another output folder") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
                or not isinstance(manifest.get("settings"), dict):
            raise DataError(f"{path} is not a synthesis manifest ({FORMAT}); use another output folder")
        diff = differences(manifest["settings"], json.loads(json.dumps(settings)))
        if diff:
            raise DataError(f"{out} holds a synthesis run with other settings; resuming needs the same arguments. "
                            f"Differences (before → now): " + "; ".join(diff) + ". Rerun with the first run's "
                            f"arguments, or write into another folder.")
        _check_chunks(path, manifest, settings)
        manifest["paths"] = paths
        return manifest
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output folder {out} is not empty and holds no {MANIFEST}: choose a new or empty folder")
    return {"format": FORMAT, "parclip_version": __version__, "settings": settings, "paths": paths,
            "chunks": [], "complete": False, "outputs": {}}


# ---------------------------------------------------------------------------------------------------------- one chunk
def _image_name(i: int, chunk_size: int) -> str:
    return f"{IMAGES}/{i // chunk_size:05d}/{i:08d}.png"


def _shard_name(k: int) -> str:
    return f"{SHARDS}/{k:05d}.tar"


def _check(images, prompts: Sequence[Prompt], first: int, image_size: int | None) -> list[Image.Image]:
    """The batch's images as RGB at ``image_size``; a SynthesisError naming the prompt for a wrong count, a non-image
    or a constant image."""
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
        n = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
        raise SynthesisError(f"the generator returned {n} images for {len(prompts)} prompts "
                             f"(prompts {first}..{first + len(prompts) - 1})")
    out = []
    for j, (im, p) in enumerate(zip(images, prompts)):
        if not isinstance(im, Image.Image):
            raise SynthesisError(f"the generator returned a {type(im).__name__}, not a PIL image, for prompt "
                                 f"{first + j} ({p.caption!r})")
        im = im.convert("RGB")
        if image_size is not None and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BICUBIC)
        a = np.asarray(im)
        if a.size == 0 or (a == a.reshape(-1, 3)[0]).all():
            pixel = tuple(int(v) for v in a.reshape(-1, 3)[0]) if a.size else None
            raise SynthesisError(f"the generator made a constant image (every pixel {pixel}) for prompt {first + j} "
                                 f"({p.caption!r}): it has collapsed (broken or untrained weights, a wrong dtype, too "
                                 f"few steps). Nothing of this chunk was written; fix the generator and rerun.")
        out.append(im)
    return out


def _generate(generator: Generator, prompts: Sequence[Prompt], first: int, seed: int, batch_size: int,
              image_size: int | None) -> list[Image.Image]:
    """The images of prompts ``first, first+1, …`` (``prompts`` is that slice), made in batches and checked."""
    images: list[Image.Image] = []
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        start = first + b
        try:
            made = generator.generate(batch, [image_seed(seed, start + j) for j in range(len(batch))])
        except GeneratorError as e:
            where = (f"prompt {start + e.index} ({batch[e.index].caption!r})" if e.index is not None
                     and 0 <= e.index < len(batch) else f"prompts {start}..{start + len(batch) - 1}")
            raise SynthesisError(f"{where}: {e}. The generator has collapsed or diverged (broken weights, a wrong "
                                 f"dtype); nothing of this chunk was written.") from e
        images += _check(made, batch, start, image_size)
    return images


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")  # not-atomic: into memory; the file is written by _write
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        Path(tmp).write_bytes(data)


def _commit_chunk(out: Path, k: int, first: int, images: list[Image.Image], prompts: Sequence[Prompt],
                  chunk_size: int, seed: int, shards: bool) -> str:
    """Write chunk ``k``'s images (files or one shard), each atomically; the sha256 over their PNG bytes."""
    pngs = [_png(im) for im in images]
    digest = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pngs)).hexdigest()
    if shards:
        samples = [{"__key__": f"{first + j:08d}", "png": png, "txt": p.caption,
                    "json": {"index": first + j, "seed": image_seed(seed, first + j), "label": p.label,
                             "classname": p.classname}} for j, (png, p) in enumerate(zip(pngs, prompts))]
        write_shard(samples, out / _shard_name(k), mtime=0)  # reproducible: a resumed run writes the same bytes
    else:
        for j, png in enumerate(pngs):
            _write(out / _image_name(first + j, chunk_size), png)
    return digest


def _chunk_present(out: Path, entry: dict, chunk_size: int, shards: bool) -> bool:
    if shards:
        return (out / _shard_name(entry["chunk"])).is_file()
    first, count = entry["first"], entry["count"]
    return all((out / _image_name(i, chunk_size)).is_file() for i in range(first, first + count))


# ------------------------------------------------------------------------------------------------------------ the run
def _disk_full(out: Path, e: OSError, what: str, manifest: dict, n_images: int) -> SynthesisError:
    done = sum(c["count"] for c in manifest["chunks"])
    return SynthesisError(f"the disk is full ({e.strerror or e}) while writing {what} into {out}: the {done} of "
                          f"{n_images} images of the {len(manifest['chunks'])} committed chunks are kept (nothing "
                          f"half-written is counted). Free space and run the same command again: it continues after "
                          f"the last committed chunk.")


def _table_rows(prompts: Sequence[Prompt], chunk_size: int) -> tuple[list[str], list[dict]]:
    with_classes = len(prompts) > 0 and prompts[0].classname is not None
    fields = [IMG_KEY, CAPTION_KEY] + (["label", "classname"] if with_classes else [])
    rows = []
    for i in range(len(prompts)):
        p = prompts[i]
        row = {IMG_KEY: _image_name(i, chunk_size), CAPTION_KEY: p.caption}
        if with_classes:
            row.update(label=p.label, classname=p.classname)
        rows.append(row)
    return fields, rows


def _finish(out: Path, manifest: dict, prompts: Sequence[Prompt], chunk_size: int, shards: bool) -> None:
    """Write the table (or the shards' sizes.json), then mark the manifest complete."""
    if shards:
        n_chunks = len(manifest["chunks"])
        write_json(out / SHARDS / SIZES, {Path(_shard_name(c["chunk"])).name: c["count"] for c in manifest["chunks"]},
                   indent=1)
        last = f"{n_chunks - 1:05d}"
        manifest["outputs"] = {"shards": f"{SHARDS}/{{00000..{last}}}.tar", "sizes": f"{SHARDS}/{SIZES}"}
    else:
        fields, rows = _table_rows(prompts, chunk_size)
        write_table(out / TABLE, fields, rows)
        manifest["outputs"] = {"table": TABLE, "table_sha256": sha256_file(out / TABLE)}
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)


def synthesize(out: str | os.PathLike, generator: Generator, prompts: Sequence[Prompt], source: dict, *,
               seed: int = 0, chunk_size: int = 1000, batch_size: int = 16, shards: bool = False,
               image_size: int | None = None, paths: dict | None = None, progress: bool = True) -> dict:
    """Generate one image per prompt into ``out`` (layout, seeding, resume and checks: the module docstring) and
    return the manifest. ``source``: what the prompts were made from, recorded and compared on resume (a ``path`` key
    is recorded, not compared). ``paths``: where the inputs lie, recorded only."""
    out = Path(out)
    n = len(prompts)
    if n == 0:
        raise DataError("no prompts: nothing to synthesize")
    if chunk_size < 1 or batch_size < 1:
        raise DataError(f"chunk_size and batch_size must be >= 1, got {chunk_size} and {batch_size}")
    if generator.conditioning == "class" and prompts[0].label is None:
        raise DataError(f"the {generator.kind} generator is class-conditional: every prompt needs a class label")
    settings = settings_of(generator, source, seed=seed, n_images=n, chunk_size=chunk_size, batch_size=batch_size,
                           shards=shards, image_size=image_size)
    manifest = _open_manifest(out, settings, paths or {})
    for stale in out.rglob(".*.tmp") if out.is_dir() else ():  # a killed run's unfinished file (utils.files' names)
        stale.unlink()
    n_chunks = -(-n // chunk_size)
    kept = [c for c in manifest["chunks"] if _chunk_present(out, c, chunk_size, shards)]
    if len(kept) < len(manifest["chunks"]):
        lost = sorted({c["chunk"] for c in manifest["chunks"]} - {c["chunk"] for c in kept})
        logger.warning("%s: committed chunk(s) %s have missing files; they are made again", out, lost)
    manifest["chunks"] = kept
    done = {c["chunk"] for c in kept}
    if manifest["complete"] and len(done) < n_chunks:
        manifest["complete"] = False
    write_json(out / MANIFEST, manifest)  # the folder is this run's from now on
    bar = progress_bar(total=n, initial=sum(c["count"] for c in kept), desc="synthesizing", unit="img",
                       min_total=0 if progress else n + 1)
    try:
        for k in range(n_chunks):
            if k in done:
                continue
            first, count = k * chunk_size, min(chunk_size, n - k * chunk_size)
            chunk = prompts[first:first + count]
            images = _generate(generator, chunk, first, seed, batch_size, image_size)
            try:
                digest = _commit_chunk(out, k, first, images, chunk, chunk_size, seed, shards)
                manifest["chunks"] = sorted([*manifest["chunks"], {"chunk": k, "first": first, "count": count,
                                                                    "sha256": digest}], key=lambda c: c["chunk"])
                write_json(out / MANIFEST, manifest)  # the commit
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    manifest["chunks"] = [c for c in manifest["chunks"] if c["chunk"] != k]
                    raise _disk_full(out, e, f"chunk {k}", manifest, n) from e
                raise
            bar.update(count)
    finally:
        bar.close()
    try:
        _finish(out, manifest, prompts, chunk_size, shards)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(out, e, "the table", manifest, n) from e
        raise
    return manifest
