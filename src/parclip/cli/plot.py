"""`parclip plot ACTION`: embeddings (t-SNE before and after) and tradeoff (clean accuracy against ASR)."""
from __future__ import annotations

from pathlib import Path

from parclip.cli.common import DEVICE, LABELLED_DATA, MODEL_ARGS, RESULT_FILES, SEED, TRIGGER_PARAM_ARG, _load_model
from parclip.utils.checks import COUNT
from parclip.utils.flags import Command, arg


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
