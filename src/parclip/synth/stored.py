"""How a trained generator is stored: its tensors as safetensors, its settings as JSON, nothing that runs code.

A generator folder holds ``generator.json`` (kind, format version, the family's settings, class names, the weights
file's name and sha256) beside ``generator.safetensors``. Generator files are untrusted input: the weights are read
only as safetensors (a pickle or a torch.save archive is refused with the reason, never unpickled), their checksum
must match the JSON, every tensor must be finite and the tensors must be exactly the ones the family expects.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from parclip.utils.files import atomic_write, sha256_file, write_json

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "FORMAT_VERSION", "GeneratorFileError", "save_generator_files",
           "read_generator_files", "resolve_generator_dir"]

CONFIG_FILE = "generator.json"
WEIGHTS_FILE = "generator.safetensors"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class GeneratorFileError(ValueError):
    """A generator folder that cannot be loaded: missing, of another kind, not safetensors, corrupt, tampered."""


def save_generator_files(out_dir: str | os.PathLike, kind: str, tensors: dict[str, torch.Tensor],
                         config: dict) -> Path:
    """Write ``tensors`` (safetensors) and ``config`` (JSON, with the weights' sha256) to ``out_dir``; the JSON is
    written last, so a folder with a JSON is complete. Returns the folder."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    atomic_write(weights, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                                tmp))
    write_json(out / CONFIG_FILE, {"kind": kind, "format_version": FORMAT_VERSION, "config": config,
                                   "weights": WEIGHTS_FILE, "sha256": sha256_file(weights)})
    return out


def resolve_generator_dir(path: str | os.PathLike) -> Path:
    """The generator folder ``path`` names (the folder itself or its ``generator.json``)."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == CONFIG_FILE:
        p = p.parent
    if not (p / CONFIG_FILE).is_file():
        raise GeneratorFileError(f"{path}: not a generator folder (no {CONFIG_FILE}); train one with "
                                 f"parclip.synth.train_generator or benchmarks/synth_quality.py")
    return p


def _check_safetensors(path: Path) -> None:
    """Refuse anything but a safetensors file, by content: 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER:
        return  # (a header length whose first byte is 0x80 is still safetensors: this check comes first)
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise GeneratorFileError(f"{path} is a pickle / torch.save archive, not safetensors: parclip never unpickles "
                                 f"generator weights (they could run code); store them with "
                                 f"safetensors.torch.save_file")
    raise GeneratorFileError(f"{path} is not a safetensors file (bad header); the file may be truncated or of "
                             f"another format")


def read_generator_files(path: str | os.PathLike, kind: str,
                         expected: Callable[[dict], dict[str, tuple[int, ...]]] | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """``(tensors, config, folder)`` of the generator folder ``path``, checked: its JSON names ``kind`` and this
    format version, its weights are safetensors whose sha256 matches the JSON, finite, and (with ``expected``: the
    config -> {name: shape}) exactly the tensors expected."""
    from safetensors.torch import load_file
    folder = resolve_generator_dir(path)
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GeneratorFileError(f"{folder / CONFIG_FILE}: unreadable JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        got = meta.get("kind") if isinstance(meta, dict) else None
        raise GeneratorFileError(f"{folder}: a generator of kind {got!r}, not {kind!r}; load it as {got}:{folder}")
    if meta.get("format_version") != FORMAT_VERSION or not isinstance(meta.get("config"), dict):
        raise GeneratorFileError(f"{folder / CONFIG_FILE}: format version {meta.get('format_version')!r} or config "
                                 f"missing; this parclip reads version {FORMAT_VERSION}")
    weights = folder / WEIGHTS_FILE
    if meta.get("weights") != WEIGHTS_FILE or not weights.is_file():
        raise GeneratorFileError(f"{folder}: weights file {WEIGHTS_FILE} missing")
    _check_safetensors(weights)
    if sha256_file(weights) != meta.get("sha256"):
        raise GeneratorFileError(f"{weights}: sha256 differs from the one in {CONFIG_FILE} (changed or corrupt)")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise GeneratorFileError(f"cannot read {weights} as safetensors ({e})") from e
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise GeneratorFileError(f"{weights}: non-finite values in {', '.join(sorted(bad))}")
    if expected is not None:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        try:
            want = {k: tuple(s) for k, s in expected(meta["config"]).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise GeneratorFileError(f"{folder / CONFIG_FILE}: config incomplete or malformed ({e!r})") from e
        if shapes != want:
            diff = sorted(set(shapes.items()) ^ set(want.items()))
            raise GeneratorFileError(f"{weights}: tensors differ from what {kind} expects: {diff[:6]}")
    return tensors, meta["config"], folder
