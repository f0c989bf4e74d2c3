"""A `diffusers <https://huggingface.co/docs/diffusers>`_ text-to-image pipeline as a generator: kind ``diffusers``.

``diffusers:PATH`` loads the pipeline saved in the local folder ``PATH`` (``DiffusionPipeline.from_pretrained(PATH,
local_files_only=True)``: a folder with ``model_index.json``, e.g. Stable Diffusion, SD-Turbo, PixArt, saved with
``save_pretrained`` or downloaded with ``huggingface-cli download``); nothing is fetched, and a folder whose
``model_index.json`` names code from outside diffusers and transformers (a custom pipeline) is refused, never
imported. It is text-conditional: the caption is the prompt. diffusers (and transformers, which its text encoders
need) is an optional dependency: ``pip install parclip[synth]``.

Options (``load_generator("diffusers:PATH", **options)``; on the command line ``--generator-option KEY=VALUE``, and
``--device``): ``device`` (``auto``: cuda when there is one, else cpu), ``dtype`` (``auto``: float16 on cuda, float32
on cpu; ``float32``, ``float16``, ``bfloat16``), ``steps`` (num_inference_steps; default: the pipeline's), ``guidance``
(guidance_scale; default: the pipeline's), ``height`` and ``width`` (the size generated at; default: the pipeline's),
``negative_prompt``.

Seeding: every image gets its own CPU ``torch.Generator`` seeded with its seed, so its initial noise (and any noise a
sampler draws) depends on that seed only; the batch is one pipeline call. The same device, dtype and batch make the
same bytes; a GPU may round differently from a CPU, so the manifest records device and dtype and a resumed run must
use the same ones. Output is checked for non-finite values before it is turned into 8-bit images (a float16 VAE that
overflowed is an error, not a black image).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..data.captions import DataError
from .base import Generator, GeneratorError, Prompt, image_from_array, register_generator

__all__ = ["DiffusersGenerator", "folder_sha256"]

INSTALL = "pip install parclip[synth]  (diffusers and transformers)"
OPTIONS = ("device", "dtype", "steps", "guidance", "height", "width", "negative_prompt")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise RuntimeError(f"the diffusers generator needs the diffusers package, which is not installed: {INSTALL}"
                           ) from e
    return diffusers


def folder_sha256(folder: str | os.PathLike) -> str:
    """sha256 over every file of ``folder`` (its path relative to the folder and its sha256, sorted by path): the
    weights and configs of a pipeline, whatever their format."""
    from ..utils.files import sha256_file

    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _refuse_custom_code(folder: Path, diffusers) -> None:
    """A pipeline folder is data: its ``model_index.json`` may only name diffusers' and transformers' own classes
    (a component as ``[library, class]`` with library ``diffusers``, ``transformers``, one of diffusers' pipeline
    modules such as ``stable_diffusion``, or none). A custom pipeline (``_class_name`` as ``[module, class]``:
    diffusers would import ``module.py`` from the folder) or a component of another library (older diffusers import
    it by name, from the working folder too) is a DataError before diffusers reads the folder, whatever the installed
    diffusers would do."""
    import json

    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{index_file} is not readable JSON ({e})") from e
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        found = index.get("_class_name") if isinstance(index, dict) else index
        raise DataError(f"{index_file}: _class_name {found!r} is not one of diffusers' pipeline classes (a custom "
                        f"pipeline: loading it would run Python code from the folder); parclip loads pipelines made "
                        f"of diffusers' and transformers' own classes only")

    def own(library) -> bool:
        return library in (None, "diffusers", "transformers") or (
            isinstance(library, str) and library.isidentifier() and hasattr(diffusers.pipelines, library))

    foreign = [f"{key}: {value}" for key, value in index.items() if not key.startswith("_")
               and isinstance(value, (list, tuple)) and (not value or not own(value[0]))]
    if foreign:
        raise DataError(f"{index_file} names components from outside diffusers and transformers ({'; '.join(foreign)})"
                        f", which loading would import and run; parclip loads pipelines made of diffusers' and "
                        f"transformers' own classes only. Load a pipeline you trust with diffusers yourself and save "
                        f"it with save_pretrained")


def _int_option(options: dict, key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DataError(f"diffusers option {key}={value!r}: expected a whole number") from None
    if number < 1:
        raise DataError(f"diffusers option {key}={number}: must be >= 1")
    return number


def _settings(options: dict) -> dict:
    """The options checked and typed (strings from the command line included)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DataError(f"diffusers: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    dtype = str(options.get("dtype") or "auto")
    if dtype not in DTYPES:
        raise DataError(f"diffusers option dtype={dtype!r}: one of {', '.join(DTYPES)}")
    guidance = options.get("guidance")
    if guidance is not None:
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise DataError(f"diffusers option guidance={guidance!r}: expected a number") from None
    return {"device": str(options.get("device") or "auto"), "dtype": dtype, "steps": _int_option(options, "steps"),
            "guidance": guidance, "height": _int_option(options, "height"), "width": _int_option(options, "width"),
            "negative_prompt": options.get("negative_prompt")}


@register_generator
class DiffusersGenerator(Generator):
    """A diffusers text-to-image pipeline loaded from a local folder (see the module docstring)."""

    kind = "diffusers"
    conditioning = "text"

    def __init__(self, pipeline, path: Path, settings: dict, sha256: str):
        self.pipeline, self.path, self.settings, self.sha256 = pipeline, path, settings, sha256

    @classmethod
    def load(cls, argument: str, **options) -> DiffusersGenerator:
        import torch

        settings = _settings(options)
        path = Path(argument).expanduser()
        if not (path / "model_index.json").is_file():
            raise DataError(f"diffusers:{argument}: not a saved diffusers pipeline (a folder with model_index.json); "
                            f"save one with pipeline.save_pretrained(PATH) or download it with "
                            f"`huggingface-cli download REPO --local-dir PATH`")
        diffusers = _diffusers()
        _refuse_custom_code(path, diffusers)
        device = settings["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = settings["dtype"]
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True)
        except ImportError as e:
            raise RuntimeError(f"diffusers:{argument} needs a package that is not installed ({e}): {INSTALL}") from e
        except (OSError, ValueError) as e:
            raise DataError(f"diffusers:{argument}: the pipeline does not load: {e}") from e
        pipe = pipe.to(device, getattr(torch, dtype))  # (the dtype keyword of from_pretrained changed its name)
        pipe.set_progress_bar_config(disable=True)
        settings.update(device=str(torch.device(device).type), dtype=dtype)
        return cls(pipe, path.resolve(), settings, folder_sha256(path))

    def generate(self, prompts: Sequence[Prompt], seeds: Sequence[int]) -> list[Image.Image]:
        import torch

        s = self.settings
        kw = {k: v for k, v in (("num_inference_steps", s["steps"]), ("guidance_scale", s["guidance"]),
                                ("height", s["height"]), ("width", s["width"])) if v is not None}
        if s["negative_prompt"] is not None:
            kw["negative_prompt"] = [s["negative_prompt"]] * len(prompts)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
        with torch.inference_mode():
            result = self.pipeline(prompt=[p.caption for p in prompts], generator=generators, output_type="np", **kw)
        images = []
        for j, array in enumerate(result.images):
            try:
                images.append(image_from_array(array, index=j))
            except GeneratorError as e:
                hint = " (float16 overflow? try --generator-option dtype=float32)" if s["dtype"] == "float16" else ""
                raise GeneratorError(f"{e}{hint}", j) from e
        return images

    def describe(self) -> dict:
        import diffusers

        return {"kind": self.kind, "path": str(self.path), "pipeline": type(self.pipeline).__name__,
                "sha256": self.sha256, "diffusers_version": diffusers.__version__, **self.settings}
