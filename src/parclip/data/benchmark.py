"""clip_benchmark's data sets by name: where ``clip_benchmark eval --dataset NAME --dataset_root ROOT`` keeps them on
disk, which of those layouts parclip reads, and clip_benchmark's JSON files of templates and class names.

``ROOT`` is the ``--dataset_root`` template with ``{dataset}`` (and ``{dataset_cleaned}``, ``/`` shown as ``-``)
replaced by the name without a ``wds/`` prefix, as clip_benchmark fills it (literally here, never ``str.format``).
The layouts parclip reads, with the split (``--split``, default ``test``):

====================  =================================================================================================
``wds/NAME``          ``ROOT/<split>/*.tar`` (``nshards.txt`` names ``0.tar`` … if present), ``ROOT/classnames.txt``,
                      ``ROOT/zeroshot_classification_templates.txt``; ``ROOT/dataset_type.txt`` = ``retrieval``: image +
                      ``KEY.txt`` captions (one per line) for retrieval
``imagenet1k``        ``ROOT/val/<wnid>/*`` (torchvision's ImageNet layout; ``train`` for the train split)
``imagenet1k-unverified``  ``ROOT/val/<wnid>/*`` likewise
``imagenetv2``        ``ROOT/ImageNetV2-matched-frequency/<0..999>/*``
``imagenet_sketch``, ``imagenet-a``, ``imagenet-r``, ``imagenet-o``  ``ROOT/<wnid>/*``
``mscoco_captions``   ``ROOT/val2014/*`` (``train2014`` for train) + ``ROOT/coco_<split>_karpathy.json`` (COCO captions
                      format: ``images`` with ``id``/``file_name``, ``annotations`` with ``image_id``/``caption``)
``flickr30k``, ``flickr8k``  ``ROOT/*.jpg`` + ``ROOT/flickr30k_<split>_karpathy.txt`` (a header line, then
                      ``NAME.jpg,caption`` per line)
====================  =================================================================================================

The ImageNet sets get the 1000 ImageNet class names of open_clip (the ones clip_benchmark ships for ``imagenet1k``)
through the WordNet-id folders, and the 80 OpenAI templates (clip_benchmark's fallback for every data set without its
own). Every other name clip_benchmark knows sits on disk in a format only its own loaders read (torchvision or
TensorFlow downloads, with class names and templates inside its package); :func:`locate` refuses it with the command
that exports it into the ``wds/`` layout. A name whose layout is known but absent says where it looked and where the
data comes from. Captions of clip_benchmark's retrieval sets are used as they are (clip_benchmark does not clean them).
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .captions import DataError
from .retrieval import RetrievalSet, group_pairs, read_retrieval

__all__ = ["BenchmarkSet", "locate", "expand_dataset_names", "dataset_root", "short_name", "keyed_json_value",
           "open_retrieval", "CLASSIFICATION", "RETRIEVAL", "TASKS", "REFUSED_TASKS"]

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
#: the --task values parclip runs ("auto": the data set's own)
TASKS = ("auto", CLASSIFICATION, RETRIEVAL)
#: clip_benchmark's other tasks, and why parclip does not run them
REFUSED_TASKS = {
    "linear_probe": "parclip measures zero-shot accuracy and backdoor success; it trains no linear probes",
    "captioning": "parclip evaluates contrastive CLIP models, which write no captions",
    "image_caption_selection": "parclip has no image-caption selection (SugarCrepe / Winoground) metric",
}
_RETRIEVAL_NAMES = {"mscoco_captions", "flickr30k", "flickr8k", "multilingual_mscoco_captions", "flickr30k-200",
                    "crossmodal3600", "xtd10", "xtd200"}
_SELECTION_NAMES = {"winoground"}
_COLLECTIONS = {"retrieval": ["mscoco_captions", "flickr8k", "flickr30k"],
                "imagenet_robustness": ["imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "objectnet"]}
# names clip_benchmark reads from torchvision / TensorFlow downloads: parclip reads them once exported to wds/
_FOREIGN = {"cifar10", "cifar100", "imagenet-w", "babel_imagenet", "objectnet", "voc2007", "voc2007_multilabel",
            "food101", "sun397", "cars", "fgvc_aircraft", "dtd", "pets", "caltech101", "flowers", "mnist", "stl10",
            "eurosat", "gtsrb", "country211", "pcam", "renderedsst2", "fer2013", "multilingual_mscoco_captions",
            "crossmodal3600", "xtd10", "xtd200", "flickr30k-200", "dummy"}
_HENDRYCKS = "https://people.eecs.berkeley.edu/~hendrycks/{}.tar"
_ANNOTATIONS = "https://github.com/mehdidc/retrieval_annotations/releases/download/1.0.0/{}"
# name -> (the folder under ROOT for the split, what it holds, where the data comes from)
_IMAGENET = {
    "imagenet1k": ("{split}", "ImageNet: one folder per WordNet id",
                   "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from https://image-net.org (an account "
                   "is needed); torchvision.datasets.ImageNet(ROOT, split='val') sorts them into ROOT/val/<wnid>/"),
    "imagenet1k-unverified": ("{split}", "ImageNet: one folder per WordNet id",
                              "ImageNet as for imagenet1k, sorted into ROOT/val/<wnid>/"),
    "imagenetv2": ("ImageNetV2-matched-frequency", "ImageNet-V2: folders 0 … 999",
                   "https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/"
                   "imagenetv2-matched-frequency.tar.gz, unpacked and renamed to ROOT/ImageNetV2-matched-frequency"),
    "imagenet_sketch": ("", "ImageNet-Sketch: one folder per WordNet id",
                        "ImageNet-Sketch.zip (Google Drive id 1Mj0i5HBthqH1p_yeXzsg22gZduvgoNeA, e.g. with gdown); "
                        "its folder sketch/ becomes ROOT"),
    **{name: ("", f"{name}: one folder per WordNet id", f"{_HENDRYCKS.format(name)}, unpacked; its folder {name}/ "
              f"becomes ROOT") for name in ("imagenet-a", "imagenet-r", "imagenet-o")},
}


@dataclass(frozen=True)
class BenchmarkSet:
    """One clip_benchmark data set found on disk: ``name`` as given (``wds/cifar10``), its ``task`` (the data set's
    own, clip_benchmark's ``--task auto``), ``path`` (classification: a labelled folder or a shard pattern; retrieval:
    the annotation file or the shard pattern), ``image_root`` (retrieval images), ``format`` (``folder``, ``shards``,
    ``coco``, ``flickr``, ``karpathy``), and the data set's own ``templates`` / ``classnames`` when it brings them
    (a ``wds/`` set), else None; ``templates`` may be a template set name (``openai``)."""

    name: str
    task: str
    path: str
    format: str
    image_root: str | None = None
    templates: list[str] | str | None = None
    classnames: list[str] | None = None


def short_name(name: str) -> str:
    """The name without clip_benchmark's ``wds/`` prefix (what fills ``{dataset}`` in its root and file names)."""
    return name[len("wds/"):] if name.startswith("wds/") else name


def dataset_root(template: str, name: str) -> Path:
    """``--dataset_root`` for data set `name`: ``{dataset}`` and ``{dataset_cleaned}`` filled literally."""
    short = short_name(name)
    return Path(template.replace("{dataset}", short).replace("{dataset_cleaned}", short.replace("/", "-")))


def expand_dataset_names(names: list[str]) -> list[str]:
    """clip_benchmark's ``--dataset`` values as data set names: a text file gives one name per line, ``retrieval`` and
    ``imagenet_robustness`` their members; the VTAB and SugarCrepe collections are refused (parclip reads none of
    their members)."""
    out: list[str] = []
    for name in names:
        if Path(name).is_file():
            out += [line.strip() for line in Path(name).read_text(encoding="utf-8").splitlines() if line.strip()]
        elif name in _COLLECTIONS:
            out += _COLLECTIONS[name]
        elif name in ("vtab", "vtab+", "sugar_crepe"):
            raise DataError(f"--dataset {name}: a clip_benchmark collection of TensorFlow / SugarCrepe data sets, "
                            f"which parclip does not read; export the members you need with clip_benchmark_export_wds "
                            f"and name them wds/NAME")
        else:
            out.append(name)
    return out


def _export_hint(name: str, root: Path, split: str) -> str:
    return (f"export it once into clip_benchmark's webdataset layout with its own tool, `clip_benchmark_export_wds "
            f"--dataset {name} --dataset-root {root} --split {split} --output OUT/{name}` (add --retrieval for a "
            f"retrieval set), then pass --dataset wds/{name} --dataset_root 'OUT/{{dataset}}'")


def locate(name: str, root_template: str = "root", split: str = "test",
           annotation_file: str | None = None) -> BenchmarkSet:
    """Data set `name` under ``--dataset_root`` `root_template` (see the module docstring); DataError naming the path
    tried and where the data comes from when it is not there, or the export command for a layout parclip does not
    read."""
    root = dataset_root(root_template, name)
    if name.startswith("wds/"):
        return _locate_wds(name, root, split)
    if name in _IMAGENET:
        sub, holds, source = _IMAGENET[name]
        path = root / sub.replace("{split}", "train" if split == "train" else "val")
        if not path.is_dir():
            raise DataError(f"--dataset {name}: no {holds} at {path}. Get {source.replace('ROOT', str(root))} (or let "
                            f"clip_benchmark download it: `clip_benchmark eval --dataset {name} --dataset_root "
                            f"{root}`)")
        return BenchmarkSet(name, CLASSIFICATION, str(path), "folder", templates="openai")
    if name in ("mscoco_captions", "flickr30k", "flickr8k"):
        return _locate_captions(name, root, split, annotation_file)
    if name.startswith(("sugar_crepe", "winoground")) or name in _SELECTION_NAMES:
        raise DataError(f"--dataset {name}: an image_caption_selection set; "
                        f"{REFUSED_TASKS['image_caption_selection']}")
    if name in _FOREIGN or name.startswith(("tfds/", "vtab/")):
        raise DataError(f"--dataset {name}: clip_benchmark reads it from a torchvision / TensorFlow download with "
                        f"class names and templates inside its package, which parclip does not read; "
                        f"{_export_hint(name, root, split)}")
    raise DataError(f"--dataset {name}: not a clip_benchmark data set name; for your own data pass --data PATH (a "
                    f"labelled folder or clip_benchmark shards), or wds/NAME for shards under --dataset_root")


def _locate_wds(name: str, root: Path, split: str) -> BenchmarkSet:
    folder = root / split
    tars = sorted(folder.glob("*.tar")) if folder.is_dir() else []
    if not tars:
        raise DataError(f"--dataset {name}: no shards at {folder} (clip_benchmark's webdataset layout: "
                        f"ROOT/{split}/0.tar …, ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt). "
                        f"Make it with `parclip data convert LABELLED_FOLDER {root}` or "
                        f"`clip_benchmark_export_wds --dataset NAME --output {root}`, or download a published copy "
                        f"(e.g. https://huggingface.co/clip-benchmark/wds_{short_name(name).replace('/', '-')})")
    spec = _wds_spec(folder, len(tars))
    kind = (root / "dataset_type.txt").read_text().strip().lower() if (root / "dataset_type.txt").is_file() else ""
    if kind == "retrieval":
        return BenchmarkSet(name, RETRIEVAL, spec, "shards")
    if kind == "multilabel":
        raise DataError(f"--dataset {name}: a multi-label set (dataset_type.txt says multilabel); parclip's zero-shot "
                        f"accuracy and ASR are single-label (clip_benchmark reports mean average precision there)")

    def lines(file: str):
        p = root / file
        return [t.strip() for t in p.read_text(encoding="utf-8").splitlines() if t.strip()] if p.is_file() else None
    return BenchmarkSet(name, CLASSIFICATION, spec, "shards", templates=lines("zeroshot_classification_templates.txt"),
                        classnames=lines("classnames.txt"))


def _wds_spec(folder: Path, n_tars: int) -> str:
    """The shard source of a ``wds/`` split folder: the folder itself (its files are listed as local files, whatever
    their names: :func:`~parclip.data.names.local_source`; never joined into a spec that is parsed again), or, with an
    ``nshards.txt``, ``0.tar`` … ``N-1.tar`` in that order, where N must be a whole number from 1 to the number of
    ``.tar`` files there."""
    from .shard_io import is_remote

    if "::" in str(folder) or "{" in str(folder) or is_remote(str(folder)):
        raise DataError(f"the shard folder {folder} would be read as a source list, pattern, command or URL (it holds "
                        f"'::', '{{' or a scheme, from --dataset_root or the data set name); rename or move it")
    nshards = folder / "nshards.txt"
    if not nshards.is_file():
        return str(folder)
    text = nshards.read_text(encoding="utf-8", errors="replace").strip()
    if not text.isdecimal() or not 1 <= int(text) <= n_tars:
        raise DataError(f"{nshards} says {text[:40]!r}, but it must hold the number of shards 0.tar … N-1.tar, a "
                        f"whole number from 1 to the {n_tars} .tar files in {folder}; fix it or remove it (the "
                        f"folder's .tar files are then read in name order)")
    return str(folder / f"{{0..{int(text) - 1}}}.tar")


def _locate_captions(name: str, root: Path, split: str, annotation_file: str | None) -> BenchmarkSet:
    if name == "mscoco_captions":
        images = root / ("train2014" if split == "train" else "val2014")
        ann = Path(annotation_file or root / f"coco_{split}_karpathy.json")
        get_images = f"http://images.cocodataset.org/zips/{images.name}.zip, unzipped into {root}"
    else:
        images = root
        ann = Path(annotation_file or root / f"{name}_{split}_karpathy.txt")
        kaggle = "hsankesara/flickr-image-dataset" if name == "flickr30k" else "adityajn105/flickr8k"
        get_images = f"the images from Kaggle (`kaggle datasets download -d {kaggle}`), moved to {root}"
    if not images.is_dir() or not ann.is_file():
        missing = images if not images.is_dir() else ann
        raise DataError(f"--dataset {name}: {missing} not found. Get {get_images}, and the annotation file "
                        f"{_ANNOTATIONS.format(ann.name)} into {ann.parent} (or let clip_benchmark download both: "
                        f"`clip_benchmark eval --dataset {name} --dataset_root {root}`)")
    fmt = "coco" if name == "mscoco_captions" else "flickr"
    if ann.suffix.lower() == ".json" and fmt == "coco" and isinstance(json.loads(ann.read_text()), list):
        fmt = "karpathy"  # a BLIP-style list given as --annotation_file
    return BenchmarkSet(name, RETRIEVAL, str(ann), fmt, image_root=str(images))


def open_retrieval(data: BenchmarkSet) -> RetrievalSet:
    """The images and captions of a located retrieval set, captions as they are (clip_benchmark's use)."""
    if data.format == "shards":
        return _shard_captions(data.path)
    if data.format == "karpathy":
        return read_retrieval(data.path, root=data.image_root, clean=False)
    path = Path(data.path)
    if data.format == "coco":
        try:
            ann = json.loads(path.read_text(encoding="utf-8"))
            files = {im["id"]: im["file_name"] for im in ann["images"]}
            pairs = [(files[a["image_id"]], str(a["caption"])) for a in ann["annotations"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a COCO captions file (images with id/file_name, annotations with "
                            f"image_id/caption): {e!r}") from e
    else:
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()[1:], 2):  # a header line first
            image, sep, caption = line.strip().partition(".jpg,")
            if line.strip() and not sep:
                raise DataError(f"{path}, line {n}: expected NAME.jpg,caption")
            if sep:
                pairs.append((image + ".jpg", caption))
    return group_pairs(pairs, Path(data.image_root), clean=False, source=str(path))


class _ShardImages(RetrievalSet):
    """A retrieval set whose images are members of tar shards, read by offset."""

    def __init__(self, where: list[tuple[str, str, int, int]], captions, owner, source: str):
        super().__init__([Path(f"{u} #{k}") for k, (u, *_) in enumerate(where)], captions, owner, source=source)
        self.where = where

    def load_image(self, i: int):
        from .shards import decode_image

        url, ext, offset, size = self.where[i]
        with open(url, "rb") as f:
            f.seek(offset)
            return decode_image({ext: f.read(size), "__key__": str(self.images[i])})


def _shard_captions(spec: str) -> RetrievalSet:
    """clip_benchmark's retrieval shards: per sample an image and ``KEY.txt`` with one caption per line."""
    from webdataset.tariterators import base_plus_ext

    from .shards import IMAGE_EXTS, expand_urls

    where, captions, owner = [], [], []
    for url in expand_urls(spec):
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(url) as tar:
            for m in tar:
                key, ext = base_plus_ext(m.name) if m.isreg() else (None, None)
                if key is not None:
                    members.setdefault(key, {})[ext.lower()] = m
            for key, parts in members.items():
                ext = next((e for e in IMAGE_EXTS if e in parts), None)
                if ext is None or "txt" not in parts:
                    raise DataError(f"{url}: sample {key!r} lacks an image or its .txt captions")
                texts = [t.strip() for t in tar.extractfile(parts["txt"]).read().decode().splitlines() if t.strip()]
                captions += texts
                owner += [len(where)] * len(texts)
                where.append((url, ext, parts[ext].offset_data, parts[ext].size))
    if not where:
        raise DataError(f"no samples in {spec}")
    return _ShardImages(where, captions, owner, source=spec)


def keyed_json_value(path: str | os.PathLike, name: str, what: str, *, fallback: str | None = None):
    """The entry for data set `name` in a clip_benchmark JSON file keyed by data set (``--custom_template_file``,
    ``--custom_classname_file``): under the full name, then the name without its ``wds/`` / ``vtab/`` / ``tfds/``
    prefix, then `fallback` (clip_benchmark's ``imagenet1k`` for templates); DataError when none is there."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} not found (clip_benchmark also looks inside its own package for a bare "
                        f"name such as cupl_prompts.json; give the path of a copy)")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a JSON file: {e}") from e
    if not isinstance(table, dict):
        raise DataError(f"{path}: expected a JSON object keyed by data set name (clip_benchmark's layout)")
    keys = [name, name.split("/", 1)[1] if "/" in name else name] + ([fallback] if fallback else [])
    for key in keys:
        if key in table:
            return table[key]
    raise DataError(f"{path} has no {what} for {name!r} (looked for the keys {', '.join(dict.fromkeys(keys))})")
