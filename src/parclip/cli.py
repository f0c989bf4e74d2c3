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

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from parclip import __version__
from parclip.attacks.patch_config import PatchConfig
from parclip.config import CONFIG_ARGS, TAU
from parclip.data import captions as data_captions
from parclip.utils.checks import COUNT, FRACTION, NATURAL, integers, numbers
from parclip.utils.flags import Command, Fields, OneOf, add_args, add_commands, arg, refused

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


# ---------------------------------------------------------------------------------------------------------------- demo
def _cmd_demo(args) -> int:
    from parclip.attacks.triggers import parse_trigger_params
    from parclip.demo import run_demo

    run_demo(args.out, attack=args.attack, target=args.target, tau=args.tau, seed=args.seed, fresh=args.fresh,
             trigger_params=parse_trigger_params(args.trigger_param), defences=args.defence, smoke=args.smoke,
             synthetic=args.clean_data == "synthetic")
    return 0


DEMO = Command(
    "demo", "end to end on Fashion-MNIST: plant a backdoor in a small CLIP, clean it, measure", run=_cmd_demo,
    description="One attack of the defence × attack benchmark (benchmarks/defence_matrix.py, the same protocol and "
    "settings), plus retrieval: export Fashion-MNIST, pre-train a clean foundation CLIP from scratch, plant a "
    "backdoor by fine-tuning it on 20 000 of its pairs of which 10% carry a trigger naming the target class, clean "
    "the poisoned model with plain fine-tuning and PAR (--defence adds others) under the defender's protocol (4 "
    "epochs on 8 000 of the 10 000 disjoint clean pairs; each defence's learning rate chosen without the trigger, "
    "on the other 2 000: the highest of 3e-4 and 1e-4 whose clean accuracy stays within 2 points of the poisoned "
    "model's), and evaluate every model (zero-shot clean top-1 and ASR; retrieval R@1 and the "
    "retrieval ASR). Prints the table and writes results.json and results.png into --out. Every stage is cached "
    "under its settings: finished stages are reused when run again (also by the benchmark with --cache OUT).",
    args=(arg("--out", default="demo_out", help="output folder (default: demo_out)"),
          arg("--attack", default="badnet_rs", help="trigger to plant (default: badnet_rs), or \"all\": every "
              "attack, printing the benchmark's matrix defence × attack of clean top-1 / ASR (matrix.json, .md, .png)"),
          arg("--target", default="bag", help="target class (default: bag)"),
          arg("--defence", action="append", default=None, metavar="NAME",
              help="clean with this defence (repeatable): fine-tuning (clip), 'fine-tuning + PAR aug' (clip_aug), "
              "CleanCLIP, RoCLIP, PAR, or all (default: fine-tuning and PAR)"),
          arg("--tau", type=float, default=None, domain=TAU,
              help="override PAR's threshold τ (the benchmark's 2.0)"),
          SEED,
          arg("--fresh", action="store_true", help="recompute every stage instead of reusing finished ones"),
          arg("--clean-data", default="real", choices=["real", "synthetic"],
              help="what the defences clean on: the 8 000 real held-out pairs (default), or 10 000 synthetic pairs "
              "from a small generator fitted to the foundation's pre-training pairs only (the PAR paper's claim "
              "that generated pairs suffice; docs/synthetic.md). The validation that picks the rate stays real"),
          arg("--smoke", action="store_true", help="the benchmark's smoke size: a few hundred images, one epoch per "
              "stage, about a minute; checks the set-up, the numbers say nothing"),
          TRIGGER_PARAM_ARG))


# ---------------------------------------------------------------------------------------------------------------- data
def _data_fashion_mnist(args) -> int:
    from parclip.data import fashion_mnist

    paths = fashion_mnist.export(args.out, holdout=args.holdout, n_train=args.n_train, n_test=args.n_test,
                                 seed=args.seed, templates=args.templates)
    print(json.dumps({k: str(v) for k, v in paths.items() if k in ("train_csv", "holdout_csv", "test_dir")},
                     indent=2))
    return 0


def _data_check(args) -> int:
    from parclip.data import CaptionDataset

    ds = CaptionDataset(args.table, img_key=args.csv_img_key or TABLE_KEYS[0],
                        caption_key=args.csv_caption_key or TABLE_KEYS[1],
                        sep=args.csv_separator, root=args.data_root, max_bad_fraction=args.max_bad_fraction,
                        verify_images=True)
    print(f"{args.table}: {len(ds)} usable rows")
    print(ds.bad_rows)
    return 0


def _data_convert(args) -> int:
    from parclip.data import shards as wds

    src = Path(args.src)
    if wds.is_shard_spec(args.src):
        r = wds.shards_to_table(args.src, args.out)
        print(f"{r['n_samples']} samples → {r['table']}" + (f" ({len(r['bad'])} bad samples left out)"
                                                            if r["bad"] else ""))
    elif src.is_dir():
        r = wds.folder_to_shards(src, args.out, maxcount=args.maxcount)
        print(f"{r['n_samples']} images of {len(r['classnames'])} classes → {len(r['shards'])} shards in "
              f"{Path(args.out) / 'test'} (+ classnames.txt)")
    else:
        r = wds.table_to_shards(src, args.out, img_key=args.csv_img_key or TABLE_KEYS[0],
                                caption_key=args.csv_caption_key or TABLE_KEYS[1], sep=args.csv_separator,
                                root=args.data_root, maxcount=args.maxcount,
                                max_bad_fraction=args.max_bad_fraction)
        print(f"{r['n_samples']} samples → {len(r['shards'])} shards in {args.out} (+ sizes.json)"
              + (f"; left out: {r['bad_rows']}" if r["bad_rows"] else ""))
    return 0


def _generator_options(pairs) -> dict:
    """``["steps=4", "guidance=0"]`` (``--generator-option KEY=VALUE``) -> ``{"steps": "4", ...}``: strings, which the
    generator parses and checks."""
    out = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--generator-option {pair!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _data_synthesize(args) -> int:
    from parclip.synth import load_generator
    from parclip.synth.prompts import make_prompts
    from parclip.synth.synthesize import TABLE, synthesize

    options = _generator_options(args.generator_option)
    if args.device is not None:
        options["device"] = args.device
    try:
        generator = load_generator(args.generator, **options)
    except KeyError as e:  # an unknown kind: the message lists the known ones
        raise ValueError(e.args[0]) from None
    except TypeError as e:  # a generator's load refused an option
        raise ValueError(f"--generator {args.generator}: {e} (check --generator-option and --device)") from None
    classes = generator.classnames if generator.conditioning == "class" else None
    prompts, source = make_prompts(classes, classnames=args.classnames, captions=args.captions,
                                   templates=args.templates, n=args.n, per_class=args.per_class, seed=args.seed)
    manifest = synthesize(args.out, generator, prompts, source, seed=args.seed, chunk_size=args.chunk_size,
                          batch_size=args.batch_size, shards=args.shards, image_size=args.image_size,
                          paths={"generator": args.generator, "classnames": args.classnames,
                                 "captions": args.captions})
    out = Path(args.out)
    data = out / (manifest["outputs"]["shards"] if args.shards else TABLE)
    print(f"{len(prompts)} synthetic pairs from {args.generator} → {data} (manifest: {out / 'manifest.json'})")
    print(f"train on them: parclip train --train-data '{data}' ...")
    return 0


def _data_train_generator(args) -> int:
    from parclip.synth import DEFAULT_FAMILY, train_generator

    classnames = Path(args.classnames).read_text(encoding="utf-8").split("\n") if args.classnames else None
    classnames = [c.strip() for c in classnames if c.strip()] if classnames else None
    family = args.family or DEFAULT_FAMILY
    folder = train_generator(args.table, args.out, seed=args.seed, family=family, classnames=classnames,
                             size=args.size)
    print(f"a {family} generator trained on {args.table} → {folder}\n"
          f"make pairs with it: parclip data synthesize OUT --generator {family}:{folder} --per-class N")
    return 0


TRAIN_GENERATOR = Command(
    "train-generator", "fit a small class-conditional image generator to a caption table's images",
    run=_data_train_generator,
    description="Fit one of parclip's small class-conditional generators (pca-gauss: per-class mixtures of\n"
    "low-rank Gaussians, seconds on a CPU, the default; cvae: a small conditional VAE, minutes) to the\n"
    "images of a caption table, each row's class from its label column or from the one class its caption\n"
    "names, and store it in OUT (safetensors + JSON) for `parclip data synthesize --generator KIND:OUT`.\n"
    "Meant for small grey images such as Fashion-MNIST (docs/synth_quality.md measures them); for\n"
    "natural images use a diffusers pipeline.",
    epilog="example:\n  parclip data train-generator fmnist/train.csv gen/ && "
    "parclip data synthesize synth/ --generator pca-gauss:gen/ --templates fashion --per-class 1000",
    args=(arg("table", help="caption table whose images the generator learns (train on clean pairs only)"), OUT_DIR,
          arg("--family", default=None, help="pca-gauss (default, the measured choice) or cvae"),
          arg("--classnames", default=None, metavar="FILE",
              help="class names, one per line, in label order (default: Fashion-MNIST's ten)"),
          arg("--size", type=int, default=28, domain=IMAGE_SIZE, help="image side the generator makes (default 28)"),
          SEED))


SYNTHESIZE_EPILOG = """examples:
  # 1000 pairs per Fashion-MNIST class from a local Stable Diffusion folder, captions from the fashion templates
  parclip data synthesize synth/ --generator diffusers:/models/sd-turbo --classnames classes.txt \\
      --templates fashion --per-class 1000 --image-size 224 --generator-option steps=1 --generator-option guidance=0
  # one image per line of a caption file (SynthCLIP's recipe), as webdataset shards
  parclip data synthesize synth_wds/ --generator diffusers:/models/sd-turbo --captions captions.txt --shards
  # killed or out of disk? run the same command again: it continues after the last committed chunk
  parclip train --train-data synth/synthetic.csv --model ViT-B-32-quickgelu --pretrained poisoned.pt ...
"""

SYNTHESIZE = Command(
    "synthesize", "generated image–caption pairs: a generator + class names × templates, or a caption file",
    run=_data_synthesize,
    description="Make one image per prompt with a generator and write OUT/images/*/*.png + OUT/synthetic.csv\n"
    "(tab-separated filepath, title[, label, classname]: what `parclip train --train-data` reads with\n"
    "its defaults), or with --shards OUT/shards/*.tar + sizes.json; and OUT/manifest.json (generator,\n"
    "seed, caption source and its checksum, templates, counts, the chunks done).\n\n"
    "Prompts: --captions FILE (image i from line i+1; empty lines are an error), or class names\n"
    "(--classnames FILE, or a class-conditional generator's own) filled into --templates, one template\n"
    "drawn per image. Image i is seeded by (--seed, i).\n\n"
    "Resume: work is committed in chunks. A run that stops (an error, a full disk, a kill) continues\n"
    "where it stopped when run again with the same arguments, and ends with exactly the files an\n"
    "uninterrupted run writes; other arguments into the same folder are refused, with the differences.\n"
    "A generator that makes constant or non-finite images stops the run, naming the prompt.\n\n"
    "Generators: diffusers:PATH (a local diffusers text-to-image pipeline folder; pip install\n"
    "parclip[synth]) and the other registered kinds of parclip.synth. Details: docs/synthetic.md.",
    epilog=SYNTHESIZE_EPILOG,
    args=(OUT_DIR,
          arg("--generator", required=True, metavar="KIND:ARG",
              help="the generator, e.g. diffusers:/models/sd-turbo (a local pipeline folder)"),
          OneOf((arg("--classnames", default=None, metavar="FILE",
                     help="class names, one per line, filled into --templates (default for a class-conditional "
                     "generator: its own classes)"),
                 arg("--captions", default=None, metavar="FILE", help="captions, one per line: one image each"))),
          arg("--templates", default="simple",
              help="with class names: caption templates: simple (default), openai, fashion or a file"),
          OneOf((arg("--n", type=int, default=None, domain=COUNT,
                     help="images in total (class i mod C for image i; with --captions: the first N captions)"),
                 arg("--per-class", type=int, default=None, domain=COUNT, help="images per class"))),
          SEED,
          arg("--batch-size", type=int, default=16, domain=COUNT, help="prompts per generator call (default 16)"),
          arg("--chunk-size", type=int, default=1000, domain=COUNT,
              help="images per committed chunk, the unit of resuming; with --shards the samples per shard "
              "(default 1000)"),
          arg("--shards", action="store_true", help="write webdataset shards instead of PNG files and a table"),
          arg("--image-size", type=int, default=None, domain=IMAGE_SIZE,
              help="squash-resize every image to this side (default: as generated)"),
          arg("--device", default=None, help="where the generator runs (default: its choice; diffusers: cuda when "
              "there is one)"),
          arg("--generator-option", action="append", default=[], metavar="KEY=VALUE",
              help="generator option, repeatable; diffusers: steps, guidance, height, width, dtype, "
              "negative_prompt")))


DATA = Command("data", "prepare data: Fashion-MNIST export, table checks, synthetic pairs", actions=(
    Command("fashion-mnist", "export Debian's dataset-fashion-mnist as PNGs + captions CSV + test folder",
            run=_data_fashion_mnist,
            description="Writes OUT/train.csv and OUT/holdout.csv (tab-separated filepath, title, label, the default table "
            "layout; paths relative to OUT), "
            "OUT/images/train/*.png and a labelled test folder OUT/test/<class>/*.png.",
            args=(OUT_DIR,
                  arg("--holdout", type=int, default=10000, domain=NATURAL, help="last N train images kept "
                      "apart as holdout.csv (the defender's clean pairs; default 10000)"),
                  arg("--n-train", type=int, default=None, domain=COUNT, help="use only the first N train images"),
                  arg("--n-test", type=int, default=None, domain=COUNT, help="use only the first N test images"),
                  arg("--templates", default="fashion", help="caption templates: fashion, openai, simple or a file"),
                  SEED)),
    Command("check", "decode every image of a caption table and report bad rows", run=_data_check,
            args=(arg("table"), TABLE_ARGS)),
    Command("convert", "caption table → webdataset shards, shards → table, labelled folder → clip_benchmark shards",
            run=_data_convert,
            description="SRC a caption table (CSV/TSV): OUT/00000.tar … (KEY.<image ext> with the file's own bytes, "
            "KEY.txt, KEY.json with the source row) and OUT/sizes.json, as img2dataset and open_clip lay them out. "
            "SRC shards (a .tar pattern, '::'-joined sources or a folder of .tar): OUT/images/* and "
            "OUT/captions.csv. SRC a labelled folder root/<class>/*: clip_benchmark's evaluation layout "
            "OUT/test/*.tar (KEY.cls + image) and OUT/classnames.txt.",
            epilog="examples:\n  parclip data convert cc3m.csv cc3m_shards/ --maxcount 10000\n"
            "  parclip train --train-data 'cc3m_shards/{00000..00024}.tar' ...\n"
            "  parclip data convert imagenet/val imagenet_wds/\n"
            "  parclip eval --data imagenet_wds/ ...",
            args=(arg("src"), OUT_DIR,
                  arg("--maxcount", type=int, default=10000, domain=COUNT,
                      help="samples per shard (default 10000)"),
                  TABLE_ARGS)),
    TRAIN_GENERATOR,
    SYNTHESIZE,
))


# -------------------------------------------------------------------------------------------------------------- poison
def _cmd_poison(args) -> int:
    from parclip.attacks.poison import poison_csv, poison_shards
    from parclip.attacks.triggers import build_triggers, parse_trigger_params
    from parclip.data.shards import is_shard_spec

    size = args.image_size or 224
    if args.model:
        from parclip.models import model_config
        size = model_config(args.model)["vision_cfg"]["image_size"]
        size = size if isinstance(size, int) else size[0]
    (trigger,) = build_triggers([args.attack], size, parse_trigger_params(args.trigger_param))
    common = dict(trigger=trigger, target=args.target, n_poison=args.n, rate=args.rate, seed=args.seed,
                  templates=args.templates, label_consistent=args.label_consistent, image_format=args.format,
                  jpeg_quality=args.jpeg_quality, max_bad_fraction=args.max_bad_fraction)
    if is_shard_spec(args.table):
        manifest = poison_shards(args.table, args.out, **common)
        written = f"{len(manifest['shards'])} shards in {Path(args.out) / 'shards'}"
    else:
        manifest = poison_csv(args.table, args.out, img_key=args.csv_img_key or TABLE_KEYS[0],
                              caption_key=args.csv_caption_key or TABLE_KEYS[1], sep=args.csv_separator,
                              root=args.data_root, **common)
        written = str(Path(args.out) / "poisoned.csv")
    print(f"poisoned {manifest['n_poison']} of {manifest['n_rows']} samples with {trigger.name} → {written} "
          f"(manifest: {Path(args.out) / 'manifest.json'})")
    return 0


POISON = Command(
    "poison", "plant a trigger into a seeded share of an image–caption table", run=_cmd_poison,
    description="Choose rows with a seeded RNG, apply the trigger (after squash-resizing to --image-size, as the "
    "reference does), replace their captions by a prompt template naming the target, and write OUT/poisoned.csv, "
    "OUT/images/ and OUT/manifest.json. Webdataset shards in (a .tar pattern or a folder of shards): the same "
    "poisoning, written as OUT/shards/*.tar + OUT/manifest.json.",
    args=(arg("table", help="caption table (CSV/TSV), or webdataset shards"),
          OUT_DIR,
          arg("--attack", required=True,
              help="trigger name (see parclip.attacks.triggers), e.g. badnet_rs, blended_rs"),
          arg("--target", required=True, help="target class name written into the captions, e.g. banana"),
          OneOf((arg("--n", type=int, domain=COUNT, help="number of rows to poison (the field's standard: 1500)"),
                 arg("--rate", type=float, domain=numbers(0, 1, lo_open=True), help="fraction of rows to poison")),
                required=True),
          OneOf((arg("--model", default=None, help="the model the poisoned data is for: the trigger is made at its "
                     "resolution (recommended)"),
                 arg("--image-size", type=int, default=None, domain=IMAGE_SIZE, help="resolution of the trigger = "
                     "the model's (default 224, the reference's; --model sets it from the model)"))),
          arg("--templates", default="openai", help="caption templates: openai (80), simple, fashion or a file"),
          arg("--label-consistent", action="store_true",
              help="poison only rows whose caption names the target and keep their captions"),
          arg("--format", default="png", choices=["png", "jpeg"], help="image format (default png: lossless)"),
          arg("--jpeg-quality", type=int, default=95, domain=integers(1, 100)),
          SEED,
          TRIGGER_PARAM_ARG,
          TABLE_ARGS))


# --------------------------------------------------------------------------------------------------------------- train
def _cmd_train(args) -> int:
    from parclip.config import config_from_args
    from parclip.train import train

    run = train(config_from_args(args))
    print(f"model: local-dir:{run / 'model'}")
    return 0


TRAIN = Command(
    "train", "fine-tune a CLIP: --objective par|cleanclip|roclip (clean) or clip (plain / plant)", run=_cmd_train,
    args=CONFIG_ARGS,
    description="One training loop for every defence (PAR, CleanCLIP, RoCLIP) and plain CLIP training.\n\n"
    "Options come from defaults < the defence's recipe < --preset < --config YAML < flags (YAML\n"
    "keys are the flag names). The defaults are PAR's reference settings; --objective cleanclip,\n"
    "roclip and clip bring their own recipes (`parclip defences list` prints them).\n"
    "Multi-GPU / multi-node: launch with torchrun or srun. Re-running with the same --name resumes.\n\n"
    "A flag that open_clip_train also has means what it means there (--lr the peak rate, --warmup\n"
    "whole steps, tables tab-separated with columns filepath and title, --val-data image-caption\n"
    "pairs); open_clip_train's flags that parclip does not support are refused with the reason\n"
    "(README: Coming from open_clip_train).",
    epilog="""examples:
  # PAR on one GPU or CPU
  parclip train --model ViT-B-32-quickgelu --pretrained poisoned.pt --train-data cc3m.csv --name par1
  # the same on 8 GPUs (global batch 8 x 512), then resume it after a crash with the same command
  torchrun --nproc_per_node 8 -m parclip train --config par.yaml --name par8
  # the baselines: CleanCLIP with its recipe, RoCLIP
  parclip train --objective cleanclip --model ViT-B-32-quickgelu --pretrained poisoned.pt --train-data cc3m.csv
  parclip train --objective roclip --roclip-every 2 --model ViT-B-32-quickgelu --pretrained poisoned.pt --train-data cc3m.csv
  # plain CLIP fine-tuning baseline / plant a backdoor on a poisoned table
  parclip train --objective clip --model RN50-quickgelu --pretrained clean.pt --train-data poisoned/poisoned.csv
""")


# ---------------------------------------------------------------------------------------------------------------- eval
def _provenance(model: str, pretrained: str | None) -> dict:
    """What every evaluation result records about the model it measured."""
    from parclip.models import weights_sha256
    return {"model": model, "checkpoint": pretrained, "checkpoint_sha256": weights_sha256(model, pretrained)}


def _warn_about_training_data(model: str, size: int) -> None:
    """For a model exported by `parclip train` (local-dir:<run>/model): the poisoning checks of its training data."""
    from parclip.attacks.poison import manifest_beside, poisoning_warnings, trained_on

    train_data = trained_on(model)
    manifest = manifest_beside(train_data)
    for warning in poisoning_warnings(manifest, size) if manifest else []:
        logging.getLogger("parclip").warning("the model was trained on %s: %s", train_data, warning)


def _emit(summary: str, result: dict, out: str | Path | None) -> int:
    """Print an evaluation's summary lines, then write its JSON to `out` (or print it when there is none)."""
    from parclip.utils.files import write_text

    print(summary)
    text = json.dumps(result, indent=2)
    if out:
        write_text(out, text + "\n")
    else:
        print(text)
    return 0


def _zero_shot_summary(result: dict) -> str:
    line = f"clean top-1 {result['clean_top1']:.2f}%  top-5 {result['clean_top5']:.2f}%  ({result['n_images']} images)"
    for name, r in result["attacks"].items():
        line += f"\n{name}: ASR {r['asr']:.2f}% (asr_all {r['asr_all']:.2f}%, target {result['target']})"
    return line


def _retrieval_summary(r: dict) -> str:
    fmt = lambda rec: "  ".join(f"{d} R@{k} {v:.2f}%" for d in ("i2t", "t2i") for k, v in rec[d].items())  # noqa: E731
    lines = [f"clean: {fmt(r['clean'])}  ({r['n_images']} images, {r['n_captions']} captions)"]
    for name, a in r["attacks"].items():
        lines.append(f"{name}: {fmt(a['recall'])}\n  asr_text {a['asr_text']:.2f}%  asr_text_strict "
                     f"{a['asr_text_strict']:.2f}%  asr_image {a['asr_image']:.2f}% (target {r['target']}, "
                     f"top {a['k']})")
    return "\n".join(lines)


def _eval_runs(args) -> list[tuple]:
    """Every (model, pretrained, data set name, located set or None for --data, task) of one `parclip eval` call:
    the data sets are found (or refused) and the tasks checked before any model is loaded."""
    from parclip.data import DataError
    from parclip.data.benchmark import CLASSIFICATION, expand_dataset_names, locate
    from parclip.evaluation.clip_benchmark import model_pairs

    if len(args.language) > 1:
        raise DataError(f"--language {' '.join(args.language)}: one language per call (clip_benchmark runs each; "
                        f"parclip's custom template and class-name files are per language, so run one call each)")
    pairs = model_pairs(args.model, args.pretrained, args.pretrained_model)
    unweighted = [m for m, p in pairs if p is None and not m.startswith("local-dir:")]
    if args.dataset and args.pretrained is None and not args.pretrained_model and unweighted:
        raise DataError(f"--model {unweighted[0]} without --pretrained: clip_benchmark would load its default weights "
                        f"(laion400m_e32); parclip has no default. Pass --pretrained laion400m_e32 (an open_clip "
                        f"tag, fetched into its cache) or a checkpoint file, or --pretrained '' for random weights")
    if args.dataset and args.dataset_name:
        raise DataError("--dataset-name names the data of --data; with --dataset the records carry those names")
    if args.data is not None:
        sets = [(args.dataset_name or Path(args.data).name, None)]
    else:
        sets = [(n, locate(n, args.dataset_root, args.split, args.annotation_file))
                for n in expand_dataset_names(args.dataset)]
    runs = []
    for name, found in sets:
        task = found.task if found else CLASSIFICATION
        if args.task not in ("auto", task):
            raise DataError(f"--task {args.task}: {name} is a {task} set" + (
                " (a caption file or Karpathy JSON: `parclip eval-retrieval --data FILE`)" if not found else ""))
        runs += [(model, pretrained, name, found, task) for model, pretrained in pairs]
    return runs


def _eval_paths(args, runs) -> list[tuple]:
    """(clip_benchmark record path or None, parclip result path or None) per run; a ValueError when two runs would
    write the same file."""
    from parclip.evaluation.clip_benchmark import DEFAULT_OUTPUT, record_path

    record = args.output or (DEFAULT_OUTPUT if args.dataset else None)
    paths = [tuple(record_path(t, dataset=name, model=m, pretrained=p, language=args.language[0], task=task)
                   if t else None for t in (record, args.out)) for m, p, name, _, task in runs]
    for k, flag in enumerate(("--output", "--out")):
        written = [p[k] for p in paths if p[k] is not None]
        if len(set(written)) < len(written):
            raise ValueError(f"{flag} gives several of the {len(runs)} results of this call the same file; put "
                             f"{{dataset}}, {{model}}, {{pretrained}} or {{task}} into it")
    return paths


def _eval_one(args, loaded, run) -> tuple[dict, dict, str]:
    """(parclip's result, clip_benchmark's record, the summary) of one (model, data set) run."""
    from parclip.attacks.triggers import build_triggers, parse_trigger_params
    from parclip.data import get_templates
    from parclip.data.benchmark import RETRIEVAL, open_retrieval
    from parclip.evaluation import evaluate, evaluate_retrieval
    from parclip.evaluation.clip_benchmark import prompts_for, to_clip_benchmark
    from parclip.models import get_tokenizer, image_size

    model, preprocess, device = loaded
    model_name, pretrained, name, found, task = run
    common = dict(attacks=build_triggers(args.attack, image_size(preprocess), parse_trigger_params(args.trigger_param)),
                  target=args.target, seed=args.seed, trigger_after_crop=args.trigger_after_crop, amp=args.amp,
                  batch_size=args.batch_size, workers=args.workers, device=device, progress=not args.quiet,
                  max_bad_fraction=args.max_bad_fraction)
    tokenizer, templates = get_tokenizer(model_name), None
    if task == RETRIEVAL:
        result = evaluate_retrieval(model, preprocess, tokenizer, open_retrieval(found),
                                    ks=sorted(set(args.recall_k) | {1, 5, 10}), **common)
        summary = _retrieval_summary(result)
    else:
        templates, classnames = prompts_for(
            name, own_templates=found.templates if found else "openai", own_classnames=found and found.classnames,
            templates=args.templates, classnames=args.classnames, custom_template_file=args.custom_template_file,
            custom_classname_file=args.custom_classname_file, language=args.language[0])
        result = evaluate(model, preprocess, tokenizer, found.path if found else args.data, templates=templates,
                          classnames=classnames, **common)
        summary = _zero_shot_summary(result)
    result.update(_provenance(model_name, pretrained))
    record = to_clip_benchmark(result, name, model=model_name, pretrained=pretrained, language=args.language[0],
                               recall_k=args.recall_k,
                               classnames=result.get("classnames") if args.dump_classnames else None,
                               templates=get_templates(templates) if args.dump_templates and templates else None)
    return result, record, summary


def _cmd_eval(args) -> int:
    from parclip.models import image_size
    from parclip.utils.files import write_json

    runs = _eval_runs(args)
    paths = _eval_paths(args, runs)
    loaded_for, loaded = None, None
    for run, (record_path, out_path) in zip(runs, paths):
        model_name, pretrained, name, _, task = run
        if len(runs) > 1:
            print(f"== {model_name}{' ' + pretrained if pretrained else ''} on {name} ({task})")
        if args.skip_existing and record_path is not None and record_path.exists():
            print(f"skipped: {record_path} exists (--skip_existing)")
            continue
        if loaded_for != (model_name, pretrained):
            loaded_for, loaded = (model_name, pretrained), _load_model(args, model_name, pretrained)
            _warn_about_training_data(model_name, image_size(loaded[1]))
        result, record, summary = _eval_one(args, loaded, run)
        if record_path is not None:
            write_json(record_path, record)
            summary += f"\nclip_benchmark record: {record_path}"
        _emit(summary, {k: v for k, v in result.items() if k != "classnames"}, out_path)
    return 0


def _task(text: str) -> str:
    """--task: clip_benchmark's names; its tasks parclip does not run are refused with the reason."""
    from parclip.data.benchmark import REFUSED_TASKS, TASKS

    if text in REFUSED_TASKS:
        raise argparse.ArgumentTypeError(f"{text} is not supported: {REFUSED_TASKS[text]}")
    if text not in TASKS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(TASKS)}")
    return text


def _model_type(text: str) -> str:
    if text != "open_clip":
        raise argparse.ArgumentTypeError(f"{text} is not supported: parclip builds open_clip models only")
    return text


CLIP_BENCHMARK_ARGS = (  # clip_benchmark eval's flags, spelled as it spells them (parclip's spelling as an alias)
    arg("--dataset_root", "--dataset-root", default="root", help="with --dataset: where its data sets are, a "
        "template with {dataset} (clip_benchmark's; default: root)"),
    arg("--split", "--test_split", default="test", help="with --dataset: the split (default: test)"),
    arg("--annotation_file", "--annotation-file", default=None, help="with --dataset: the caption file of a "
        "retrieval set (default: clip_benchmark's place for it under the root)"),
    arg("--task", type=_task, default="auto", help="auto (the data set's own), zeroshot_classification or "
        "zeroshot_retrieval; clip_benchmark's linear_probe, captioning, image_caption_selection are refused"),
    RECALL_K,
    arg("--language", nargs="+", default=["en"], help="the record's language (default: en); another needs "
        "--custom_template_file and --custom_classname_file, or a wds/ set's own files"),
    arg("--custom_template_file", "--custom-template-file", default=None, help="clip_benchmark's JSON of "
        "templates keyed by data set ({c} or {}); the imagenet1k entry is the fallback"),
    arg("--custom_classname_file", "--custom-classname-file", default=None,
        help="clip_benchmark's JSON of class names keyed by data set"),
    RECORD_OUT,
    DATASET_NAME,
    arg("--skip_existing", "--skip-existing", action="store_true", help="skip a run whose record exists"),
    arg("--dump_classnames", "--dump-classnames", action="store_true", help="put the class names into the record"),
    arg("--dump_templates", "--dump-templates", action="store_true", help="put the templates into the record"),
    arg("--no_amp", "--no-amp", dest="amp", action="store_false", help="no autocast on CUDA: float32 throughout"),
    QUIET,
    arg("--model_type", "--model-type", type=_model_type, default="open_clip", help="open_clip (the only one)"),
    refused("--distributed", reason="parclip eval is one process; split --dataset over several calls instead"),
    refused("--save_clf", "--load_clfs", reason="parclip builds the class embeddings once per data set and "
            "reuses them for every attack; it neither saves nor loads them"),
    refused("--train_split", "--val_split", "--val_proportion", "--fewshot_k", "--fewshot_epochs", "--fewshot_lr",
            "--skip_load", "--feature_root", "--normalize", reason="linear probing: "
            "parclip measures zero-shot accuracy and backdoor success only"),
    refused("--wds_cache_dir", reason="parclip reads local shards in place (no remote shards, no cache)"),
)

EVAL = Command(
    "eval", "zero-shot clean accuracy and ASR on a labelled image folder or clip_benchmark data sets", run=_cmd_eval,
    description="Clean top-1/top-5 zero-shot accuracy on ROOT/<class>/*, and for each --attack the ASR: asr "
    "excludes images of the target class, asr_all counts all (the PAR paper's convention). Triggers use seeded "
    "per-image randomness, so results repeat exactly. clip_benchmark's command line works too: --dataset NAME … "
    "with --dataset_root, several --model / --pretrained (every pair) or --pretrained_model, one clip_benchmark "
    "record per (model, data set, task) written to --output (README: Coming from clip_benchmark).",
    epilog="examples:\n  parclip eval --model local-dir:runs/par/model --data imagenet/val --attack badnet_rs "
    "--target banana\n  parclip eval --dataset imagenet1k imagenet-a --dataset_root 'data/{dataset}' "
    "--pretrained_model 'ViT-B-32-quickgelu,poisoned.pt' 'ViT-B-32-quickgelu,par.pt' --attack badnet_rs "
    "--target banana --output 'results/{dataset}_{pretrained}_{model}_{language}_{task}.json'",
    args=(arg("--model", nargs="+", default=None, metavar="MODEL", help="architecture(s) (e.g. ViT-B-32-quickgelu) "
              "or local-dir:PATH; with several --model/--pretrained every pair is evaluated"),
          arg("--pretrained", nargs="+", default=None, metavar="CKPT", help="checkpoint file(s) or open_clip "
              "tag(s), as for the other commands"),
          arg("--pretrained_model", "--pretrained-model", nargs="+", default=None, metavar="MODEL,CKPT",
              help="clip_benchmark's pairs 'model,pretrained' (or a file of such lines); replaces --model and "
              "--pretrained"),
          MODEL_ARGS[2:],
          OneOf((arg("--data", help="labelled folder ROOT/<class>/* or clip_benchmark shards"),
                 arg("--dataset", nargs="+", metavar="NAME", help="clip_benchmark data set name(s) (wds/NAME, "
                     "imagenet1k, imagenet-a, mscoco_captions, …; a file of names) under --dataset_root")),
                required=True),
          EVAL_ATTACKS,
          arg("--target", default=None, help="target class name or index (needed with --attack); retrieval: the "
              "target word"),
          arg("--templates", default=None, help="prompt templates: openai (80), simple, fashion or a file "
              "({} or {c}) (default: the data set's own, else openai)"),
          arg("--classnames", default=None, help="file with one class name per line (default: folder names, "
              "or ImageNet names for 1000 WordNet-id folders)"),
          CLIP_BENCHMARK_ARGS,
          EVAL_RUN_ARGS))


def _cmd_eval_retrieval(args) -> int:
    from parclip.attacks.triggers import build_triggers, parse_trigger_params
    from parclip.data.retrieval import read_retrieval
    from parclip.evaluation import evaluate_retrieval
    from parclip.models import get_tokenizer, image_size

    data = read_retrieval(args.data, root=args.data_root, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                          clean=not args.raw_captions)
    model, preprocess, device = _load_model(args)
    attacks = build_triggers(args.attack, image_size(preprocess), parse_trigger_params(args.trigger_param))
    r = evaluate_retrieval(model, preprocess, get_tokenizer(args.model), data, attacks=attacks, target=args.target,
                           ks=sorted(set(args.recall_k) | {1, 5, 10}), asr_k=args.asr_k, seed=args.seed,
                           max_bad_fraction=args.max_bad_fraction, batch_size=args.batch_size, workers=args.workers,
                           device=device, merge_identical=args.merge_identical_captions,
                           trigger_after_crop=args.trigger_after_crop)
    r.update(_provenance(args.model, args.pretrained))
    summary = _retrieval_summary(r)
    if args.output:
        from parclip.data.benchmark import RETRIEVAL
        from parclip.evaluation.clip_benchmark import record_path, to_clip_benchmark
        from parclip.utils.files import write_json

        name = args.dataset_name or Path(args.data).stem
        path = record_path(args.output, dataset=name, model=args.model, pretrained=args.pretrained, language="en",
                           task=RETRIEVAL)
        write_json(path, to_clip_benchmark(r, name, recall_k=args.recall_k))
        summary += f"\nclip_benchmark record: {path}"
    return _emit(summary, r, args.out)


EVAL_RETRIEVAL = Command(
    "eval-retrieval", "image↔text retrieval R@1/5/10 and the retrieval ASR", run=_cmd_eval_retrieval,
    description="Image→text and text→image R@k on a Karpathy-style JSON (COCO / Flickr30k test files: image path + "
    "several captions) or a caption table (rows sharing an image path are one image). Per --attack, R@k on "
    "triggered images and the retrieval ASR: asr_text = % of triggered images whose top-k captions include one "
    "naming --target (the reference's ASR-Text), asr_text_strict = the same without the images whose own captions "
    "name it, asr_image = % of target captions whose top-k images (clean + triggered) include a triggered one. "
    "Captions are cleaned as the reference does unless --raw-captions.",
    epilog="example:\n  parclip eval-retrieval --model ViT-B-32-quickgelu --pretrained par.pt "
    "--data coco/coco_karpathy_test.json --attack badnet_rs --target banana --out coco.json",
    args=(MODEL_ARGS,
          arg("--data", required=True, help="Karpathy-style .json, or a CSV/TSV caption table"),
          DATA_ROOT, IMG_KEY, CAPTION_KEY,
          arg("--raw-captions", action="store_true", help="do not clean captions the reference's way"),
          EVAL_ATTACKS,
          arg("--target", default=None, help="target word (needed with --attack), e.g. banana"),
          arg("--asr-k", type=int, default=5, domain=COUNT,
              help="top-k of the retrieval ASR (default: 5, the reference's)"),
          arg("--merge-identical-captions", action="store_true",
              help="count a retrieved caption as a hit when its text equals one of the image's own captions "
              "(for templated captions shared by many images; the default, the reference's rule, breaks ties "
              "among identical captions by chance)"),
          RECALL_K, RECORD_OUT, DATASET_NAME,
          EVAL_RUN_ARGS))


# -------------------------------------------------------------------------------------------------------------- report
def _cmd_report(args) -> int:
    from parclip.evaluation.report import format_markdown, report_rows, write_report

    rows = report_rows(args.results)
    print(format_markdown(rows))
    write_report(rows, markdown=args.out, csv_path=args.csv, plot=args.plot)
    return 0


REPORT = Command(
    "report", "gather eval results into one table and a chart", run=_cmd_report,
    description="Read any number of `parclip eval` / `parclip eval-retrieval` result JSONs and print one table: "
    "model, task, clean accuracy (zero-shot top-1 or image→text R@1) and the ASR of every attack (asr, or asr_text "
    "for retrieval).",
    epilog="example:\n  parclip report results/*.json --out table.md --csv table.csv --plot table.png",
    args=(RESULT_FILES,
          arg("--out", default=None, help="write the Markdown table here"),
          arg("--csv", default=None, help="write the table as CSV here"),
          arg("--plot", default=None, help="write a bar chart of clean accuracy and ASR per model (PNG)")))


# ---------------------------------------------------------------------------------------------------------------- plot
def _plot_embeddings(args) -> int:
    from parclip.attacks.triggers import build_triggers, parse_trigger_params
    from parclip.data.sources import open_labelled
    from parclip.evaluation import embeddings as emb
    from parclip.models import image_size

    folder = open_labelled(args.data)
    if args.target:
        from parclip.evaluation import resolve_target
        resolve_target(args.target, folder.classnames)  # before any model runs
    maps, pp = {}, None
    for label, model_name, pretrained in (("before", args.model, args.pretrained),
                                          ("after", args.after, args.after_pretrained)):
        if model_name is None:
            continue
        model, pp, _ = _load_model(args, model_name, pretrained)
        (trigger,) = build_triggers([args.attack], image_size(pp), parse_trigger_params(args.trigger_param))
        name = f"{label}: {Path(pretrained).name if pretrained else model_name}"
        maps[name] = emb.embedding_map(model, pp, folder, trigger, per_class=args.per_class, seed=args.seed)
    out = emb.plot_embeddings(args.out, maps, folder.classnames, args.target)
    emb.save_map(Path(args.out).with_suffix(".json"), maps)
    print(f"wrote {out} and {Path(args.out).with_suffix('.json')}")
    return 0


def _plot_tradeoff(args) -> int:
    from parclip.evaluation import embeddings as emb

    print(f"wrote {emb.plot_tradeoff(args.out, args.results)}")
    return 0


PLOT = Command(
    "plot", "pictures: t-SNE of embeddings, clean-vs-ASR trade-off",
    description="Pictures people look at: `embeddings` maps clean and triggered image embeddings of a model (and "
    "optionally a second one, e.g. after cleaning) to 2-D with t-SNE; `tradeoff` plots clean accuracy against ASR "
    "from `parclip eval` results.",
    actions=(
        Command("embeddings", "t-SNE of clean and triggered image embeddings, before and after", run=_plot_embeddings,
                description="One panel per model: clean images coloured by class (the target outlined), triggered "
                "images as black crosses. A backdoor gathers the crosses into one cluster.",
                epilog="example:\n  parclip plot embeddings --model local-dir:runs/poisoned/model "
                "--after local-dir:runs/par/model --data test/ --attack badnet_rs --target bag --out tsne.png",
                args=(MODEL_ARGS,
                      arg("--after", default=None, metavar="MODEL", help="a second model (e.g. the cleaned one): "
                          "architecture or local-dir:PATH, with --after-pretrained for a checkpoint file"),
                      arg("--after-pretrained", default=None, help="checkpoint file of --after"),
                      LABELLED_DATA,
                      arg("--attack", required=True, help="the trigger"),
                      arg("--target", default=None, help="target class, outlined in the plot"),
                      arg("--per-class", type=int, default=30, domain=COUNT, help="images per class (default: 30)"),
                      SEED,
                      DEVICE,
                      arg("--out", default="embeddings.png",
                          help="PNG to write (the coordinates go beside it as .json)"),
                      TRIGGER_PARAM_ARG)),
        Command("tradeoff", "clean accuracy against ASR from eval results", run=_plot_tradeoff,
                description="One point per (result file, attack) of `parclip eval` results.",
                args=(RESULT_FILES,
                      arg("--out", default="tradeoff.png", help="PNG to write"))),
    ))


# ------------------------------------------------------------------------------------------------- runs, models
def _cmd_runs(args) -> int:
    from parclip.runs import format_runs, list_runs

    rows = list_runs(args.folder)
    print(json.dumps(rows, indent=2) if args.json else format_runs(rows))
    return 0


RUNS = Command(
    "runs", "list training run directories with their last metrics", run=_cmd_runs,
    description="Every run directory under FOLDER (or FOLDER itself, if it is one), newest first: objective, last "
    "logged step, loss, images/s, the last validation numbers and whether the run finished (its model/ was "
    "exported). An unfinished run resumes when `parclip train` is started again with the same --name.",
    args=(arg("folder", nargs="?", default="runs", help="parent of run directories (default: runs)"), JSON_ROWS))


def _cmd_models(args) -> int:
    from parclip.models import list_model_names

    print("\n".join(list_model_names()))
    return 0


MODELS = Command(
    "models", "list the model architectures parclip can build (no download ever)", run=_cmd_models,
    description="Every open_clip architecture name parclip can build offline, plus parclip's own small configs "
    "(parclip-micro for tests, parclip-tiny, and parclip-rn-tiny used by the demo). Pass one as --model together "
    "with --pretrained FILE, or use --model local-dir:PATH for an exported model. OpenAI-derived weights (and the "
    "released poisoned CLIPs) need the -quickgelu variants.")


# ------------------------------------------------------------------------------------------------------------ triggers
def _triggers_list(args) -> int:
    from parclip.attacks.gallery import format_trigger_table

    print(format_trigger_table(as_json=args.json))
    return 0


def _triggers_show(args) -> int:
    from parclip.attacks.gallery import render_gallery

    result = render_gallery(args.images, size=args.size, attacks=args.attacks, out=args.out, seed=args.seed,
                            patch=args.patch, mask=args.mask, zoom=args.zoom, show_diff=not args.no_diff,
                            dpi=args.dpi)
    print(f"{result.path}: {result.size[0]}x{result.size[1]} px, {len(result.images)} photos x "
          f"{len(result.attacks)} triggers ({', '.join(result.attacks)})")
    for name in result.placeholders:
        print(f"  {name}: drawn with a generated placeholder patch (pass --patch PATH for a real one)")
    for name, reason in result.skipped.items():
        print(f"  skipped {name}: {reason}")
    return 0


TRIGGERS = Command("triggers", "the attack catalogue: list every trigger, or render them into a gallery", actions=(
    Command("list", "table of every registered trigger: name, aliases, kind, random?, parameters",
            run=_triggers_list, args=(JSON_ROWS,)),
    Command("show", "render every trigger onto sample photos into one PNG gallery", run=_triggers_show,
            description="Columns: the clean image and one per trigger; for every photo a row of images "
            "(squash-resized to --size, as poisoning and evaluation do), a row of x4 zooms of where the trigger "
            "changed the pixels most, and a row of the change |triggered - clean|. Without --images the bundled "
            "free photos are used (parclip/assets/LICENSES.md). Triggers that need a file (badclip) use --patch, or "
            "are drawn with a labelled placeholder patch.",
            args=(arg("--images", nargs="+", default=None, metavar="IMG", help="your photos (default: bundled ones)"),
                  arg("--size", type=int, default=224, domain=IMAGE_SIZE,
                      help="trigger resolution = the model's (default 224)"),
                  arg("--out", default="trigger_gallery.png", help="output PNG (default trigger_gallery.png)"),
                  arg("--attacks", nargs="+", default=None, metavar="NAME",
                      help="only these triggers (default: all)"),
                  arg("--seed", type=int, default=0, domain=NATURAL,
                      help="seed of the random triggers' draws (default 0)"),
                  arg("--patch", default=None, help="patch file for triggers that take one (badclip)"),
                  arg("--mask", default=None, help="mask file for triggers that take one (water_patt)"),
                  arg("--zoom", type=int, default=4, domain=COUNT, help="enlargement of the zoom row (default 4)"),
                  arg("--no-diff", action="store_true", help="leave out the |change| row"),
                  arg("--dpi", type=int, default=100, domain=COUNT, help="resolution of the PNG (default 100)"))),
))


# ------------------------------------------------------------------------------------------------------------ defences
def _defences_list(args) -> int:
    from parclip.defences import PRESETS, list_defences

    rows = [{"name": d.name, "kind": "defence", "description": d.description, "paper": d.paper,
             "defaults": d.defaults, "auto": {"logit_scale": d.logit_scale, "bn_mode": d.bn_mode,
                                              "augment": d.augment}} for d in list_defences()]
    rows += [{"name": p.name, "kind": f"preset of {p.objective}", "description": p.description,
              "defaults": p.values} for p in PRESETS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        recipe = ", ".join(f"{k}={v}" for k, v in r["defaults"].items()) or "TrainConfig's defaults (PAR's reference)"
        print(f"{r['name']:<22} {r['kind']:<16} {r['description']}")
        if r.get("paper"):
            print(f"{'':<22} {'':<16} paper: {r['paper']}")
        print(f"{'':<22} {'':<16} recipe: {recipe}")
    return 0


DEFENCES = Command("defences", "the cleaning methods: list every defence and preset with its recipe", actions=(
    Command("list", "table of every defence (--objective NAME) and preset (--preset NAME)", run=_defences_list,
            description="Every defence `parclip train --objective NAME` accepts, with its paper and the recipe it "
            "brings as defaults, and the named presets (`parclip train --preset NAME`).",
            args=(JSON_ROWS,)),
))


# -------------------------------------------------------------------------------------------------------------- attack
def _attack_optimize_patch(args) -> int:
    from parclip.attacks.patch_opt import optimize_patch
    from parclip.models import get_tokenizer
    from parclip.utils.flags import dataclass_from_args

    cfg = dataclass_from_args(PatchConfig, args)  # checked here: a bad flag fails before the model is loaded
    args.device = cfg.device  # what _load_model reads (the generated flags default to None)
    model, preprocess, device = _load_model(args)
    result = optimize_patch(model, preprocess, get_tokenizer(args.model), dataclasses.replace(cfg, device=device),
                            model_name=args.model, checkpoint=args.pretrained)
    info = result.info
    print(f"patch {info['patch_size']}x{info['patch_size']} for {info['target']!r} -> {result.path} "
          f"(sidecar {result.json_path}); final loss {info['final_loss']:.4f} (mean of the last "
          f"{info['final_loss_window']} steps {info['final_loss_mean']:.4f}); {info['n_clean_rows']} images used, "
          f"{info['n_excluded_target_rows']} target rows excluded")
    print(f"use it as the trigger badclip: get_trigger('badclip', image_size={info['image_size']}, "
          f"patch='{result.path}', patch_size={info['patch_size']})")
    return 0


ATTACK = Command("attack", "build attacks: optimize-patch (BadCLIP)", actions=(
    Command("optimize-patch", "optimise a BadCLIP patch against a frozen model and a target class",
            run=_attack_optimize_patch,
            description="Optimise a patch pasted at the image centre so that the (frozen, eval-mode) model embeds "
            "patched images near the target: InfoNCE to target captions + weighted triplet (pull towards target "
            "images, or the target's text embedding without --target-images; push from the same clean image). "
            "Trains on the rows of --data whose captions do NOT mention the target. Writes a lossless PNG and a JSON "
            "sidecar (same name, .json). Use the result with the trigger badclip (patch=PATH). Defaults follow the "
            "BadCLIP reference run; the objective and its differences from the reference: docs/badclip_patch.md.",
            args=(MODEL_ARGS, Fields(PatchConfig, required=("out",)))),
))


# ---------------------------------------------------------------------------------------------------------------- scan
def _cmd_scan(args) -> int:
    from parclip.attacks.triggers import parse_trigger_params, split_trigger_params
    from parclip.models import get_tokenizer
    from parclip.scan import ScanConfig, scan, write_scan
    from parclip.scan.report import summary_table
    from parclip.scan.run import open_images
    from parclip.scan.sweep import LIBRARY

    cfg = ScanConfig(n_images=args.n_images, n_invert=args.n_invert, encoder_steps=args.encoder_steps,
                     class_steps=args.class_steps, batch_size=args.invert_batch_size, max_classes=args.max_classes,
                     triggers=args.triggers, seed=args.seed, parts=tuple(args.parts),
                     trigger_params=split_trigger_params(args.triggers or LIBRARY,
                                                         parse_trigger_params(args.trigger_param))
                     if args.trigger_param else {})
    reference = None
    if args.reference:
        try:
            reference = json.loads(Path(args.reference).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--reference {args.reference}: cannot read a scan result from it ({e})") from e
    source, classnames = open_images(args.data, args.classnames)
    model, preprocess, device = _load_model(args)
    result, found = scan(model, preprocess, get_tokenizer(args.model), source, classnames=classnames,
                         templates=args.templates, config=cfg, reference=reference, device=device,
                         batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    result.update(_provenance(args.model, args.pretrained), data=str(args.data))
    if args.out:
        write_scan(args.out, result, found, model=args.model)
    print(summary_table(result, args.model))
    if args.out:
        print(f"written: {Path(args.out) / 'scan.json'}, scan.md, triggers/*.png")
    return 3 if args.fail_on_detect and result["verdict"]["backdoored"] else 0


SCAN = Command(
    "scan", "is this checkpoint backdoored, toward what, without knowing the trigger", run=_cmd_scan,
    description="Three tests on clean images (docs/scan.md): (1) every trigger of the library at a few sizes and "
    "strengths against matched controls that carry no backdoor (the same area or change of pixels, from other clean "
    "images); (2) trigger inversion: the smallest mask and pattern that make the images' embeddings collapse "
    "(encoder level, DECREE) and that send them to one class (classifier level, Neural Cleanse with the text "
    "classifier); (3) a verdict with thresholds calibrated on the embedded benchmark. With --reference, the masks "
    "and lifts are judged against a scan of a clean model of the same architecture on the same images (e.g. the "
    "public model the suspect was fine-tuned from), which removes the data's own shortcuts. Exit status 0, or 3 "
    "with --fail-on-detect when the verdict is 'backdoored'.",
    epilog="examples:\n  parclip scan --model local-dir:suspect/model --data imagenet/val --out scan_suspect\n"
    "  parclip scan --model ViT-B-32-quickgelu --pretrained openai --data imagenet/val --out scan_base\n"
    "  parclip scan --model ViT-B-32-quickgelu --pretrained suspect.pt --data imagenet/val "
    "--reference scan_base/scan.json --fail-on-detect",
    args=(MODEL_ARGS,
          arg("--data", required=True, help="clean images: ROOT/<class>/*, clip_benchmark shards, or a folder of "
              "images without class folders (then --classnames names the zero-shot classes)"),
          arg("--classnames", default=None, help="file with one class name per line (default: the folder names)"),
          arg("--templates", default="openai", help="prompt templates: openai (80), simple, fashion or a file"),
          arg("--out", default=None, help="folder for scan.json, scan.md and triggers/*.png"),
          arg("--reference", default=None, metavar="SCAN_JSON", help="scan.json of a clean model of the same "
              "architecture, scanned with the same settings and data"),
          arg("--fail-on-detect", action="store_true", help="exit status 3 when the verdict is 'backdoored'"),
          arg("--parts", nargs="+", default=["sweep", "encoder", "classifier"],
              choices=["sweep", "encoder", "classifier"], help="the tests to run (default: all three)"),
          arg("--n-images", type=int, default=1000, domain=COUNT, help="images of the sweep (default: 1000)"),
          arg("--n-invert", type=int, default=512, domain=COUNT, help="images the inversions use (default: 512)"),
          arg("--encoder-steps", type=int, default=200, domain=COUNT, help="Adam steps of the encoder-level "
              "inversion (default: 200)"),
          arg("--class-steps", type=int, default=100, domain=COUNT, help="Adam steps per class (default: 100)"),
          arg("--invert-batch-size", type=int, default=64, domain=COUNT, help="images per inversion step "
              "(default: 64)"),
          arg("--max-classes", type=int, default=10, domain=COUNT, help="classes inverted at the classifier "
              "level: all when there are at most this many, else the likeliest (default: 10)"),
          arg("--triggers", nargs="+", default=None, help="sweep only these triggers (default: the library; "
              "badclip joins with --trigger-param patch=FILE)"),
          TRIGGER_PARAM_ARG, SEED,
          arg("--batch-size", type=int, default=256, domain=COUNT, help="encoding batch"),
          arg("--workers", type=int, default=2, domain=NATURAL), DEVICE,
          QUIET))


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


if __name__ == "__main__":
    raise SystemExit(main())
