"""What several `parclip` commands share, each declared once: the arguments below, and the helpers that load the model
of --model/--pretrained (`_load_model`) and record which model a result measured (`_provenance`)."""
from __future__ import annotations

from parclip.data import captions as data_captions
from parclip.utils.checks import COUNT, FRACTION, NATURAL, integers
from parclip.utils.flags import arg

# ----------------------------------------------------------------------------------------------------------------------
# Arguments several commands share, each declared once. A command's own arguments are declared beside its handler.
# Every int or float argument has a domain, checked as it is parsed (see parclip.utils.flags).
# ----------------------------------------------------------------------------------------------------------------------
IMAGE_SIZE = integers(2)  # the side an image is squash-resized to; a trigger needs at least 2 pixels

MODEL_ARGS = (
    arg("--model", required=True, help="architecture (e.g. ViT-B-32-quickgelu) or local-dir:PATH"),
    arg("--pretrained", default=None, help="checkpoint file (state dict, CleanCLIP/PAR .pt, safetensors), "
        "or an open_clip tag (openai, laion2b_s34b_b79k, ...) / hf-hub:org/repo, fetched into open_clip's "
        "cache (offline: read from it)"),
    arg("--cache-dir", "--model_cache_dir", default=None, help="cache of downloaded weights (default: $HF_HUB_CACHE or "
        "~/.cache/huggingface/hub)"),
    arg("--force-quick-gelu", action="store_true", help="use QuickGELU (OpenAI-derived weights)"),
    arg("--allow-unsafe-load", action="store_true",
        help="allow pickled code (TorchScript/JIT archives); only for checkpoints you trust"),
)
IMG_KEY = arg("--csv-img-key", default=None, help="table column (default: filepath, open_clip_train's) or Karpathy "
              "JSON key (default: image) with image paths")
CAPTION_KEY = arg("--csv-caption-key", default=None, help="table column (default: title, open_clip_train's) or "
                  "Karpathy JSON key (default: caption) with captions")
DATA_ROOT = arg("--data-root", default=None,
                help="folder image paths are relative to (default: the table's, or the JSON file's, folder)")
MAX_BAD_FRACTION = arg("--max-bad-fraction", type=float, default=0.01, domain=FRACTION,
                       help="missing, undecodable or empty rows/images are counted, named and left out (retrieval: "
                       "with their captions) up to this share; more stops the command (default: 0.01)")
TABLE_KEYS = (data_captions.IMG_KEY, data_captions.CAPTION_KEY)  # a table's default columns (open_clip_train's)
TABLE_ARGS = (IMG_KEY, CAPTION_KEY,
              arg("--csv-separator", default="\t", help="separator (default: tab, open_clip_train's, also for a .csv)"),
              DATA_ROOT, MAX_BAD_FRACTION)
TRIGGER_PARAM_ARG = arg("--trigger-param", action="append", default=[], metavar="KEY=VALUE",
                        help="trigger parameter, repeatable, e.g. patch_size=32, alpha=0.05, uint8_mode=clamp, "
                        "patch=badCLIP.jpg (badclip), mask=mask.png (water_patt); see `parclip triggers list`")
SEED = arg("--seed", type=int, default=0, domain=NATURAL)
DEVICE = arg("--device", default="auto")
QUIET = arg("--quiet", action="store_true", help="no progress bars")
JSON_ROWS = arg("--json", action="store_true", help="print the rows as JSON")
OUT_DIR = arg("out", help="output folder")
LABELLED_DATA = arg("--data", required=True, help="labelled folder ROOT/<class>/*")
RESULT_FILES = arg("results", nargs="+", help="result JSON files")
EVAL_ATTACKS = arg("--attack", nargs="*", default=[], help="one or more triggers")
RECALL_K = arg("--recall_k", "--recall-k", type=int, nargs="+", default=[5], domain=COUNT,
               help="retrieval: the k of clip_benchmark's recall@k in its record (default: 5, its default; "
               "parclip's own result has R@1, 5, 10 and these)")
RECORD_OUT = arg("--output", "--clip-benchmark-out", default=None, metavar="TEMPLATE",
                 help="write clip_benchmark's record of each result here: a file name or a template with {dataset} "
                 "{model} {pretrained} {pretrained_full_path} {language} {task} (eval --dataset: by default "
                 "clip_benchmark's {dataset}_{pretrained}_{model}_{language}_{task}.json; else none)")
DATASET_NAME = arg("--dataset-name", default=None, help="with --data: the record's data set name (default: the "
                   "folder's name, or the file's without its suffix)")
EVAL_RUN_ARGS = (  # how every evaluation command applies triggers, batches, writes and tolerates bad images
    arg("--seed", type=int, default=0, domain=NATURAL, help="seed of the per-image trigger randomness"),
    arg("--trigger-after-crop", action="store_true",
        help="trigger after resize+centre-crop instead of after the reference's squash-resize"),
    arg("--batch-size", "--batch_size", type=int, default=256, domain=COUNT),
    arg("--workers", "--num_workers", type=int, default=2, domain=NATURAL),
    DEVICE,
    arg("--out", default=None, help="write the result JSON here too"),
    MAX_BAD_FRACTION,
    TRIGGER_PARAM_ARG,
)


def _load_model(args, model_name: str | None = None, pretrained: str | None = None):
    """(model, preprocess_cfg, device) from the shared --model/--pretrained/--device flags (or the given model and
    checkpoint with the same --device and loading flags)."""
    import torch

    from parclip.models import create_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, preprocess = create_model(model_name or args.model, pretrained if model_name else args.pretrained,
                                     device=device, force_quick_gelu=args.force_quick_gelu,
                                     allow_unsafe_load=args.allow_unsafe_load, cache_dir=args.cache_dir)
    return model, preprocess, device


def _provenance(model: str, pretrained: str | None) -> dict:
    """What every evaluation result records about the model it measured."""
    from parclip.models import weights_sha256
    return {"model": model, "checkpoint": pretrained, "checkpoint_sha256": weights_sha256(model, pretrained)}
