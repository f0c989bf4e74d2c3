"""`parclip data ACTION`: fashion-mnist, check, convert, train-generator, synthesize."""
from __future__ import annotations

import json
from pathlib import Path

from parclip.cli.common import IMAGE_SIZE, OUT_DIR, SEED, TABLE_ARGS, TABLE_KEYS
from parclip.utils.checks import COUNT, NATURAL
from parclip.utils.flags import Command, OneOf, arg


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
