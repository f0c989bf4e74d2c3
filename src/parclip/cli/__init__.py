"""The `parclip` command line.

    parclip demo                      poison a tiny CLIP on Fashion-MNIST, clean it with PAR, print the table
    parclip data fashion-mnist OUT    export Fashion-MNIST as image files + captions CSV + labelled test folder
    parclip data check TABLE          decode every image of a caption table and report bad rows
    parclip data convert SRC OUT      caption table ↔ webdataset shards; labelled folder → clip_benchmark shards
    parclip data synthesize OUT       generated image–caption pairs from a generator (diffusers, ...) and captions
    parclip data train-generator T O  a small class-conditional generator (pca-gauss, cvae) fitted to a table's images
    parclip poison TABLE OUT          plant a trigger into a seeded share of an image–caption table
    parclip train                     fine-tune: --objective par|cleanclip|roclip (clean) or clip (plain / plant)
    parclip eval                      clean zero-shot accuracy and attack success rate on a labelled folder
    parclip eval-retrieval            image↔text R@k and the retrieval ASR on a Karpathy JSON or a caption table
    parclip report RESULTS…           many eval results in one table (Markdown, CSV) and a clean-vs-ASR chart
    parclip plot embeddings|tradeoff  t-SNE of clean and triggered embeddings; clean accuracy against ASR
    parclip runs [FOLDER]             training run directories with their last metrics
    parclip models                    list the model architectures parclip can build
    parclip triggers list|show        the attack catalogue: a table of every trigger, or a PNG gallery of them
    parclip defences list             the cleaning methods (par, cleanclip, roclip, clip) and their presets
    parclip attack optimize-patch     optimise a BadCLIP patch against a (clean) model and a target class
"""

# One module per command (catalogue: the listing commands runs, models, triggers, defences); the arguments several
# commands share, and the helpers they share, are declared once in common.py.
from __future__ import annotations

import argparse
import logging
import sys

from parclip import __version__
from parclip.cli.attack import ATTACK
from parclip.cli.catalogue import DEFENCES, MODELS, RUNS, TRIGGERS
from parclip.cli.common import (CAPTION_KEY, DATA_ROOT, DATASET_NAME, DEVICE, EVAL_ATTACKS, EVAL_RUN_ARGS, IMAGE_SIZE,
                                IMG_KEY, JSON_ROWS, LABELLED_DATA, MAX_BAD_FRACTION, MODEL_ARGS, OUT_DIR, QUIET,
                                RECALL_K, RECORD_OUT, RESULT_FILES, SEED, TABLE_ARGS, TABLE_KEYS, TRIGGER_PARAM_ARG)
from parclip.cli.data import DATA
from parclip.cli.demo import DEMO
from parclip.cli.eval import EVAL, EVAL_RETRIEVAL
from parclip.cli.plot import PLOT
from parclip.cli.poison import POISON
from parclip.cli.report import REPORT
from parclip.cli.scan import SCAN
from parclip.cli.train import TRAIN
from parclip.utils.flags import add_args, add_commands, arg

__all__ = ["main", "build_parser", "COMMANDS", "GLOBAL_ARGS", "EXAMPLES",  # and the shared arguments, from common
           "CAPTION_KEY", "DATA_ROOT", "DATASET_NAME", "DEVICE", "EVAL_ATTACKS", "EVAL_RUN_ARGS", "IMAGE_SIZE",
           "IMG_KEY", "JSON_ROWS", "LABELLED_DATA", "MAX_BAD_FRACTION", "MODEL_ARGS", "OUT_DIR", "QUIET", "RECALL_K",
           "RECORD_OUT", "RESULT_FILES", "SEED", "TABLE_ARGS", "TABLE_KEYS", "TRIGGER_PARAM_ARG"]

EXAMPLES = """
examples:
  # clean a released poisoned ViT-B/32 with PAR on 250k clean CC3M pairs, 4 GPUs
  torchrun --nproc_per_node 4 -m parclip train --model ViT-B-32-quickgelu --pretrained badnet_rs.pt \\
      --train-data cc3m_250k.csv --batch-size 512 --epochs 2 --tau 2.15 --name par-badnet
  # measure clean accuracy and ASR of the result on ImageNet val (one folder per class)
  parclip eval --model local-dir:runs/par-badnet/model --data imagenet/val --attack badnet_rs --target banana
  # plant a backdoor: poison 1500 rows, then fine-tune with the plain CLIP loss
  parclip poison cc3m_500k.csv poisoned/ --attack badnet_rs --target banana --n 1500 --image-size 224
  parclip train --objective clip --model ViT-B-32-quickgelu --pretrained clean.pt --train-data poisoned/poisoned.csv
"""


# ---------------------------------------------------------------------------------------------------- the parser, main
COMMANDS = (DEMO, DATA, POISON, TRAIN, EVAL, EVAL_RETRIEVAL, SCAN, REPORT, PLOT, RUNS, MODELS, TRIGGERS, DEFENCES,
            ATTACK)
GLOBAL_ARGS = (arg("--version", action="version", version=f"parclip {__version__}"),
               arg("-v", "--verbose", action="store_true", help="show debug messages and full tracebacks"))


def build_parser() -> argparse.ArgumentParser:
    """`parclip` with its global flags and one subcommand per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="parclip", description=__doc__, epilog=EXAMPLES, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser, GLOBAL_ARGS)
    add_commands(parser, COMMANDS, dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("open_clip", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted; a training run resumes from its last checkpoint when started again with the same "
              "--name, a synthesis (data synthesize) after its last committed chunk when run again", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # user-facing errors: a message, not a traceback
        if args.verbose:
            raise
        print(f"parclip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or forbidden folder: what the system said, and what still holds
        if args.verbose:
            raise
        print(f"parclip {args.command}: error: {e}. Files written before this error are complete (every file is "
              f"written atomically); fix the cause and run the same command again (a training run resumes from its "
              f"last checkpoint).", file=sys.stderr)
        return 2
