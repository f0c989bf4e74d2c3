"""Model I/O: build open_clip architectures offline, load checkpoints safely and strictly, export for open_clip.

Models are untrusted input. This module

* builds any open_clip architecture by name (``'ViT-B/32'`` works like ``'ViT-B-32'``) and parclip's own small
  configs (``model_configs/``), and never downloads anything: pretrained *tags* such as ``'openai'`` are refused;
* loads plain state dicts, the CleanCLIP/PAR release layout ``{"state_dict": {"module.<key>": ...}, ...}``,
  safetensors (recognised by content), open_clip ``local-dir:`` folders and, only with ``allow_unsafe_load=True``,
  TorchScript archives and arbitrary pickles;
* never unpickles arbitrary objects by default (``torch.load(weights_only=True)``, with ``argparse.Namespace``
  allowed for PAR's training checkpoints);
* loads strictly: any missing, unexpected or mis-shaped key is a :class:`CheckpointMismatchError` that says which
  architecture the checkpoint does fit, never a silently random model;
* exports models as ``open_clip_model.safetensors`` + ``open_clip_config.json``, which open_clip itself loads with
  ``open_clip.create_model("local-dir:<folder>")``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import io
import json
import logging
import os
import pathlib
import pickle
import pickletools
import re
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Mapping

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

__all__ = [
    "CheckpointError", "UnsafeCheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError",
    "create_model", "model_config", "get_tokenizer", "load_state_dict", "load_weights", "save_model",
    "eval_transform", "list_model_names", "check_state_dict", "LOCAL_DIR_PREFIX", "CONFIG_FILE", "WEIGHTS_FILE",
]

LOCAL_DIR_PREFIX = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

# Weights files open_clip looks for in a local-dir folder, in its order of preference.
_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
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


# --------------------------------------------------------------------------------------------------------------------
# our own configs
# --------------------------------------------------------------------------------------------------------------------
_CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "model_configs"


def _load_own_preprocess() -> dict[str, dict]:
    with open(_CONFIG_DIR / "preprocess.json", encoding="utf-8") as f:
        table = json.load(f)
    return {k: v for k, v in table.items() if not k.startswith("_")}


_OWN_PREPROCESS = _load_own_preprocess()
if not all(name in open_clip.list_models() for name in _OWN_PREPROCESS):
    open_clip.add_model_config(_CONFIG_DIR)


def image_size(preprocess_cfg: dict) -> int:
    """The model's square input side from its preprocess config (`size` is an int or an (h, w) pair)."""
    size = preprocess_cfg["size"]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def list_model_names() -> list[str]:
    """Every architecture name :func:`create_model` accepts (open_clip's built-ins plus parclip's own configs)."""
    return open_clip.list_models()


# --------------------------------------------------------------------------------------------------------------------
# names and configs
# --------------------------------------------------------------------------------------------------------------------
def _local_dir(name: str) -> pathlib.Path | None:
    return pathlib.Path(name[len(LOCAL_DIR_PREFIX):]) if name.startswith(LOCAL_DIR_PREFIX) else None


def _normalise_name(name: str) -> str:
    """'ViT-B/32' -> 'ViT-B-32', 'ViT-L/14@336px' -> 'ViT-L-14-336'; refuse network schemas."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name.startswith(LOCAL_DIR_PREFIX):
        if not name[len(LOCAL_DIR_PREFIX):]:
            raise ValueError("empty path after 'local-dir:'")
        return name
    if name.startswith("hf-hub:") or "://" in name:
        raise ValueError(f"model {name!r} would be fetched from the network; parclip never downloads. Download the "
                         f"model folder yourself and pass 'local-dir:<folder>' instead.")
    name = re.sub(r"@(\d+)px$", r"-\1", name)
    return name.replace("/", "-")


def _read_local_dir_config(folder: pathlib.Path) -> dict:
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


def model_config(name: str) -> dict:
    """The open_clip model cfg (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...) of an architecture or local-dir."""
    name = _normalise_name(name)
    folder = _local_dir(name)
    if folder is not None:
        return copy.deepcopy(_read_local_dir_config(folder)["model_cfg"])
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, list_model_names(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model architecture {name!r}.{hint} See parclip.models.list_model_names() for all "
                         f"names, or pass 'local-dir:<folder>' for an exported model.")
    return copy.deepcopy(cfg)


def _refuse_networked_cfg(name: str, cfg: dict) -> None:
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        raise ValueError(f"architecture {name!r} uses the Hugging Face text tower {text_cfg['hf_model_name']!r}, which "
                         f"open_clip fetches from the network to build; parclip builds models offline only.")


def _refuse_networked_tokenizer(name: str, cfg: dict) -> None:
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or (_local_dir(name) is None and "siglip" in name.lower()):
        raise ValueError(f"the tokenizer of {name!r} is a Hugging Face / SentencePiece tokenizer that open_clip fetches "
                         f"from the network; parclip supports offline CLIP (BPE) tokenizers only.")


def get_tokenizer(name: str):
    """open_clip's tokenizer for ``name`` (a ``list[str] -> LongTensor[N, context_length]`` callable), offline."""
    name = _normalise_name(name)
    cfg = model_config(name)
    _refuse_networked_tokenizer(name, cfg)
    context_length = cfg.get("text_cfg", {}).get("context_length", 77)
    return open_clip.get_tokenizer(name, context_length=context_length)


# --------------------------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------------------------
class _DropOpenClipNotices(logging.Filter):
    """open_clip logs 'initialized randomly' even when parclip loads the weights right after building."""

    def filter(self, record):
        msg = str(record.msg)
        return not (msg.startswith("No pretrained weights loaded") or msg.startswith("Local config loaded, but no"))


@contextlib.contextmanager
def _quiet_open_clip():
    root = logging.getLogger()
    flt = _DropOpenClipNotices()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _build(name: str, *, device="cpu", force_quick_gelu=False) -> torch.nn.Module:
    """Build an architecture with random weights (``device='meta'``: shapes only, no memory)."""
    kwargs = dict(precision="fp32", device=device, force_quick_gelu=force_quick_gelu,
                  pretrained_image=False, pretrained_text=False)
    if name in _OWN_PREPROCESS:
        kwargs["force_preprocess_cfg"] = _OWN_PREPROCESS[name]
    if name.startswith(LOCAL_DIR_PREFIX):
        kwargs["load_weights"] = False  # parclip loads the weights itself, safely and strictly
    ctx = torch.device("meta") if str(device) == "meta" else contextlib.nullcontext()
    with _quiet_open_clip(), ctx:
        return open_clip.create_model(name, **kwargs)


def _jsonable_preprocess(cfg: Mapping) -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, (tuple, list)):
            v = list(v)
            if k == "size" and len(v) == 2 and v[0] == v[1]:
                v = int(v[0])
        out[k] = v
    return out


def _looks_like_tag(pretrained: str) -> bool:
    if pretrained.startswith(("hf-hub:", "http://", "https://")):
        return True
    if os.sep in pretrained or "/" in pretrained or pathlib.Path(pretrained).suffix:
        return False
    known = {tag for _, tag in open_clip.list_pretrained()}
    return pretrained in known or re.fullmatch(r"[A-Za-z0-9_]+", pretrained) is not None


def _find_dir_weights(folder: pathlib.Path) -> pathlib.Path | None:
    for fname in _DIR_WEIGHTS:
        if (folder / fname).is_file():
            return folder / fname
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth", "*.pt") for p in folder.glob(ext))
    return found[0] if len(found) == 1 else None


def create_model(name: str, pretrained: str | os.PathLike | None = None, *, device="cpu", force_quick_gelu=False,
                 allow_unsafe_load=False) -> tuple[torch.nn.Module, dict]:
    """Build ``name`` offline and load ``pretrained`` (a local file) strictly.

    ``name``: an open_clip architecture ('ViT-B/32', 'RN50-quickgelu', 'parclip-micro', ...) or 'local-dir:<folder>'
    (architecture, preprocessing and weights from an exported folder; ``pretrained``, if given, replaces its weights).
    ``pretrained=None`` gives random weights. Returns ``(model in eval mode, fp32, on device, preprocess_cfg)``.
    """
    name = _normalise_name(name)
    folder = _local_dir(name)
    weights = None
    if folder is not None:
        _read_local_dir_config(folder)
        if pretrained is None:
            weights = _find_dir_weights(folder)
            if weights is None:
                raise CheckpointError(f"no weights in model folder {folder}: expected {WEIGHTS_FILE} (or one of "
                                      f"{', '.join(_DIR_WEIGHTS[1:])}) next to {CONFIG_FILE}.")
    cfg = model_config(name)
    _refuse_networked_cfg(name, cfg)
    if pretrained is not None:
        pretrained_str = os.fspath(pretrained)
        if not os.path.exists(pretrained_str) and _looks_like_tag(pretrained_str):
            raise CheckpointError(
                f"pretrained={pretrained_str!r} looks like an open_clip pretrained tag or remote location, and no such "
                f"local file exists. parclip only takes local checkpoint files and never downloads weights: download "
                f"them yourself (on a trusted machine) and pass the file path.")
        weights = pretrained_str
    model = _build(name, device="cpu", force_quick_gelu=force_quick_gelu)
    if weights is not None:
        load_weights(model, weights, allow_unsafe_load=allow_unsafe_load)
    model = model.to(device=device, dtype=torch.float32).eval()
    preprocess = _jsonable_preprocess(getattr(model.visual, "preprocess_cfg", None) or dataclasses.asdict(PreprocessCfg()))
    return model, preprocess


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
        w = _find_dir_weights(p)
        if w is None:
            raise CheckpointError(f"{p} is a folder without a recognisable weights file (expected {WEIGHTS_FILE} or "
                                  f"one of {', '.join(_DIR_WEIGHTS[1:])}); pass the weights file itself.")
        return w
    return p


def _torch_load(path: pathlib.Path, kind: str, allow_unsafe_load: bool):
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
    return clean, info


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


def _cfg_prefilter(cfg: dict, sd: Mapping) -> bool:
    """Cheap check that a config could produce the checkpoint's conv1 and text positional embedding."""
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if v.get("timm_model_name") or t.get("hf_model_name") or cfg.get("custom_text"):
        return False
    conv1 = sd.get("visual.conv1.weight")
    pos = sd.get("positional_embedding")
    if conv1 is None or pos is None or conv1.ndim != 4 or pos.ndim != 2:
        return False
    width = v.get("width", 768)
    if isinstance(v.get("layers", 12), (list, tuple)):  # ModifiedResNet stem
        ok_v = conv1.shape[0] == width // 2 and conv1.shape[-1] == 3
    else:
        ok_v = conv1.shape[0] == width and conv1.shape[-1] == v.get("patch_size", 16)
    return ok_v and list(pos.shape) == [t.get("context_length", 77), t.get("width", 512)]


def _matching_architectures(sd: Mapping, limit: int = 6) -> list[str]:
    """Registered architectures whose exact key set and shapes equal the checkpoint's (built on the meta device)."""
    out = []
    try:
        for name in list_model_names():
            cfg = open_clip.get_model_config(name)
            if not cfg or not _cfg_prefilter(cfg, sd):
                continue
            ref = _build(name, device="meta").state_dict()
            if set(ref) == set(sd) and all(_shape(ref[k]) == _shape(sd[k]) for k in sd):
                out.append(name)
                if len(out) >= limit:
                    break
    except Exception:  # the hint is best effort; never hide the real error behind it
        pass
    return out


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
    if not (missing or unexpected or mismatched):
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
    hints = []
    prefix = _common_prefix_hint(unexpected, set(ref)) if unexpected else None
    if prefix:
        hints.append(prefix)
    if sd and not any(k.startswith("visual.") for k in sd):
        hints.append("the checkpoint holds no image tower (visual.*).")
    elif sd and all(k.startswith("visual.") for k in sd):
        hints.append("the checkpoint holds only the image tower (visual.*), not a full CLIP model.")
    archs = _matching_architectures(sd)
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


def _uses_quick_gelu(model: torch.nn.Module) -> bool | None:
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
    if (info["format"] == "torchscript" or info["release_layout"]) and _uses_quick_gelu(model) is False:
        if info["format"] == "torchscript":
            what = "is a TorchScript archive (the OpenAI JIT format, whose weights use QuickGELU)"
        else:
            what = ("has the CleanCLIP/PAR (and open_clip_train DDP) layout; CleanCLIP/PAR weights are fine-tuned "
                    "from OpenAI CLIP and use QuickGELU")
        warnings.warn(f"{info['path']} {what}, but the model uses GELU. If these weights descend from OpenAI CLIP, "
                      f"use the '-quickgelu' architecture (or force_quick_gelu=True), or results will be silently "
                      f"degraded.", UserWarning, stacklevel=2)


# --------------------------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------------------------
def _full_preprocess_cfg(preprocess_cfg: Mapping) -> dict:
    fields = {f.name for f in dataclasses.fields(PreprocessCfg)}
    unknown = set(preprocess_cfg) - fields
    if unknown:
        raise ValueError(f"unknown preprocess_cfg keys {sorted(unknown)}; allowed: {sorted(fields)}")
    merged = dataclasses.asdict(PreprocessCfg())
    merged.update({k: v for k, v in preprocess_cfg.items() if v is not None})
    PreprocessCfg(**merged)  # validates mode
    return _jsonable_preprocess(merged)


def _atomic_write(path: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_model(model: torch.nn.Module, out_dir, *, model_name: str, preprocess_cfg: dict,
               force_quick_gelu=False) -> pathlib.Path:
    """Export ``model`` as an open_clip ``local-dir:`` folder: ``open_clip_model.safetensors`` + ``open_clip_config.json``.

    ``model_name`` is the architecture the model was built as; its key set and shapes are checked against it. The
    saved cfg records ``quick_gelu`` from the model's activations (or ``force_quick_gelu``). Loadable with
    ``open_clip.create_model("local-dir:" + out_dir)`` and :func:`create_model`. Returns the folder.
    """
    from safetensors.torch import save_file

    name = _normalise_name(model_name)
    cfg = model_config(name)
    _refuse_networked_cfg(name, cfg)
    detected = _uses_quick_gelu(model)
    if force_quick_gelu and detected is False:
        raise ValueError("force_quick_gelu=True but the model uses GELU; the export would not reproduce the model. "
                         "Build the model with force_quick_gelu=True (or a '-quickgelu' architecture) instead.")
    quick = True if force_quick_gelu else (detected if detected is not None else bool(cfg.get("quick_gelu", False)))
    if quick:
        cfg["quick_gelu"] = True
    else:
        cfg.pop("quick_gelu", None)
    pp = _full_preprocess_cfg(preprocess_cfg)

    sd = model.state_dict()
    check_state_dict(_build(name, device="meta"), sd, source=f"the model to save (as {name!r})")
    tensors, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().to("cpu").contiguous()
        key = v.untyped_storage().data_ptr() if v.numel() else None
        if key in seen:
            v = v.clone()  # safetensors refuses tensors that share memory
        elif key is not None:
            seen.add(key)
        tensors[k] = v

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}, indent=2) + "\n"
    _atomic_write(out / CONFIG_FILE, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
    return out


# --------------------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------------------
def eval_transform(preprocess_cfg: dict):
    """The model's eval transform (resize, centre crop, to tensor, normalise): ``PIL image -> FloatTensor[3,S,S]``."""
    cfg = _full_preprocess_cfg(preprocess_cfg)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
