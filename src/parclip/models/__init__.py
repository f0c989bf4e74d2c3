"""Models are untrusted input: build open_clip architectures offline, read checkpoints safely and strictly, export.

    factory.py        names and configs, building with weights (``create_model``), the tokenizer, the export
                      (``save_model``)
    checkpoints.py    safe checkpoint reading: format sniffing, the unpickling allow-list, strict key checks, the
                      refusal of NaN/Inf weights, errors, ``local-dir:`` folders
    architectures.py  the registry: parclip's own configs, building offline with random weights, which architectures
                      a state dict fits
    transforms.py     the preprocess config, ``image_size``, the eval transform, ``normalize`` / ``denormalize``
    configs/          parclip's own small architectures (open_clip JSON configs)
"""
from .checkpoints import (
    CONFIG_FILE,
    LOCAL_DIR_PREFIX,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    NonFiniteWeightsError,
    UnsafeCheckpointError,
    check_state_dict,
    load_state_dict,
    load_weights,
    weights_sha256,
)
from .architectures import list_model_names
from .factory import create_model, get_tokenizer, model_config, save_model
from .transforms import denormalize, eval_transform, image_size, normalize

__all__ = [
    "CheckpointError", "UnsafeCheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError",
    "NonFiniteWeightsError", "create_model", "model_config", "get_tokenizer", "load_state_dict", "load_weights",
    "save_model",
    "eval_transform", "image_size", "normalize", "denormalize", "list_model_names", "check_state_dict",
    "LOCAL_DIR_PREFIX", "CONFIG_FILE", "WEIGHTS_FILE", "weights_sha256",
]
