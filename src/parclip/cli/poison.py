"""`parclip poison`: plant a trigger into a seeded share of an image–caption table (parclip.attacks.poison)."""
from __future__ import annotations

from pathlib import Path

from parclip.cli.common import IMAGE_SIZE, OUT_DIR, SEED, TABLE_ARGS, TABLE_KEYS, TRIGGER_PARAM_ARG
from parclip.utils.checks import COUNT, integers, numbers
from parclip.utils.flags import Command, OneOf, arg


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
