"""Making models: open_clip architectures by name, offline, with their weights; the tokenizer; the export.

* any open_clip architecture by name (``'ViT-B/32'`` works like ``'ViT-B-32'``, ``'ViT-L/14@336px'`` like
  ``'ViT-L-14-336'``) and parclip's own configs in ``configs/`` (``parclip-micro``, ``parclip-tiny``,
  ``parclip-rn-tiny``); architectures are built offline;
* weights come from local files, or from an open_clip pretrained tag / ``hf-hub:`` repository through open_clip's own
  download-and-cache path (:func:`resolve_pretrained`), and are loaded safely and strictly by
  :mod:`parclip.models.checkpoints`;
* the export is an open_clip ``local-dir:`` folder, ``open_clip_model.safetensors`` + ``open_clip_config.json``, which
  open_clip itself loads with ``open_clip.create_model("local-dir:<folder>")``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import pathlib
import re

import open_clip
import torch
from open_clip.transform import PreprocessCfg

from ..utils.files import atomic_write, write_json
from .architectures import LOCAL_DIR_PREFIX, build, list_model_names
from .checkpoints import (CONFIG_FILE, DIR_WEIGHTS, WEIGHTS_FILE, CheckpointError, check_state_dict, find_dir_weights,
                          load_weights, local_dir, read_local_dir_config, uses_quick_gelu)
from .transforms import full_preprocess_cfg, jsonable_preprocess

__all__ = ["create_model", "resolve_pretrained", "hub_cache", "model_config", "get_tokenizer", "save_model"]


# --------------------------------------------------------------------------------------------------------------------
# names and configs
# --------------------------------------------------------------------------------------------------------------------
def normalize_name(name: str) -> str:
    """'ViT-B/32' -> 'ViT-B-32', 'ViT-L/14@336px' -> 'ViT-L-14-336'; refuse network schemas."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name.startswith(LOCAL_DIR_PREFIX):
        if not name[len(LOCAL_DIR_PREFIX):]:
            raise ValueError("empty path after 'local-dir:'")
        return name
    if name.startswith("hf-hub:") or "://" in name:
        raise ValueError(f"model {name!r}: parclip builds architectures offline, not from the network. Name the "
                         f"architecture and pass the weights as --pretrained (hf-hub:org/repo fetches them through "
                         f"open_clip's cache), or download the model folder and pass 'local-dir:<folder>'.")
    name = re.sub(r"@(\d+)px$", r"-\1", name)
    return name.replace("/", "-")


def model_config(name: str) -> dict:
    """The open_clip model cfg (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...) of an architecture or local-dir."""
    name = normalize_name(name)
    folder = local_dir(name)
    if folder is not None:
        return copy.deepcopy(read_local_dir_config(folder)["model_cfg"])
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, list_model_names(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model architecture {name!r}.{hint} See parclip.models.list_model_names() for all "
                         f"names, or pass 'local-dir:<folder>' for an exported model.")
    return copy.deepcopy(cfg)


def _refuse_networked_cfg(name: str, cfg: dict) -> None:
    """A config (a local-dir folder's is data) that would make open_clip fetch while building is refused: a Hugging
    Face text tower, or a timm image tower named from a hub (``hf-hub:org/repo``, whose config timm downloads even
    without weights)."""
    text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    if text_cfg.get("hf_model_name"):
        raise ValueError(f"architecture {name!r} uses the Hugging Face text tower {text_cfg['hf_model_name']!r}, which "
                         f"open_clip fetches from the network to build; parclip builds models offline only.")
    timm_name = vision_cfg.get("timm_model_name") if isinstance(vision_cfg, dict) else None
    if timm_name is not None and (not isinstance(timm_name, str) or ":" in timm_name):
        raise ValueError(f"architecture {name!r} names the timm image tower {timm_name!r}, which timm fetches from a "
                         f"hub to build; parclip builds models offline only (a timm architecture name, no 'hf-hub:').")


def _refuse_networked_tokenizer(name: str, cfg: dict) -> None:
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name") or (local_dir(name) is None and "siglip" in name.lower()):
        raise ValueError(f"the tokenizer of {name!r} is a Hugging Face / SentencePiece tokenizer that open_clip fetches "
                         f"from the network; parclip supports offline CLIP (BPE) tokenizers only.")


def get_tokenizer(name: str):
    """open_clip's tokenizer for ``name`` (a ``list[str] -> LongTensor[N, context_length]`` callable), offline."""
    name = normalize_name(name)
    cfg = model_config(name)
    _refuse_networked_tokenizer(name, cfg)
    context_length = cfg.get("text_cfg", {}).get("context_length", 77)
    return open_clip.get_tokenizer(name, context_length=context_length)


# --------------------------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------------------------
def create_model(name: str, pretrained: str | os.PathLike | None = None, *, device="cpu", force_quick_gelu=False,
                 allow_unsafe_load=False, cache_dir: str | os.PathLike | None = None) -> tuple[torch.nn.Module, dict]:
    """Build ``name`` and load ``pretrained`` strictly.

    ``name``: an open_clip architecture ('ViT-B/32', 'RN50-quickgelu', 'parclip-micro', ...) or 'local-dir:<folder>'
    (architecture, preprocessing and weights from an exported folder; ``pretrained``, if given, replaces its weights).
    ``pretrained``: a local checkpoint file, or an open_clip pretrained tag of the architecture ('openai',
    'laion2b_s34b_b79k', ...) or 'hf-hub:org/repo', fetched through open_clip's own download-and-cache path (see
    :func:`resolve_pretrained`); a tag also brings its QuickGELU setting and preprocessing, as in open_clip.
    ``None`` gives random weights. Returns ``(model in eval mode, fp32, on device, preprocess_cfg)``.
    """
    name = normalize_name(name)
    folder = local_dir(name)
    weights, tag_cfg = None, {}
    if folder is not None:
        read_local_dir_config(folder)
        if pretrained is None:
            weights = find_dir_weights(folder)
            if weights is None:
                raise CheckpointError(f"no weights in model folder {folder}: expected {WEIGHTS_FILE} (or one of "
                                      f"{', '.join(DIR_WEIGHTS[1:])}) next to {CONFIG_FILE}.")
    cfg = model_config(name)
    _refuse_networked_cfg(name, cfg)
    if pretrained is not None:
        weights, tag_cfg = resolve_pretrained(name, os.fspath(pretrained), cache_dir=cache_dir)
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    model = build(name, device="cpu", force_quick_gelu=force_quick_gelu or bool(tag_cfg.get("quick_gelu")),
                  preprocess=preprocess or None)
    if weights is not None:
        load_weights(model, weights, allow_unsafe_load=allow_unsafe_load)
    model = model.to(device=device, dtype=torch.float32).eval()
    preprocess = jsonable_preprocess(getattr(model.visual, "preprocess_cfg", None)
                                     or dataclasses.asdict(PreprocessCfg()))
    return model, preprocess


def hub_cache(cache_dir: str | os.PathLike | None = None) -> str:
    """Where open_clip (through huggingface_hub) keeps downloaded weights: `cache_dir`, else $HF_HUB_CACHE, else
    huggingface_hub's default (~/.cache/huggingface/hub)."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def resolve_pretrained(name: str, pretrained: str, *, cache_dir: str | os.PathLike | None = None) -> tuple[str, dict]:
    """``(local checkpoint path, the tag's pretrained cfg or {})`` for ``--pretrained``.

    An existing file is used as is. An open_clip tag of the architecture, or ``hf-hub:org/repo``, is resolved by
    open_clip's ``download_pretrained`` / ``download_pretrained_from_hf`` into the Hugging Face cache (``cache_dir``,
    $HF_HUB_CACHE or the default): it downloads when the machine has a network and ``HF_HUB_OFFLINE`` is not set,
    and reads the cache otherwise. The file is then loaded like any other: weights only, never unpickled code.
    Anything else, or a fetch that fails, is a :class:`CheckpointError` that names the tag, the cache folder and how
    to fill it."""
    path_like = "://" not in pretrained and (os.sep in pretrained or "/" in pretrained
                                             or pathlib.Path(pretrained).suffix != "")
    if os.path.exists(pretrained) or (path_like and not pretrained.startswith("hf-hub:")):
        return pretrained, {}  # a file (a missing one is reported by the loader, naming it)
    from open_clip import pretrained as ocp

    arch = name[len(LOCAL_DIR_PREFIX):] if name.startswith(LOCAL_DIR_PREFIX) else name
    if pretrained.startswith("hf-hub:"):
        repo, tag_cfg = pretrained[len("hf-hub:"):].strip("/"), {}
        fetch = lambda: ocp.download_pretrained_from_hf(repo, cache_dir=cache_dir)  # noqa: E731
        where = f"the Hugging Face repository {repo}"
    else:
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if local_dir(name) is None else {}
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch) if local_dir(name) is None else []
            raise CheckpointError(
                f"--pretrained {pretrained!r}: no such file, and not an open_clip pretrained tag of {arch}"
                + (f" (its tags: {', '.join(tags)})" if tags else "") + ". Pass a checkpoint file, a tag, or "
                "hf-hub:org/repo.")
        fetch = lambda: ocp.download_pretrained(tag_cfg, cache_dir=cache_dir)  # noqa: E731
        hub = tag_cfg.get("hf_hub", "").rstrip("/")
        where = f"the Hugging Face repository {hub}" if hub else tag_cfg.get("url", "its URL")
    try:
        path = fetch()
    except Exception as e:  # huggingface_hub and urllib raise many types; all mean "not available here"
        cache = hub_cache(cache_dir)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        raise CheckpointError(
            f"could not get the weights {pretrained!r} of {arch} from {where}"
            f"{' (HF_HUB_OFFLINE is set: only the cache is read)' if offline else ''}: {type(e).__name__}: {e}. "
            f"The cache folder is {cache}. To fill it, on a machine with a network run: python -c \"import "
            f"open_clip; open_clip.create_model('{arch}', pretrained='{pretrained}', cache_dir='{cache}')\" and "
            f"copy that folder here (or set HF_HUB_CACHE / --cache-dir to it), or download the checkpoint file and "
            f"pass its path.") from e
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"open_clip returned no file for {pretrained!r} of {arch}")
    return path, dict(tag_cfg)


# --------------------------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------------------------
def save_model(model: torch.nn.Module, out_dir, *, model_name: str, preprocess_cfg: dict,
               force_quick_gelu=False) -> pathlib.Path:
    """Export ``model`` as an open_clip ``local-dir:`` folder: ``open_clip_model.safetensors`` + ``open_clip_config.json``.

    ``model_name`` is the architecture the model was built as; its key set and shapes are checked against it. The
    saved cfg records ``quick_gelu`` from the model's activations (or ``force_quick_gelu``). Loadable with
    ``open_clip.create_model("local-dir:" + out_dir)`` and :func:`create_model`. Returns the folder.
    """
    from safetensors.torch import save_file

    name = normalize_name(model_name)
    cfg = model_config(name)
    _refuse_networked_cfg(name, cfg)
    detected = uses_quick_gelu(model)
    if force_quick_gelu and detected is False:
        raise ValueError("force_quick_gelu=True but the model uses GELU; the export would not reproduce the model. "
                         "Build the model with force_quick_gelu=True (or a '-quickgelu' architecture) instead.")
    quick = True if force_quick_gelu else (detected if detected is not None else bool(cfg.get("quick_gelu", False)))
    if quick:
        cfg["quick_gelu"] = True
    else:
        cfg.pop("quick_gelu", None)
    pp = full_preprocess_cfg(preprocess_cfg)

    sd = model.state_dict()
    check_state_dict(build(name, device="meta"), sd, source=f"the model to save (as {name!r})")
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
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(out / CONFIG_FILE, {"model_cfg": cfg, "preprocess_cfg": pp})
    return out


