"""Safe, strict checkpoint reading: models are untrusted input.

* formats are recognised by content, not by name: torch.save zip or legacy pickle, safetensors, TorchScript archives,
  and open_clip ``local-dir:`` folders (``open_clip_config.json`` + a weights file);
* nothing is unpickled beyond torch's ``weights_only`` allow-list plus ``argparse.Namespace`` (PAR's training
  checkpoints store theirs); a refused pickle is scanned statically (nothing executed) so the error names the globals
  it would have imported; TorchScript and arbitrary pickles load only with ``allow_unsafe_load=True``;
* the CleanCLIP/PAR release layout ``{"state_dict": {"module.<key>": ...}}`` is unwrapped, non-weight entries dropped;
* loading is strict: a missing, unexpected or mis-shaped key is a :class:`CheckpointMismatchError` that names the
  architectures the checkpoint does fit, never a silently random model;
* a NaN or Inf in any floating-point tensor is a :class:`NonFiniteWeightsError` naming the tensors: such a model
  computes NaN logits, and every score read from them would be meaningless. Every way weights enter parclip (a file,
  a ``local-dir:`` folder, an open_clip tag through the cache, ``load_state_dict``) reads them here.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections.abc import Mapping

import torch

from ..utils.files import sha256_file
from .architectures import LOCAL_DIR_PREFIX, matching_architectures

__all__ = [
    "CheckpointError", "UnsafeCheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError",
    "NonFiniteWeightsError", "load_state_dict", "load_weights", "check_state_dict", "check_finite", "nonfinite_tensors",
    "read_local_dir_config", "local_dir", "find_dir_weights", "uses_quick_gelu", "weights_sha256", "verify_zip",
    "LOCAL_DIR_PREFIX", "CONFIG_FILE", "WEIGHTS_FILE", "DIR_WEIGHTS",
]

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

# Weights files open_clip looks for in a local-dir folder, in its order of preference.
DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")
# Keys in checkpoints that are not weights: the causal-mask buffer and OpenAI JIT attributes.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")
# Harmless classes that legitimate checkpoints pickle: PAR's training checkpoints store their argparse Namespace.
_SAFE_GLOBALS = [argparse.Namespace]

_UNSAFE_ADVICE = ("parclip refuses to run code from a checkpoint. Convert it to safetensors on a trusted machine "
                  "(torch.load(..., weights_only=False), then safetensors.torch.save_file(state_dict, ...)), or pass "
                  "--allow-unsafe-load (allow_unsafe_load=True) if you trust this file.")


class CheckpointError(ValueError):
    """A checkpoint or model folder cannot be used (unreadable, unknown format, wrong layout)."""


class UnsafeCheckpointError(CheckpointError):
    """Loading the checkpoint would execute code from it (pickled globals, TorchScript)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not fit the model. Attributes: ``missing``, ``unexpected``, ``mismatched``."""

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file or model folder does not exist."""


class NonFiniteWeightsError(CheckpointError):
    """The checkpoint holds NaN or Inf values. Attribute: ``tensors``, the names of the non-finite tensors."""

    def __init__(self, message: str, *, tensors=()):
        super().__init__(message)
        self.tensors = list(tensors)


def local_dir(name: str) -> pathlib.Path | None:
    return pathlib.Path(name[len(LOCAL_DIR_PREFIX):]) if name.startswith(LOCAL_DIR_PREFIX) else None


def read_local_dir_config(folder: pathlib.Path) -> dict:
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"model folder not found: {folder} (from 'local-dir:{folder}')")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} is not an open_clip model folder: {CONFIG_FILE} is missing. A 'local-dir:' "
                              f"folder needs {CONFIG_FILE} ({{\"model_cfg\": ..., \"preprocess_cfg\": ...}}) and a "
                              f"weights file such as {WEIGHTS_FILE}.")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise CheckpointError(f"{cfg_path} has no 'model_cfg' object; expected "
                              f"{{\"model_cfg\": {{embed_dim, vision_cfg, text_cfg, ...}}, \"preprocess_cfg\": {{...}}}}")
    model_cfg = cfg["model_cfg"]
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise CheckpointError(f"{cfg_path}: model_cfg lacks {missing}")
    if not isinstance(cfg.get("preprocess_cfg", {}), dict):
        raise CheckpointError(f"{cfg_path}: 'preprocess_cfg' must be an object")
    return cfg


def weights_sha256(model: str, pretrained: str | None = None) -> str | None:
    """The sha256 of the weights a model spec reads: the ``pretrained`` file, or a ``local-dir:`` folder's weights
    file; None for a name or tag with nothing local to hash. Recorded in results, so a number names its checkpoint."""
    folder = local_dir(model)
    path = pathlib.Path(pretrained) if pretrained else (find_dir_weights(folder) if folder else None)
    return sha256_file(path) if path is not None and path.is_file() else None


def find_dir_weights(folder: pathlib.Path) -> pathlib.Path | None:
    for fname in DIR_WEIGHTS:
        if (folder / fname).is_file():
            return folder / fname
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth", "*.pt") for p in folder.glob(ext))
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------------------------------------------------
# reading checkpoints
# --------------------------------------------------------------------------------------------------------------------
def _allowed_global_names() -> set[str]:
    names = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
    try:  # torch's default weights_only allow-list (private; only used to word the error message)
        from torch import _weights_only_unpickler as wou
        names |= set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())
    except Exception:  # pragma: no cover - torch internals moved
        pass
    return names


def _pickle_globals(data: bytes, max_pickles: int = 8) -> list[str]:
    """Globals a pickle stream would import, found statically (nothing is executed)."""
    found, memo, strings = [], {}, []
    f = io.BytesIO(data)
    for _ in range(max_pickles):
        if f.tell() >= len(data):
            break
        top = None  # the string on top of the stack, if the last opcode pushed one
        try:
            for op, arg, _ in pickletools.genops(f):
                n = op.name
                pushed = None
                if n in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif n == "STACK_GLOBAL":
                    found.append(f"{strings[-2]}.{strings[-1]}" if len(strings) >= 2 else "<unknown global>")
                elif n in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                           "BINSTRING", "STRING"):
                    pushed = arg if isinstance(arg, str) else str(arg)
                elif n in ("BINGET", "LONG_BINGET", "GET"):
                    v = memo.get(arg)
                    pushed = v if isinstance(v, str) else None
                elif n in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = top
                    pushed = top
                elif n == "MEMOIZE":
                    memo[len(memo)] = top
                    pushed = top
                if pushed is not None and n not in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                    strings.append(pushed)
                top = pushed
        except Exception:
            break  # raw tensor bytes after the pickles of the legacy format, or a corrupt stream
    return list(dict.fromkeys(found))


def _unsafe_globals(path: pathlib.Path, is_zip: bool) -> list[str]:
    allowed = _allowed_global_names()
    if is_zip:
        try:
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                return list(dict.fromkeys(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))))
        except Exception:
            try:
                with zipfile.ZipFile(path) as zf:
                    data = b"".join(zf.read(n) for n in zf.namelist() if n.endswith("data.pkl"))
            except Exception:
                return []
    else:
        data = path.read_bytes()
    return [g for g in _pickle_globals(data) if g not in allowed]


def _sniff(path: pathlib.Path) -> str:
    """'safetensors', 'torchscript', 'torch-zip', 'pickle' or 'unknown', from the file's content."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + n <= size:
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path} is a truncated or corrupt zip archive ({e}); expected a torch checkpoint "
                                  f"saved with torch.save") from e
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") or "/code/" in n or n.startswith("code/")
               for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        raise CheckpointError(f"{path} is a zip archive but not a torch checkpoint (no data.pkl; e.g. a NumPy .npz). "
                              f"Expected a torch.save checkpoint or a safetensors file.")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    return "unknown"


def _resolve_path(path) -> pathlib.Path:
    s = os.fspath(path)
    if s.startswith(LOCAL_DIR_PREFIX):
        s = s[len(LOCAL_DIR_PREFIX):]
    p = pathlib.Path(s)
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        w = find_dir_weights(p)
        if w is None:
            raise CheckpointError(f"{p} is a folder without a recognisable weights file (expected {WEIGHTS_FILE} or "
                                  f"one of {', '.join(DIR_WEIGHTS[1:])}); pass the weights file itself.")
        return w
    return p


def verify_zip(path: str | os.PathLike) -> None:
    """A torch.save zip whose entries fail their CRC check (a damaged download or disk) is a CheckpointError; torch
    itself does not check them and would load the damaged values."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable zip archive ({e}); the file may be truncated") from e
    except Exception as e:  # zlib.error and others from a damaged deflate stream
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e})") from e
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: its entry {bad!r} fails its checksum (a damaged download or "
                              f"copy); download or copy it again")


def _torch_load(path: pathlib.Path, kind: str, allow_unsafe_load: bool):
    if kind == "torch-zip":
        verify_zip(path)
    if allow_unsafe_load:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {e}); the file may "
                                  f"be truncated or not a torch.save file") from e
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        bad = _unsafe_globals(path, kind == "torch-zip")
        if bad:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it pickles Python objects that would be imported and may run code on "
                f"load: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}. {_UNSAFE_ADVICE}") from e
        first = str(e).strip().splitlines()
        detail = next((ln for ln in reversed(first) if ln.strip() and "documentation" not in ln), "")
        raise CheckpointError(f"cannot read {path} safely as a torch checkpoint ({detail.strip()}). It may be "
                              f"truncated or corrupt, or a raw pickle rather than a torch.save file. If you trust it: "
                              f"--allow-unsafe-load (allow_unsafe_load=True).") from e
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise UnsafeCheckpointError(f"refusing to load {path}: it is a TorchScript archive, which can run code "
                                        f"when loaded. {_UNSAFE_ADVICE}") from e
        raise CheckpointError(f"cannot read {path} as a torch checkpoint ({e}); the file may be truncated or "
                              f"corrupt") from e
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {e}); the file may be "
                              f"truncated or corrupt") from e


def _read_checkpoint(path, allow_unsafe_load: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint file into a cleaned state dict, plus facts about it (``format``, ``release_layout``)."""
    p = _resolve_path(path)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty; expected a torch checkpoint or a safetensors file")
    kind = _sniff(p)
    info = {"format": kind, "release_layout": False, "path": str(p)}
    if kind == "unknown":
        with open(p, "rb") as f:
            head = f.read(16)
        hint = " (the name says safetensors but the header is not a valid safetensors header; truncated?)" \
            if p.suffix == ".safetensors" else ""
        raise CheckpointError(f"{p} is neither a torch checkpoint (torch.save zip or pickle) nor a safetensors file"
                              f"{hint}; first bytes: {head!r}")
    if kind == "safetensors":
        from safetensors.torch import load_file
        try:
            obj = load_file(str(p), device="cpu")
        except Exception as e:
            raise CheckpointError(f"cannot read {p} as safetensors ({e}); the file may be truncated or corrupt") from e
    elif kind == "torchscript":
        if not allow_unsafe_load:
            raise UnsafeCheckpointError(
                f"refusing to load {p}: it is a TorchScript archive (e.g. an OpenAI JIT .pt), which contains code that "
                f"runs when loaded. {_UNSAFE_ADVICE}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch >= 2.14
                obj = torch.jit.load(str(p), map_location="cpu").state_dict()
        except Exception as e:
            raise CheckpointError(f"cannot read TorchScript archive {p}: {e}") from e
    else:
        obj = _torch_load(p, kind, allow_unsafe_load)

    if isinstance(obj, torch.nn.Module):  # a pickled or scripted module (only reachable with allow_unsafe_load)
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state dict or a dict with 'state_dict'")
    if "state_dict" in obj:
        sd = obj["state_dict"]
        if isinstance(sd, torch.nn.Module):
            sd = sd.state_dict()
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{p}: 'state_dict' entry is a {type(sd).__name__}, not a mapping of tensors")
        info["release_layout"] = True
    else:
        sd = obj
    if not any(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(obj.keys())[:10]
        raise CheckpointError(f"{p} holds no tensors where weights were expected (top-level keys: {keys}); expected "
                              f"a state dict or {{'state_dict': {{...}}}}")

    clean = {}
    prefixed = 0
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{p}: state dict key {k!r} is not a string")
        if k.startswith("module."):
            k = k[len("module."):]
            prefixed += 1
        if k in _NON_WEIGHT_KEYS or k == "attn_mask" or k.endswith(".attn_mask"):
            continue
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{p}: entry {k!r} is a {type(v).__name__}, not a tensor")
        clean[k] = v
    info["module_prefix"] = prefixed > 0
    info["release_layout"] = info["release_layout"] and prefixed > 0
    if not clean:
        raise CheckpointError(f"{p} holds no weights")
    check_finite(clean, source=str(p))
    return clean, info


def nonfinite_tensors(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point (or complex) tensors of ``sd`` that hold a NaN or an Inf, in ``sd``'s order."""
    return [k for k, v in sd.items() if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
            and not bool(torch.isfinite(v).all())]


def check_finite(sd: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Raise :class:`NonFiniteWeightsError` if a floating-point tensor of ``sd`` holds a NaN or an Inf, naming the
    first such tensors with their counts: a model with such weights computes NaN logits."""
    bad = nonfinite_tensors(sd)
    if not bad:
        return
    shown = []
    for k in bad[:5]:
        v = sd[k]
        n_nan, n_inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
        what = " and ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
        shown.append(f"{k} ({what} of {v.numel()})")
    more = f", ... (+{len(bad) - 5} more)" if len(bad) > 5 else ""
    raise NonFiniteWeightsError(
        f"{source} holds non-finite weights (NaN or Inf) in {len(bad)} of {len(sd)} tensors: {', '.join(shown)}"
        f"{more}. A model with such weights computes NaN logits, so parclip does not load it. The file is damaged "
        f"or was written by a training run that diverged: load an earlier checkpoint of that run (its epoch "
        f"copies), train again with a lower --lr (or --skip-nonfinite), or copy or download the file again.",
        tensors=bad)


def load_state_dict(path, *, allow_unsafe_load=False) -> dict[str, torch.Tensor]:
    """Read a checkpoint's weights: unwraps ``{"state_dict": ...}``, strips ``module.``, drops non-weight entries.

    Formats (detected by content): torch.save zip/pickle (``weights_only``), safetensors, a ``local-dir:`` folder,
    and, only with ``allow_unsafe_load=True``, TorchScript archives and pickles of arbitrary objects.
    """
    return _read_checkpoint(path, allow_unsafe_load)[0]


# --------------------------------------------------------------------------------------------------------------------
# strict loading
# --------------------------------------------------------------------------------------------------------------------
def _shape(t) -> list[int]:
    return list(t.shape)


def _common_prefix_hint(unexpected: list[str], model_keys: set[str]) -> str | None:
    heads = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if len(heads) == 1 and all("." in k for k in unexpected):
        head = heads.pop()
        stripped = {k.split(".", 1)[1] for k in unexpected}
        if stripped & model_keys:
            return f"the checkpoint's keys carry an extra prefix '{head}.' that the model does not have."
    return None


def _list(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` unless ``sd`` has exactly the model's keys and shapes."""
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    mismatched = [k for k in sd if k in ref and _shape(sd[k]) != _shape(ref[k])]
    wrong_kind = [k for k in sd if k in ref and isinstance(sd[k], torch.Tensor)
                  and sd[k].is_floating_point() != ref[k].is_floating_point()]  # int values for float weights
    if not (missing or unexpected or mismatched or wrong_kind):
        return
    lines = [f"{source} does not fit the model ({len(sd)} tensors in the checkpoint, {len(ref)} in the model); "
             f"parclip loads strictly and never evaluates a partly random model."]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {_list(unexpected)}")
    if mismatched:
        shown = [f"{k}: checkpoint {_shape(sd[k])} vs model {_shape(ref[k])}" for k in mismatched]
        lines.append(f"  shape mismatches ({len(mismatched)}): {_list(shown, 6)}")
    if wrong_kind:
        shown = [f"{k}: checkpoint {sd[k].dtype} vs model {ref[k].dtype}" for k in wrong_kind]
        lines.append(f"  integer/float mismatches ({len(wrong_kind)}; such values would be silently converted): "
                     f"{_list(shown, 6)}")
    hints = []
    prefix = _common_prefix_hint(unexpected, set(ref)) if unexpected else None
    if prefix:
        hints.append(prefix)
    if sd and not any(k.startswith("visual.") for k in sd):
        hints.append("the checkpoint holds no image tower (visual.*).")
    elif sd and all(k.startswith("visual.") for k in sd):
        hints.append("the checkpoint holds only the image tower (visual.*), not a full CLIP model.")
    archs = matching_architectures(sd)
    if archs:
        quick = " (OpenAI-derived weights such as the CleanCLIP/PAR releases need a -quickgelu variant)" \
            if any(a.endswith("-quickgelu") for a in archs) else ""
        hints.append(f"the checkpoint's keys and shapes match architecture {', '.join(archs)}; check --model{quick}.")
    else:
        sig = [f"{k} {_shape(sd[k])}" for k in ("visual.conv1.weight", "visual.positional_embedding",
                                                "positional_embedding") if k in sd]
        if sig:
            hints.append(f"no registered architecture matches the checkpoint ({'; '.join(sig)}); check --model.")
        else:
            hints.append("check --model.")
    lines.append("Hint: " + " ".join(hints))
    raise CheckpointMismatchError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)


def uses_quick_gelu(model: torch.nn.Module) -> bool | None:
    """True/False when the model's activations show it; None when it has neither GELU kind (e.g. no transformer)."""
    kinds = {type(m).__name__ for m in model.modules()}
    if "QuickGELU" in kinds:
        return True
    if any(isinstance(m, torch.nn.GELU) for m in model.modules()):
        return False
    return None


def load_weights(model: torch.nn.Module, path, *, allow_unsafe_load=False) -> None:
    """Load a checkpoint into ``model`` strictly (see :func:`load_state_dict` for the formats).

    Raises :class:`CheckpointMismatchError` naming missing/unexpected/mis-shaped keys and the architectures that the
    checkpoint does fit.
    """
    sd, info = _read_checkpoint(path, allow_unsafe_load)
    check_state_dict(model, sd, source=f"checkpoint {info['path']}")
    model.load_state_dict(sd, strict=True)
    if (info["format"] == "torchscript" or info["release_layout"]) and uses_quick_gelu(model) is False:
        if info["format"] == "torchscript":
            what = "is a TorchScript archive (the OpenAI JIT format, whose weights use QuickGELU)"
        else:
            what = ("has the CleanCLIP/PAR (and open_clip_train DDP) layout; CleanCLIP/PAR weights are fine-tuned "
                    "from OpenAI CLIP and use QuickGELU")
        warnings.warn(f"{info['path']} {what}, but the model uses GELU. If these weights descend from OpenAI CLIP, "
                      f"use the '-quickgelu' architecture (or force_quick_gelu=True), or results will be silently "
                      f"degraded.", UserWarning, stacklevel=2)


