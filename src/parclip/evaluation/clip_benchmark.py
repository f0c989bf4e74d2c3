"""clip_benchmark interop: its result records, its output file names, its model lists, and the prompts of a data set
from its template and class-name files.

**Records** (:func:`to_clip_benchmark`): one JSON object per (model, data set, task), in the layout ``clip_benchmark
eval`` writes and ``clip_benchmark build`` merges into one CSV: ``dataset`` (the name as given, ``wds/`` prefix
included), ``model``, ``pretrained``, ``task``, ``metrics``, ``language``.

* ``pretrained`` is always a string: the ``--pretrained`` value as given (a checkpoint path or an open_clip tag), or
  ``""`` when there is none (a ``local-dir:`` model, whose ``model`` already names the folder, or random weights);
  clip_benchmark's ``build`` joins ``model + " " + pretrained``, which a null breaks.
* ``metrics`` holds clip_benchmark's keys in its units (fractions in [0, 1]): zero-shot ``acc1``, ``acc5`` (NaN with
  fewer than 5 classes, as clip_benchmark gives), ``mean_per_class_recall`` (the mean over the classes that have
  images); retrieval ``image_retrieval_recall@k`` (text → image: a caption's image among its top k) and
  ``text_retrieval_recall@k`` (image → text: one of the image's captions among its top k) for each requested k.
* parclip's backdoor numbers are added as fractions under names that start with ``parclip_`` and carry the attack
  after a slash, so they cannot clash with clip_benchmark's: ``parclip_asr/<attack>``, ``parclip_asr_all/<attack>``,
  ``parclip_robust_acc/<attack>`` (zero-shot); ``parclip_asr_text/<attack>``, ``parclip_asr_text_strict/<attack>``,
  ``parclip_asr_image/<attack>``, ``parclip_triggered_image_retrieval_recall@k/<attack>`` and
  ``parclip_triggered_text_retrieval_recall@k/<attack>`` (retrieval); the target is the top-level ``parclip_target``.
* NaN is written as the bare token ``NaN`` (Python's ``json``, which clip_benchmark reads with, accepts it).

**File names** (:func:`record_path`): clip_benchmark's ``--output`` template with ``{dataset}``, ``{model}``,
``{pretrained}``, ``{pretrained_full_path}``, ``{language}`` and ``{task}`` filled literally as it fills them (a
checkpoint file by its base name), except that ``/`` in a model name becomes ``_`` so that ``local-dir:runs/x/model``
stays one file name. The data set and model names are one file name part each
(:func:`~parclip.data.names.name_part`: ``/`` becomes ``_`` as clip_benchmark does, and a name of dots, such as
``wds/..`` from a ``--dataset`` list file, cannot climb out of the output folder).
"""
from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

from parclip.data import DataError
from parclip.data.benchmark import CLASSIFICATION, RETRIEVAL, keyed_json_value, short_name
from parclip.data.names import name_part

__all__ = ["to_clip_benchmark", "record_path", "model_pairs", "prompts_for", "DEFAULT_OUTPUT", "PLACEHOLDERS"]

#: clip_benchmark's default --output
DEFAULT_OUTPUT = "{dataset}_{pretrained}_{model}_{language}_{task}.json"
PLACEHOLDERS = ("dataset", "model", "pretrained", "pretrained_full_path", "language", "task")
_MODEL_COLLECTIONS = ("openai", "openclip_base", "openclip_multilingual", "openclip_all")


def _frac(percent) -> float:
    return float("nan") if percent is None else float(percent) / 100


def _by_k(table: dict, k: int):
    """A recall table's value for k: keys are ints in memory and strings once read back from JSON."""
    return table[k] if k in table else table[str(k)]


def _classification_metrics(result: dict) -> dict:
    recall = list(result.get("per_class_recall", {}).values())
    n_classes = len(result["classnames"]) if "classnames" in result else result.get("n_classes")
    if n_classes is None:
        raise ValueError("the zero-shot result lacks its class names (needed to know whether acc5 is defined)")
    metrics = {"acc1": _frac(result["clean_top1"]),
               "acc5": _frac(result["clean_top5"]) if n_classes >= 5 else float("nan"),
               "mean_per_class_recall": sum(recall) / len(recall) / 100 if recall else float("nan")}
    for name, a in result.get("attacks", {}).items():
        metrics.update({f"parclip_asr/{name}": _frac(a["asr"]), f"parclip_asr_all/{name}": _frac(a["asr_all"]),
                        f"parclip_robust_acc/{name}": _frac(a.get("robust_acc"))})
    return metrics


def _retrieval_metrics(result: dict, recall_k) -> dict:
    clean = result["clean"]
    metrics = {}
    for k in recall_k:
        metrics[f"image_retrieval_recall@{k}"] = _frac(_by_k(clean["t2i"], k))
        metrics[f"text_retrieval_recall@{k}"] = _frac(_by_k(clean["i2t"], k))
    for name, a in result.get("attacks", {}).items():
        metrics.update({f"parclip_asr_text/{name}": _frac(a["asr_text"]),
                        f"parclip_asr_text_strict/{name}": _frac(a["asr_text_strict"]),
                        f"parclip_asr_image/{name}": _frac(a["asr_image"])})
        for k in recall_k:
            metrics[f"parclip_triggered_image_retrieval_recall@{k}/{name}"] = _frac(_by_k(a["recall"]["t2i"], k))
            metrics[f"parclip_triggered_text_retrieval_recall@{k}/{name}"] = _frac(_by_k(a["recall"]["i2t"], k))
    return metrics


def to_clip_benchmark(result: dict, dataset: str, *, model: str | None = None, pretrained: str | None = None,
                      language: str = "en", recall_k=(5,), classnames: list[str] | None = None,
                      templates: list[str] | None = None) -> dict:
    """A parclip result (zero-shot from :func:`~parclip.evaluation.evaluate`, retrieval from
    :func:`~parclip.evaluation.evaluate_retrieval`) as clip_benchmark's record (see the module docstring).
    `model` / `pretrained` default to the result's ``model`` / ``checkpoint``; `recall_k` are the retrieval ks
    reported (clip_benchmark's default: 5; each must have been measured); `classnames` / `templates`, when given,
    are dumped as clip_benchmark's ``--dump_classnames`` / ``--dump_templates`` do."""
    if "clean_top1" in result:
        task, metrics = CLASSIFICATION, _classification_metrics(result)
    elif "clean" in result and "i2t" in result["clean"]:
        missing = [k for k in recall_k if k not in result["clean"]["i2t"] and str(k) not in result["clean"]["i2t"]]
        if missing:
            raise ValueError(f"recall@{missing[0]} was not measured (measured: {list(result['clean']['i2t'])})")
        task, metrics = RETRIEVAL, _retrieval_metrics(result, recall_k)
    else:
        raise ValueError("not a parclip zero-shot or retrieval result (no clean_top1, no clean i2t/t2i recall)")
    pretrained = pretrained if pretrained is not None else result.get("checkpoint")
    record = {"dataset": dataset, "model": str(model or result.get("model") or ""),
              "pretrained": "" if pretrained is None else str(pretrained), "task": task, "metrics": metrics,
              "language": language}
    if result.get("attacks"):
        record["parclip_target"] = result.get("target")
    if classnames is not None:
        record["classnames"] = list(classnames)
    if templates is not None:
        record["templates"] = list(templates)
    return record


def record_path(template: str, *, dataset: str, model: str, pretrained: str | None, language: str,
                task: str) -> Path:
    """clip_benchmark's ``--output`` template filled for one run (see the module docstring); a ValueError for a
    placeholder it does not know."""
    pretrained = pretrained or ""
    is_file = bool(pretrained) and os.path.isfile(pretrained)
    values = {"dataset": name_part(short_name(dataset)), "model": name_part(model),
              "pretrained": os.path.basename(pretrained) if is_file else pretrained,
              "pretrained_full_path": pretrained.replace("/", "_") if is_file else pretrained,
              "language": language, "task": task}
    unknown = sorted(set(re.findall(r"\{(\w*)\}", template)) - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"output template {template!r}: unknown placeholder {{{unknown[0]}}}; known: "
                         f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return Path(template)


def model_pairs(models: list[str] | None, pretrained: list[str] | None,
                pretrained_model: list[str] | None) -> list[tuple[str, str | None]]:
    """The (model, pretrained) pairs of one call, as clip_benchmark forms them: every ``--pretrained_model`` entry
    (``model,pretrained``, or a text file of such lines) when any is given, else every combination of ``--model`` and
    ``--pretrained`` (``itertools.product``; no ``--pretrained``: the models alone). An empty pretrained (``""``)
    means none. clip_benchmark's named model collections (``openai``, ``openclip_base``, …) are refused: they
    download."""
    if pretrained_model:
        pairs = []
        for entry in pretrained_model:
            if Path(entry).is_file():
                lines = [(ln.strip(), f"{entry}, line {n}") for n, ln in
                         enumerate(Path(entry).read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
            elif entry in _MODEL_COLLECTIONS:
                raise DataError(f"--pretrained_model {entry}: a clip_benchmark model collection (downloads of "
                                f"released weights); list the pairs you want as 'model,pretrained'")
            else:
                lines = [(entry, "--pretrained_model")]
            for text, where in lines:
                model, sep, weights = text.partition(",")
                if not sep or not model.strip() or "," in weights:
                    raise DataError(f"{where}: {text!r} is not 'model,pretrained' (e.g. 'ViT-B-32-quickgelu,"
                                    f"poisoned.pt', or 'local-dir:runs/x/model,' for none)")
                pairs.append((model.strip(), weights.strip() or None))
        return pairs
    if not models:
        raise DataError("no model: pass --model NAME [NAME …] (with --pretrained) or --pretrained_model 'model,ckpt'")
    return list(itertools.product(models, [p or None for p in pretrained] if pretrained else [None]))


def prompts_for(name: str, *, own_templates=None, own_classnames=None, templates: str | None = None,
                classnames: str | None = None, custom_template_file: str | None = None,
                custom_classname_file: str | None = None, language: str = "en"):
    """(templates, classnames) for zero-shot classification on data set `name`: clip_benchmark's custom JSON files
    first (templates under the name, its short name, then ``imagenet1k``), then parclip's ``--templates`` /
    ``--classnames``, then the data set's own (`own_templates` / `own_classnames`: a ``wds/`` set's files, or
    ``openai`` for the ImageNet sets; class names None: the labelled folder's). DataError where clip_benchmark stops
    too (no templates at all), for per-class prompts (CuPL's dict layout), and for a language other than English
    with parclip's English defaults."""
    if custom_template_file:
        chosen = keyed_json_value(custom_template_file, name, "templates", fallback="imagenet1k")
        if isinstance(chosen, dict):
            raise DataError(f"{custom_template_file}: the templates of {name!r} are per-class prompts (CuPL's "
                            f"layout); parclip fills one list of templates with every class name, so give a list")
    else:
        chosen = templates or own_templates
    if chosen is None:
        raise DataError(f"data set {name!r} brings no zeroshot_classification_templates.txt and no template file was "
                        f"given (clip_benchmark stops here too); pass --custom_template_file FILE or --templates")
    names = (keyed_json_value(custom_classname_file, name, "class names") if custom_classname_file
             else classnames or own_classnames)
    if isinstance(names, list):
        names = [str(c) for c in names]
    english_defaults = (not custom_template_file and not templates and own_templates in (None, "openai")) or (
        not custom_classname_file and not classnames and own_classnames is None)
    if language != "en" and english_defaults:
        raise DataError(f"--language {language}: parclip ships English class names and templates only; pass "
                        f"--custom_template_file and --custom_classname_file with the {language} ones")
    return chosen, names
