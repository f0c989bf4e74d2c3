"""`parclip scan`: is this checkpoint backdoored, toward what, without knowing the trigger (parclip.scan)."""
from __future__ import annotations

import json
from pathlib import Path

from parclip.cli.common import DEVICE, MODEL_ARGS, QUIET, SEED, TRIGGER_PARAM_ARG, _load_model, _provenance
from parclip.utils.checks import COUNT, NATURAL
from parclip.utils.flags import Command, arg


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
