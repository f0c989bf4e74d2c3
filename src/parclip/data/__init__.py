"""Data: image-caption tables with bad-row accounting, labelled image folders, prompt templates, Fashion-MNIST export.

Nothing here imports open_clip or torch at import time (open_clip is imported only for the ImageNet class names and the
OpenAI/simple template sets).
"""
from . import fashion_mnist
from .captions import BadRows, CaptionDataset, DataError, open_rgb, read_table, write_table
from .fashion_mnist import FASHION_CLASSES
from .folder import IMAGE_EXTENSIONS, LabelledFolder, read_classnames
from .templates import FASHION_TEMPLATES, TEMPLATE_SETS, fill, get_templates

__all__ = [
    "BadRows", "CaptionDataset", "DataError", "open_rgb", "read_table", "write_table",
    "LabelledFolder", "IMAGE_EXTENSIONS", "read_classnames",
    "get_templates", "fill", "TEMPLATE_SETS", "FASHION_TEMPLATES",
    "fashion_mnist", "FASHION_CLASSES",
]
