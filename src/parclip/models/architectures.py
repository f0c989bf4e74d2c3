"""Registered architectures, the bottom of :mod:`parclip.models`: parclip's own configs added to open_clip's registry,
building an architecture offline with random weights (:func:`build`), and finding the architectures whose key set and
shapes a state dict has (:func:`matching_architectures`, the hint of a checkpoint that does not fit).

Nothing here reads weights; :mod:`parclip.models.checkpoints` (reading, strict checks) and
:mod:`parclip.models.factory` (``create_model``, the export) build on it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from collections.abc import Mapping

import open_clip
import torch

__all__ = ["LOCAL_DIR_PREFIX", "list_model_names", "build", "matching_architectures"]

# A model name of this form is an exported open_clip folder (open_clip_config.json + a weights file).
LOCAL_DIR_PREFIX = "local-dir:"

# --------------------------------------------------------------------------------------------------------------------
# our own configs
# --------------------------------------------------------------------------------------------------------------------
_CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"


def _load_own_preprocess() -> dict[str, dict]:
    with open(_CONFIG_DIR / "preprocess.json", encoding="utf-8") as f:
        table = json.load(f)
    return {k: v for k, v in table.items() if not k.startswith("_")}


_OWN_PREPROCESS = _load_own_preprocess()
if not all(name in open_clip.list_models() for name in _OWN_PREPROCESS):
    open_clip.add_model_config(_CONFIG_DIR)


def list_model_names() -> list[str]:
    """Every architecture name :func:`create_model` accepts (open_clip's built-ins plus parclip's own configs)."""
    return open_clip.list_models()


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


def build(name: str, *, device="cpu", force_quick_gelu=False, preprocess: dict | None = None) -> torch.nn.Module:
    """Build an architecture with random weights (``device='meta'``: shapes only, no memory); `preprocess` overrides
    the preprocessing it records (a pretrained tag's mean/std)."""
    kwargs = dict(precision="fp32", device=device, force_quick_gelu=force_quick_gelu,
                  pretrained_image=False, pretrained_text=False)
    if name in _OWN_PREPROCESS or preprocess:
        kwargs["force_preprocess_cfg"] = {**_OWN_PREPROCESS.get(name, {}), **(preprocess or {})}
    if name.startswith(LOCAL_DIR_PREFIX):
        kwargs["load_weights"] = False  # parclip loads the weights itself, safely and strictly
    ctx = torch.device("meta") if str(device) == "meta" else contextlib.nullcontext()
    with _quiet_open_clip(), ctx:
        return open_clip.create_model(name, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# which architectures a state dict fits
# --------------------------------------------------------------------------------------------------------------------
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


def matching_architectures(sd: Mapping, limit: int = 6) -> list[str]:
    """Registered architectures whose exact key set and shapes equal the checkpoint's (built on the meta device)."""
    out = []
    try:
        for name in list_model_names():
            cfg = open_clip.get_model_config(name)
            if not cfg or not _cfg_prefilter(cfg, sd):
                continue
            ref = build(name, device="meta").state_dict()
            if set(ref) == set(sd) and all(ref[k].shape == sd[k].shape for k in sd):
                out.append(name)
                if len(out) >= limit:
                    break
    except Exception:  # the hint is best effort; never hide the real error behind it
        pass
    return out
