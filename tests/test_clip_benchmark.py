"""clip_benchmark interop: its command line under `parclip eval`, its data set layouts by name, its template and
class-name files, and its records, merged by its own `build` step (the package installed from the registry)."""
import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parclip.cli import build_parser, main
from parclip.data import DataError, get_templates
from parclip.data.benchmark import keyed_json_value, locate
from parclip.evaluation.clip_benchmark import model_pairs, prompts_for, record_path

# two ImageNet-A classes (WordNet ids) and their ImageNet-1k names
WNIDS = {"n01498041": "stingray", "n01531178": "goldfinch"}


def _images(folder, classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A 3-class labelled folder and the same images in clip_benchmark's wds layout under ROOT/wds_three, with a
    templates file in its spelling ({c})."""
    base = tmp_path_factory.mktemp("three")
    folder = _images(base / "folder", ["cat", "dog", "bag"], 4)
    assert main(["data", "convert", str(folder), str(base / "root" / "wds_three")]) == 0
    (base / "root" / "wds_three" / "zeroshot_classification_templates.txt").write_text(
        "a photo of a {c}.\na blurry photo of the {c}.\n")
    return base


def _eval(*args):
    return main(["eval", "--workers", "0", "--quiet", *map(str, args)])


# ------------------------------------------------------------------------------------------------ templates, files
def test_clip_benchmark_templates_and_class_name_files(tmp_path):
    f = tmp_path / "zeroshot_classification_templates.txt"
    f.write_text("a photo of a {c}.\nitap of a {}.\n")
    assert get_templates(f) == ["a photo of a {c}.", "itap of a {}."]
    (tmp_path / "bad.txt").write_text("a photo.\n")
    with pytest.raises(DataError, match=r"no '\{\}' or '\{c\}' placeholder"):
        get_templates(tmp_path / "bad.txt")

    tpl = tmp_path / "templates.json"
    tpl.write_text(json.dumps({"imagenet1k": ["a photo of a {c}."], "three": ["art of the {c}."],
                               "cupl": {"cat": ["a cat sleeping"]}}))
    assert keyed_json_value(tpl, "wds/three", "templates", fallback="imagenet1k") == ["art of the {c}."]  # short name
    assert keyed_json_value(tpl, "cars", "templates", fallback="imagenet1k") == ["a photo of a {c}."]  # the fallback
    with pytest.raises(DataError, match="per-class prompts"):
        prompts_for("cupl", custom_template_file=str(tpl))
    names = tmp_path / "classnames.json"
    names.write_text(json.dumps({"wds/three": ["kitty", "doggo", "purse"]}))
    assert prompts_for("wds/three", own_templates=["x {c}"], own_classnames=["a", "b", "c"],
                       custom_classname_file=str(names)) == (["x {c}"], ["kitty", "doggo", "purse"])
    with pytest.raises(DataError, match=r"no class names for 'cars' \(looked for the keys cars\)"):
        prompts_for("cars", own_templates="openai", custom_classname_file=str(names))
    with pytest.raises(DataError, match="brings no zeroshot_classification_templates.txt"):
        prompts_for("wds/x", own_templates=None, own_classnames=["a"])
    with pytest.raises(DataError, match="English class names and templates only"):
        prompts_for("imagenet1k", own_templates="openai", language="de")
    with pytest.raises(DataError, match="cupl_prompts.json"):
        keyed_json_value(tmp_path / "cupl_prompts.json", "x", "templates")


# --------------------------------------------------------------------------------------------- command line, names
def test_clip_benchmark_flag_spellings_and_refusals(capsys):
    p = build_parser()
    a = p.parse_args(["eval", "--model", "m", "--dataset", "wds/x", "--batch_size", "7", "--num_workers", "0",
                      "--model_cache_dir", "c", "--recall_k", "1", "5", "--dataset_root", "d/{dataset}", "--no_amp",
                      "--custom_template_file", "t.json", "--test_split", "val"])
    assert (a.batch_size, a.workers, a.cache_dir, a.recall_k, a.dataset_root, a.amp, a.custom_template_file,
            a.split) == (7, 0, "c", [1, 5], "d/{dataset}", False, "t.json", "val")
    assert a.dataset == ["wds/x"] and a.dataset_name is None  # --dataset is its own flag, not --dataset-name
    for argv, said in ((["--distributed"], "--distributed is not supported: parclip eval is one process"),
                       (["--load_clfs", "a.pt"], "--load_clfs is not supported"),
                       (["--fewshot_k", "5"], "linear probing"),
                       (["--task", "captioning"], "captioning is not supported"),
                       (["--model_type", "ja_clip"], "open_clip models only"),
                       (["--dataset-n", "x"], "unrecognized arguments: --dataset-n")):  # no abbreviations
        with pytest.raises(SystemExit) as e:
            p.parse_args(["eval", "--model", "m", "--dataset", "wds/x", *argv])
        assert e.value.code == 2 and said in capsys.readouterr().err, argv
    assert main(["eval", "--model", "local-dir:m", "--dataset", "wds/x", "--dataset-name", "x"]) == 2
    assert "--dataset-name names the data of --data" in capsys.readouterr().err
    r = p.parse_args(["eval-retrieval", "--model", "m", "--data", "c.csv", "--recall_k", "2", "--batch_size", "3"])
    assert (r.recall_k, r.batch_size) == ([2], 3)


def test_model_pairs_as_clip_benchmark_forms_them(tmp_path):
    assert model_pairs(["A", "B"], ["p", "q"], None) == [("A", "p"), ("A", "q"), ("B", "p"), ("B", "q")]
    assert model_pairs(["local-dir:x"], None, None) == [("local-dir:x", None)]
    assert model_pairs(["A"], [""], None) == [("A", None)]  # --pretrained '': none
    f = tmp_path / "models.txt"
    f.write_text("ViT-B-32-quickgelu,poisoned.pt\nlocal-dir:runs/par/model,\n")
    assert model_pairs(["ignored"], None, [str(f), "RN50,clean.pt"]) == [
        ("ViT-B-32-quickgelu", "poisoned.pt"), ("local-dir:runs/par/model", None), ("RN50", "clean.pt")]
    with pytest.raises(DataError, match="model collection"):
        model_pairs(None, None, ["openai"])
    with pytest.raises(DataError, match="is not 'model,pretrained'"):
        model_pairs(None, None, ["RN50"])


def test_record_file_names(tmp_path):
    ckpt = tmp_path / "par.pt"
    ckpt.write_bytes(b"x")
    assert record_path("out/{dataset}_{pretrained}_{model}_{language}_{task}.json", dataset="wds/vtab/cifar10",
                       model="ViT-B-32", pretrained=str(ckpt), language="en", task="zeroshot_classification") == \
        Path("out/vtab_cifar10_par.pt_ViT-B-32_en_zeroshot_classification.json")  # a file: its base name
    assert record_path("{pretrained}_{pretrained_full_path}", dataset="d", model="m", pretrained="openai",
                       language="en", task="t") == Path("openai_openai")  # a tag as it is
    assert str(record_path("{model}-{pretrained}.json", dataset="d", model="local-dir:/a/b", pretrained=None,
                           language="en", task="t")) == "local-dir:_a_b-.json"
    with pytest.raises(ValueError, match="unknown placeholder {split}"):
        record_path("{split}.json", dataset="d", model="m", pretrained=None, language="en", task="t")


def test_missing_and_foreign_data_sets_say_where_and_what(tmp_path):
    cases = {"imagenet-a": [str(tmp_path / "imagenet-a"), "hendrycks/imagenet-a.tar",
                            f"clip_benchmark eval --dataset imagenet-a --dataset_root {tmp_path / 'imagenet-a'}"],
             "imagenet1k": [str(tmp_path / "imagenet1k" / "val"), "image-net.org"],
             "wds/cars": [str(tmp_path / "cars" / "test"), "clip_benchmark_export_wds", "parclip data convert"],
             "mscoco_captions": [str(tmp_path / "mscoco_captions" / "val2014"), "val2014.zip",
                                 "retrieval_annotations/releases/download/1.0.0/coco_test_karpathy.json"],
             "cifar10": ["clip_benchmark_export_wds --dataset cifar10", "--dataset wds/cifar10"],
             "winoground": ["image-caption selection"], "no_such_set": ["not a clip_benchmark data set name"]}
    for name, said in cases.items():
        with pytest.raises(DataError) as e:
            locate(name, str(tmp_path / "{dataset}"))
        assert all(s in str(e.value) for s in said), (name, str(e.value))
    with pytest.raises(DataError, match="VTAB|TensorFlow"):
        from parclip.data.benchmark import expand_dataset_names
        expand_dataset_names(["vtab"])


# ---------------------------------------------------------------------------------------- evaluation and records
def test_wds_set_by_name_several_models_one_record_each(three, micro_model_dir, tmp_path, capsys):
    """wds/NAME under --dataset_root: the set's own {c} templates and class names; two models, one record each;
    pretrained a string; acc5 NaN with 3 classes; parclip's numbers under parclip_ names; the same numbers as
    parclip's own --data run on the folder with the same templates."""
    tpl = str(tmp_path / "{dataset}_{pretrained}_{model}_{language}_{task}.json")
    root = str(three / "root" / "wds_{dataset}")
    assert _eval("--model", f"local-dir:{micro_model_dir}", "parclip-micro", "--dataset", "wds/three",
                 "--dataset_root", root, "--output", tpl) == 2  # clip_benchmark would load laion400m_e32 weights
    assert "without --pretrained: clip_benchmark would load its default weights" in capsys.readouterr().err
    assert _eval("--model", f"local-dir:{micro_model_dir}", "parclip-micro", "--pretrained", "", "--dataset",
                 "wds/three", "--dataset_root", root, "--attack", "badnet_rs", "--target", "bag",
                 "--output", tpl, "--out", str(tmp_path / "{model}.parclip.json"), "--dump_templates") == 0
    records = sorted(tmp_path.glob("three_*_zeroshot_classification.json"))
    assert len(records) == 2, records
    for path in records:
        rec = json.loads(path.read_text())  # Python's json (clip_benchmark's reader) reads the NaN back
        assert rec["dataset"] == "wds/three" and rec["task"] == "zeroshot_classification" and rec["language"] == "en"
        assert rec["pretrained"] == "" and isinstance(rec["pretrained"], str)
        assert math.isnan(rec["metrics"]["acc5"]) and 0 <= rec["metrics"]["acc1"] <= 1
        assert {"parclip_asr/badnet_rs", "parclip_asr_all/badnet_rs", "parclip_robust_acc/badnet_rs"} <= set(
            rec["metrics"]) and rec["parclip_target"] == "bag"
        assert rec["templates"] == ["a photo of a {c}.", "a blurry photo of the {c}."]
    assert "NaN" in records[0].read_text()
    ours = json.loads((tmp_path / f"local-dir:{str(micro_model_dir).replace('/', '_')}.parclip.json").read_text())
    rec = json.loads((tmp_path / f"three__local-dir:{str(micro_model_dir).replace('/', '_')}_en_"
                                  f"zeroshot_classification.json").read_text())
    assert rec["metrics"]["acc1"] == pytest.approx(ours["clean_top1"] / 100)
    assert rec["metrics"]["parclip_asr/badnet_rs"] == pytest.approx(ours["attacks"]["badnet_rs"]["asr"] / 100)
    (tmp_path / "t.txt").write_text("a photo of a {c}.\na blurry photo of the {c}.\n")
    assert _eval("--model", f"local-dir:{micro_model_dir}", "--data", three / "folder", "--templates",
                 tmp_path / "t.txt", "--attack", "badnet_rs", "--target", "bag", "--out", tmp_path / "folder.json") == 0
    folder = json.loads((tmp_path / "folder.json").read_text())
    assert (folder["clean_top1"], folder["attacks"]["badnet_rs"]["asr"]) == (
        ours["clean_top1"], ours["attacks"]["badnet_rs"]["asr"])
    capsys.readouterr()
    assert _eval("--model", f"local-dir:{micro_model_dir}", "parclip-micro", "--pretrained", "", "--dataset",
                 "wds/three", "--dataset_root", root, "--output", tpl, "--skip_existing") == 0
    assert capsys.readouterr().out.count("skipped") == 2
    assert _eval("--model", "parclip-micro", "parclip-micro", "--pretrained", "", "--dataset", "wds/three",
                 "--dataset_root", root, "--output", tmp_path / "one.json") == 2
    assert "the same file" in capsys.readouterr().err


def test_imagenet_style_folder_by_name(tmp_path, micro_model_dir):
    """imagenet-a under --dataset_root: WordNet-id folders get ImageNet names; fewer than 5 classes: acc5 NaN."""
    _images(tmp_path / "data" / "imagenet-a", list(WNIDS), 2)
    assert _eval("--model", f"local-dir:{micro_model_dir}", "--dataset", "imagenet-a", "--dataset_root",
                 tmp_path / "data" / "{dataset}", "--output", tmp_path / "r.json", "--dump_classnames",
                 "--templates", "simple") == 0
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["classnames"] == list(WNIDS.values()) and rec["dataset"] == "imagenet-a"
    assert math.isnan(rec["metrics"]["acc5"])


def _caption_set(folder, n=6):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"im{i}.jpg")
        rows += [(f"im{i}.jpg", f"picture number {i}, a bag" if i % 2 else f"picture number {i}"),
                 (f"im{i}.jpg", f"another view {i}")]
    return rows


def test_retrieval_records_from_eval_retrieval_and_eval(tmp_path, micro_model_dir, capsys):
    """eval-retrieval writes clip_benchmark's zeroshot_retrieval record (recall@k as fractions, image retrieval =
    text→image); `eval --dataset flickr8k` reads clip_benchmark's Flickr layout and gives the same numbers."""
    rows = _caption_set(tmp_path / "flickr8k")
    table = tmp_path / "captions.csv"
    with table.open("w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([("filepath", "title"), *((f"flickr8k/{a}", b) for a, b in rows)])
    assert main(["eval-retrieval", "--model", f"local-dir:{micro_model_dir}", "--data", str(table), "--raw-captions",
                 "--workers", "0", "--attack", "badnet_rs", "--target", "bag", "--recall_k", "1", "5",
                 "--out", str(tmp_path / "ours.json"), "--output", str(tmp_path / "cb_{dataset}.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    rec = json.loads((tmp_path / "cb_captions.json").read_text())
    assert rec["task"] == "zeroshot_retrieval" and rec["pretrained"] == "" and rec["dataset"] == "captions"
    for k in (1, 5):
        assert rec["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(ours["clean"]["t2i"][str(k)] / 100)
        assert rec["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(ours["clean"]["i2t"][str(k)] / 100)
    assert "image_retrieval_recall@10" not in rec["metrics"]
    assert rec["metrics"]["parclip_asr_text/badnet_rs"] == pytest.approx(ours["attacks"]["badnet_rs"]["asr_text"] / 100)
    # clip_benchmark's Flickr layout: images under ROOT, ROOT/flickr8k_test_karpathy.txt ("image,caption" header)
    (tmp_path / "flickr8k" / "flickr8k_test_karpathy.txt").write_text(
        "image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    assert _eval("--model", f"local-dir:{micro_model_dir}", "--dataset", "flickr8k", "--dataset_root",
                 tmp_path / "{dataset}", "--recall_k", "1", "5", "--output", tmp_path / "fl.json") == 0
    fl = json.loads((tmp_path / "fl.json").read_text())
    assert fl["dataset"] == "flickr8k" and fl["task"] == "zeroshot_retrieval"
    assert fl["metrics"] == {k: v for k, v in rec["metrics"].items() if not k.startswith("parclip_")}
    # clip_benchmark's COCO layout: ROOT/val2014/ + ROOT/coco_test_karpathy.json in the COCO captions format
    (tmp_path / "mscoco_captions").mkdir()
    (tmp_path / "flickr8k").rename(tmp_path / "mscoco_captions" / "val2014")
    files = sorted({a for a, _ in rows})
    (tmp_path / "mscoco_captions" / "coco_test_karpathy.json").write_text(json.dumps(
        {"images": [{"id": 100 + i, "file_name": f} for i, f in enumerate(files)],
         "annotations": [{"image_id": 100 + files.index(a), "caption": b, "id": j} for j, (a, b) in enumerate(rows)]}))
    capsys.readouterr()
    assert _eval("--model", f"local-dir:{micro_model_dir}", "--dataset", "retrieval", "--dataset_root",
                 tmp_path / "{dataset}", "--recall_k", "1", "5", "--output", tmp_path / "coco.json") == 2
    said = capsys.readouterr()
    assert "--dataset flickr8k: " in said.err and "clean:" not in said.out  # every member found before a model runs
    assert _eval("--model", f"local-dir:{micro_model_dir}", "--dataset", "mscoco_captions", "--dataset_root",
                 tmp_path / "{dataset}", "--recall_k", "1", "5", "--output", tmp_path / "coco.json") == 0
    assert json.loads((tmp_path / "coco.json").read_text())["metrics"] == fl["metrics"]
    assert _eval("--model", f"local-dir:{micro_model_dir}", "--dataset", "mscoco_captions", "--dataset_root",
                 tmp_path / "{dataset}", "--task", "zeroshot_classification") == 2
    assert "--task zeroshot_classification: mscoco_captions is a zeroshot_retrieval set" in capsys.readouterr().err


# ------------------------------------------------------------- the proof: clip_benchmark's own eval and build
RUNNER = textwrap.dedent('''
    """Run clip_benchmark's real command line (its cli.main) with the arguments given, in a process whose path holds
    the installed clip-benchmark 1.6.2. Its cli.py imports every evaluation module at the top; some of those import
    third-party packages that neither `build` nor zero-shot retrieval touches (pycocoevalcap for captioning, and
    sklearn.metrics / requests where they are not installed). Each of these that is missing is registered as an empty
    stand-in module so that the import succeeds; nothing of clip_benchmark itself is replaced."""
    import importlib, sys, types

    NOT_USED = ["pycocoevalcap.tokenizer.ptbtokenizer", "pycocoevalcap.bleu.bleu", "pycocoevalcap.meteor.meteor",
                "pycocoevalcap.rouge.rouge", "pycocoevalcap.cider.cider", "pycocoevalcap.spice.spice",
                "sklearn.metrics", "requests"]
    NAMES = {"PTBTokenizer", "Bleu", "Meteor", "Rouge", "Cider", "Spice", "classification_report",
             "balanced_accuracy_score"}
    for name in NOT_USED:
        try:
            importlib.import_module(name)
        except ImportError:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                mod = sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
                for attr in NAMES:
                    setattr(mod, attr, None)
    from clip_benchmark import cli
    assert cli.__file__.startswith(sys.argv[1]), cli.__file__  # the installed package, not anything else
    sys.argv = ["clip_benchmark", *sys.argv[2:]]
    cli.main()
''')


@pytest.fixture(scope="module")
def clip_benchmark_package(tmp_path_factory):
    """clip-benchmark 1.6.2 from the package registry, installed (without its dependencies) into a temporary folder.
    This test needs the registry: without it, it fails and says so (it is the proof that clip_benchmark's own
    `build` merges parclip's records with its own)."""
    target = tmp_path_factory.mktemp("clip_benchmark_pkg")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                        "--target", str(target), "clip-benchmark==1.6.2"], capture_output=True, text=True)
    if r.returncode != 0 or not (target / "clip_benchmark" / "cli.py").is_file():
        pytest.fail(f"could not install clip-benchmark==1.6.2 from the package registry (this test needs it): "
                    f"{r.stderr[-2000:]}")
    (target / "run_clip_benchmark.py").write_text(RUNNER)
    return target


def _clip_benchmark(package, cwd, *argv):
    """`clip_benchmark ARGV…` (the installed package's own cli.main), on the CPU."""
    env = {**os.environ, "PYTHONPATH": str(package), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(package / "run_clip_benchmark.py"), str(package), *map(str, argv)],
                       capture_output=True, text=True, env=env, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]


def _retrieval_shards(root, n=8):
    """clip_benchmark's webdataset layout of a retrieval set, written the way its exporter writes one: ROOT/test/0.tar
    (KEY.png + KEY.txt, one caption per line), ROOT/test/nshards.txt, ROOT/dataset_type.txt = retrieval."""
    import io

    import webdataset as wds

    (root / "test").mkdir(parents=True)
    rng = np.random.default_rng(2)
    with wds.TarWriter(str(root / "test" / "0.tar")) as sink:
        for i in range(n):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(png, format="PNG")
            sink.write({"__key__": f"s{i:04d}", "png": png.getvalue(),
                        "txt": f"picture number {i}\nanother view of {i}" + (", a bag" if i % 2 else "")})
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text("retrieval\n")


def test_clip_benchmark_eval_and_build_agree_with_parclip(clip_benchmark_package, three, micro_model_dir, tmp_path):
    """clip_benchmark's own eval and parclip's write the same zeroshot_retrieval record for the same model and wds/
    set; clip_benchmark's own build merges parclip's records (classification with NaN acc5 and ASR columns,
    retrieval) with its own and with a classification record shaped as its eval writes one, into the expected
    table."""
    out = tmp_path / "results"
    out.mkdir()
    _retrieval_shards(tmp_path / "wds_ret")
    model = f"local-dir:{micro_model_dir}"
    _clip_benchmark(clip_benchmark_package, tmp_path, "eval", "--dataset", "wds/ret", "--dataset_root",
                    tmp_path / "wds_{dataset}", "--task", "zeroshot_retrieval", "--model", model, "--pretrained", "",
                    "--recall_k", "1", "5", "--no_amp", "--num_workers", "0", "--batch_size", "4", "--quiet",
                    "--output", out / "theirs.json")
    assert _eval("--model", model, "--dataset", "wds/ret", "--dataset_root", tmp_path / "wds_{dataset}",
                 "--recall_k", "1", "5", "--output", tmp_path / "ours_ret.json") == 0
    theirs, ours_ret = (json.loads((p).read_text()) for p in (out / "theirs.json", tmp_path / "ours_ret.json"))
    assert {k: v for k, v in ours_ret.items() if k != "metrics"} == {k: v for k, v in theirs.items() if k != "metrics"}
    assert ours_ret["metrics"] == pytest.approx(theirs["metrics"], abs=1e-6)
    assert 0 < theirs["metrics"]["image_retrieval_recall@5"] < 1  # the case measures something

    assert _eval("--model", model, "--dataset", "wds/three", "--dataset_root", three / "root" / "wds_{dataset}",
                 "--attack", "badnet_rs", "--target", "bag",
                 "--output", out / "{dataset}_{pretrained}_{model}_{language}_{task}.json") == 0
    rows = _caption_set(tmp_path / "caps")
    table = tmp_path / "coco.csv"
    table.write_text("filepath\ttitle\n" + "".join(f"caps/{a}\t{b}\n" for a, b in rows))  # the table layout
    assert main(["eval-retrieval", "--model", "parclip-micro", "--data", str(table), "--workers", "0",
                 "--output", str(out / "retrieval.json"), "--recall_k", "1", "5"]) == 0
    # a classification record as clip_benchmark's eval writes it (cli.run: json.dump of six keys, pretrained a path)
    foreign = {"dataset": "cifar10", "model": "ViT-B-32-quickgelu", "pretrained": "/ckpts/poisoned.pt",
               "task": "zeroshot_classification",
               "metrics": {"acc1": 0.9074, "acc5": 0.998, "mean_per_class_recall": 0.9071}, "language": "en"}
    (out / "foreign.json").write_text(json.dumps(foreign))
    _clip_benchmark(clip_benchmark_package, tmp_path, "build", out, "--output", tmp_path / "benchmark.csv")
    with (tmp_path / "benchmark.csv").open() as f:
        table_rows = list(csv.DictReader(f))

    expected = []
    for rec in (json.loads(p.read_text()) for p in out.glob("*.json")):  # its row: metrics, the rest, the full name
        row = {**rec["metrics"], **{k: v for k, v in rec.items() if k != "metrics"},
               "model_fullname": rec["model"] + " " + rec["pretrained"]}
        expected.append({k: str(v) for k, v in row.items()})
    assert len(expected) == 4
    columns = set().union(*expected)
    assert set(table_rows[0]) == columns
    key = lambda r: (r["model_fullname"], r["dataset"], r["task"])  # noqa: E731
    got = sorted(table_rows, key=key)
    assert got == sorted(({c: r.get(c, "") for c in columns} for r in expected), key=key)
    by_set = {(r["dataset"], r["task"]): r for r in got}
    zs = by_set[("wds/three", "zeroshot_classification")]
    assert zs["acc5"] == "nan" and zs["model_fullname"] == f"{model} " and zs["parclip_asr/badnet_rs"] != ""
    assert by_set[("cifar10", "zeroshot_classification")]["parclip_asr/badnet_rs"] == ""
    assert by_set[("wds/ret", "zeroshot_retrieval")]["model_fullname"] == f"{model} "  # clip_benchmark's own row
    assert float(by_set[("coco", "zeroshot_retrieval")]["image_retrieval_recall@5"]) >= 0


def test_every_flag_of_clip_benchmark_eval_is_known(clip_benchmark_package):
    """Each option of clip_benchmark's `eval` (read from its installed cli.py) is one of parclip eval's: taken with
    its meaning, or refused with the reason; none is unknown, and none is taken for another by a prefix."""
    import argparse
    import re

    source = (clip_benchmark_package / "clip_benchmark" / "cli.py").read_text()
    theirs = set(re.findall(r"(?:parser_eval|mutually_exclusive)\.add_argument\(\s*['\"](--\w+)['\"]", source))
    assert {"--dataset", "--pretrained_model", "--recall_k", "--distributed"} <= theirs and len(theirs) > 30
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    ours = {s for a in sub._actions for s in a.option_strings}
    assert theirs - ours == set()
