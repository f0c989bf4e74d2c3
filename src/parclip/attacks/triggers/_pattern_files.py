"""Safe reading of user-supplied pattern files (the Blended-Text mask, the WaNet grid), for ``text`` and ``wanet``.

Accepted, chosen by the file's extension (case-insensitive):

* ``.npy``: ``numpy.load(allow_pickle=False)`` (object arrays are refused);
* ``.safetensors``: ``safetensors.torch.load_file``;
* ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(map_location="cpu", weights_only=True)`` **only**: a file that pickles
  anything besides tensors and plain containers is refused before any of its code can run (a ``ValueError`` whose
  message says why). The reference's own ``.pt`` pattern files are plain tensors and load this way.

A file may hold one tensor, or a mapping/sequence whose tensors are looked up by ``preferred_keys`` (otherwise it
must hold exactly one). PNG masks are read by :mod:`parclip.attacks.triggers.text` itself (a picture, not an array).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import pickle
import warnings

import numpy as np
import torch

__all__ = ["TENSOR_SUFFIXES", "load_tensor_file", "tensor_sha256"]

TENSOR_SUFFIXES = (".npy", ".safetensors", ".pt", ".pth", ".bin")


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's values as contiguous little-endian float32 bytes, independent of its strides and of
    the file format it came from."""
    a = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()).astype("<f4", copy=False)
    return hashlib.sha256(a.tobytes()).hexdigest()


def _pick(obj, path: pathlib.Path, what: str, preferred_keys: tuple[str, ...]) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        for k in preferred_keys:
            if isinstance(obj.get(k), (torch.Tensor, np.ndarray)):
                return _pick(obj[k], path, what, preferred_keys)
        items = [v for v in obj.values() if isinstance(v, (torch.Tensor, np.ndarray))]
    elif isinstance(obj, (list, tuple)):
        items = [v for v in obj if isinstance(v, (torch.Tensor, np.ndarray))]
    else:
        items = []
    if len(items) != 1:
        keys = f" (keys: {sorted(map(str, obj))})" if isinstance(obj, dict) else ""
        raise ValueError(f"{path}: expected the {what} as a single tensor (or under one of the keys "
                         f"{list(preferred_keys)}), found {len(items)} tensors in a {type(obj).__name__}{keys}")
    return _pick(items[0], path, what, preferred_keys)


def load_tensor_file(path: str | os.PathLike, what: str, preferred_keys: tuple[str, ...] = ()) -> torch.Tensor:
    """Read one tensor from ``path`` (``.npy``, ``.safetensors`` or a weights-only torch file), on CPU.

    ``what`` names the content in error messages. Missing files, unknown extensions, unreadable files and files that
    would need to run code to load raise ``ValueError`` (``FileNotFoundError`` for a missing file).
    """
    p = pathlib.Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            obj = np.load(p, allow_pickle=False)
        except ValueError as e:  # object arrays need pickle: refused
            raise ValueError(f"refusing to read {p}: it is not a plain numeric .npy array ({e})") from e
        except Exception as e:
            raise ValueError(f"cannot read {p} as a .npy array ({type(e).__name__}: {e})") from e
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(p))
        except Exception as e:
            raise ValueError(f"cannot read {p} as safetensors ({type(e).__name__}: {e})") from e
    elif suffix in (".pt", ".pth", ".bin"):
        import zipfile

        from ...models.checkpoints import CheckpointError, verify_zip

        if zipfile.is_zipfile(p):
            try:
                verify_zip(p)  # torch does not check the entries' CRCs: damaged values would load silently
            except CheckpointError as e:
                raise ValueError(str(e)) from e
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"refusing to read {p}: it is not a plain tensor file and loading it would unpickle arbitrary Python "
                f"objects (which can run code). Only torch.load(weights_only=True) is used; re-save the {what} as a "
                f"plain tensor (torch.save(tensor, ...)), a .npy or a .safetensors file on a machine you trust."
            ) from e
        except Exception as e:
            raise ValueError(f"cannot read {p} as a torch tensor file ({type(e).__name__}: {e})") from e
    else:
        raise ValueError(f"{p}: unsupported {what} file type {suffix or '(none)'!r}; accepted: "
                         f"{', '.join(TENSOR_SUFFIXES)}")
    t = _pick(obj, p, what, preferred_keys)
    if not (t.dtype.is_floating_point or t.dtype in (torch.uint8, torch.bool)):
        raise ValueError(f"{p}: the {what} must be a float (or uint8) tensor, got {t.dtype}")
    return t.detach().cpu()
