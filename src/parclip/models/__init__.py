"""Models are untrusted input: build open_clip architectures offline, read checkpoints safely and strictly, export.

    factory.py      names and configs, building (``create_model``), the tokenizer, the export (``save_model``)
    checkpoints.py  safe checkpoint reading: format sniffing, the unpickling allow-list, strict key checks, errors,
                    ``local-dir:`` folders
    transforms.py   the preprocess config, ``image_size``, the eval transform, ``normalize``
    configs/        parclip's own small architectures (open_clip JSON configs)
"""
from .checkpoints import (
    CONFIG_FILE,
    LOCAL_DIR_PREFIX,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    check_state_dict,
    load_state_dict,
    load_weights,
    weights_sha256,
)
from .factory import create_model, get_tokenizer, list_model_names, model_config, save_model
from .transforms import eval_transform, image_size, normalize

__all__ = [
    "CheckpointError", "UnsafeCheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError",
    "create_model", "model_config", "get_tokenizer", "load_state_dict", "load_weights", "save_model",
    "eval_transform", "image_size", "normalize", "list_model_names", "check_state_dict", "LOCAL_DIR_PREFIX",
    "CONFIG_FILE", "WEIGHTS_FILE", "weights_sha256",
]
