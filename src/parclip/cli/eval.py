"""`parclip eval` (zero-shot accuracy and ASR, clip_benchmark's command line) and `parclip eval-retrieval`."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from parclip.cli.common import (CAPTION_KEY, DATA_ROOT, DATASET_NAME, EVAL_ATTACKS, EVAL_RUN_ARGS, IMG_KEY, MODEL_ARGS,
                                QUIET, RECALL_K, RECORD_OUT, _load_model, _provenance)
from parclip.utils.checks import COUNT
from parclip.utils.flags import Command, OneOf, arg, refused


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
    "record per (model, data set, task) written to --output (docs/compatibility.md: Coming from clip_benchmark).",
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
