"""What parclip has and has made, listed: `parclip runs`, `models`, `triggers list|show`, `defences list`."""
from __future__ import annotations

import json

from parclip.cli.common import IMAGE_SIZE, JSON_ROWS
from parclip.utils.checks import COUNT, NATURAL
from parclip.utils.flags import Command, arg


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
