"""Names from data are data (docs/hostile_inputs.md#names-from-data-are-data): a file name, a JSON key or a path in a
table found in a data folder never runs a command, fetches a URL or reaches a file outside its folder.

Every entry point runs from *inside* a data folder that holds a file named like a ``pipe:`` command (it would create
``SENTINEL`` in that folder) or a URL, and must either read that file as the local file it is or refuse with a clear
error; ``SENTINEL`` must never appear. The folder's listing yields relative names, which is how the issue showed
itself (the same folder given by its absolute path was safe)."""
import io
import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from parclip.cli import main
from parclip.data import DataError
from parclip.data.names import local_source, name_part
from parclip.data.shards import expand_urls, known_sizes, read_shard, shards_to_table, write_shard

PIPE = "pipe:touch SENTINEL;cat good.tar;true .tar"  # the name of the report
N = 32  # samples per shard: two shards are the 64 images a scan needs
CLASSES = ["bag", "shirt"]


def _png(i: int) -> bytes:
    a = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """One shard of N samples: KEY.png, KEY.txt (a caption) and KEY.cls (clip_benchmark's label)."""
    path = tmp_path_factory.mktemp("good") / "good.tar"
    write_shard(({"__key__": f"{i:06d}", "png": _png(i), "txt": f"a photo of a {CLASSES[i % 2]}.",
                  "cls": str(i % 2)} for i in range(N)), path, mtime=0)
    return path


def _folder(folder: Path, good: Path, *names: str) -> Path:
    """`folder` holding good.tar and a copy of it under each of `names`; classnames.txt one folder up."""
    folder.mkdir(parents=True)
    for name in ("good.tar", *names):
        shutil.copyfile(good, folder / name)
    (folder.parent / "classnames.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    return folder


@pytest.fixture
def inside(good, tmp_path, monkeypatch) -> Path:
    """The working folder is a shards folder holding good.tar and its copy named PIPE."""
    folder = _folder(tmp_path / "data" / "test", good, PIPE)
    monkeypatch.chdir(folder)
    yield folder
    assert not (folder / "SENTINEL").exists(), "a file name ran as a command"


# ------------------------------------------------------------------------------------------------------ the one rule
def test_a_listed_name_becomes_an_absolute_path_that_gopen_reads_as_a_file(good, tmp_path, monkeypatch):
    from parclip.data.shard_io import open_shard

    names = [PIPE, "file:x.tar", "http:x.tar", "%41.tar", "a#b?c.tar", "x::pipe:touch SENTINEL;true .tar",
             "{0..1}.tar"]
    folder = _folder(tmp_path / "d", good, *names)
    monkeypatch.chdir(folder)
    urls = expand_urls(".")
    assert urls == [str(folder / n) for n in sorted(["good.tar", *names])]
    for url in urls:
        assert urlparse(url).scheme == "" and url.startswith("/")
        stream = open_shard(url)
        assert stream.read() == good.read_bytes(), url  # the file itself, not a command, URL or decoded name
        stream.close()
    assert not (folder / "SENTINEL").exists()


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "a/../../x", "", "  ", "a\0b", 3, None])
def test_a_name_outside_its_folder_or_no_name_is_refused(name, tmp_path):
    with pytest.raises(DataError, match="outside that folder|not a file name|NUL"):
        local_source(tmp_path, name)


def test_table_paths_may_lie_anywhere_but_are_local_files(tmp_path):
    assert local_source(tmp_path, "../x.png", anywhere=True) == str(tmp_path.parent / "x.png")
    assert local_source(tmp_path, "/abs/y.png", anywhere=True) == "/abs/y.png"
    assert local_source(tmp_path, "pipe:x.png", anywhere=True) == str(tmp_path / "pipe:x.png")
    with pytest.raises(DataError, match="not a file name"):
        local_source(tmp_path, {"image": "x"}, anywhere=True)


def test_a_name_written_into_a_file_name_is_one_part():
    assert name_part("a/../../x") == "a_.._.._x" and name_part("..") == "__" and name_part("") == "_"
    assert name_part("x\0y\\z") == "x_y_z" and len(name_part("é" * 300).encode()) <= 200
    assert name_part("ViT-B-32") == "ViT-B-32"


def test_sizes_json_keys_are_looked_up_never_opened(inside):
    (inside / "sizes.json").write_text(json.dumps({"good.tar": N, "pipe:touch SENTINEL;true .tar": 5, PIPE: N}))
    urls = expand_urls(".")
    assert known_sizes(urls) == {str(inside / "good.tar"): N, str(inside / PIPE): N}


# ------------------------------------------------------------------------------------------------- the entry points
def test_train_reads_a_folder_holding_a_command_named_file(inside, micro_model_dir, tmp_path):
    assert main(["train", "--model", f"local-dir:{micro_model_dir}", "--objective", "clip", "--train-data", ".",
                 "--train-num-samples", str(2 * N), "--batch-size", "16", "--epochs", "1", "--workers", "0",
                 "--logs", str(tmp_path / "runs"), "--name", "n", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/n/metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4  # 2 × 32 samples, every one read from the two local files


def test_data_convert_shards_to_table_reads_every_file_as_itself(inside, tmp_path, capsys):
    assert main(["data", "convert", ".", str(tmp_path / "out")]) == 0
    assert f"{2 * N} samples" in capsys.readouterr().out


def test_data_convert_of_a_table_and_a_folder_reads_scheme_named_images_locally(tmp_path, monkeypatch, capsys):
    work = tmp_path / "w"
    (work / "bag").mkdir(parents=True)
    names = ["pipe:touch SENTINEL;true .png", "http:x.png", "file:y.png"]
    for i, n in enumerate(names):
        (work / n).write_bytes(_png(i))
        (work / "bag" / n).write_bytes(_png(i))
    (work / "shirt").mkdir()
    (work / "shirt" / "a.png").write_bytes(_png(9))
    (work / "t.csv").write_text("filepath\ttitle\n" + "".join(f"{n}\ta photo of a bag.\n" for n in names))
    monkeypatch.chdir(work)
    assert main(["data", "convert", "t.csv", str(tmp_path / "s")]) == 0
    assert main(["data", "convert", ".", str(tmp_path / "wds")]) == 0  # a labelled folder: bag, shirt
    table = shards_to_table(str(tmp_path / "s"), tmp_path / "back")
    assert table["n_samples"] == 3
    assert sorted(s["png"] for s in read_shard(str(tmp_path / "s" / "00000.tar"))) == sorted(map(_png, range(3)))
    assert (tmp_path / "wds" / "classnames.txt").read_text() == "bag\nshirt\n"
    assert not (work / "SENTINEL").exists()
    (work / "line\nbreak").mkdir()
    (work / "line\nbreak" / "b.png").write_bytes(_png(4))
    assert main(["data", "convert", ".", str(tmp_path / "wds2")]) == 2  # classnames.txt: one name per line
    assert "holds a line break" in capsys.readouterr().err


def test_data_check_reads_table_paths_as_local_files_wherever_the_table_puts_them(tmp_path, monkeypatch, capsys):
    """The documented rule for tables: relative to the table's folder, absolute, or above it with '..'; a local file
    whatever its name."""
    work = tmp_path / "tables"
    work.mkdir()
    rows = ["pipe:touch SENTINEL;true .png", "http:x.png", "file:y.png", "../up.png", str(tmp_path / "abs.png")]
    for i, p in enumerate(rows):
        (work / p).write_bytes(_png(i))
    (work / "t.csv").write_text("filepath\ttitle\n" + "".join(f"{p}\ta photo.\n" for p in rows))
    monkeypatch.chdir(work)
    assert main(["data", "check", "t.csv"]) == 0
    assert "5 usable rows" in capsys.readouterr().out and not (work / "SENTINEL").exists()


def test_poison_reads_shards_and_table_rows_with_command_names_as_files(inside, tmp_path):
    common = ["--attack", "badnet_rs", "--target", "bag", "--n", "1", "--image-size", "32", "--templates", "fashion"]
    assert main(["poison", ".", str(tmp_path / "p"), *common]) == 0
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["n_rows"] == 2 * N
    (inside / "pipe:touch SENTINEL;true .png").write_bytes(_png(1))
    (inside / "t.csv").write_text("filepath\ttitle\npipe:touch SENTINEL;true .png\ta bag.\n")
    assert main(["poison", "t.csv", str(tmp_path / "q"), *common]) == 0


def test_eval_reads_clip_benchmark_shards_with_command_names_as_files(inside, micro_model_dir, tmp_path):
    assert main(["eval", "--model", f"local-dir:{micro_model_dir}", "--data", ".", "--classnames",
                 "../classnames.txt", "--templates", "fashion", "--workers", "0",
                 "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n_images"] == 2 * N
    from parclip.data.shards import LabelledShards

    assert LabelledShards(".").classnames == CLASSES  # one folder up from a listed name (once '.'.parent: '.')


def test_eval_of_a_wds_set_reads_a_name_holding_a_source_list_as_one_file(good, micro_model_dir, tmp_path,
                                                                           monkeypatch):
    """clip_benchmark's wds/ layout: its shards were once joined into a '::' list, which split this name into
    good.tar and a command."""
    name = "good.tar::pipe:touch SENTINEL;true .tar"
    folder = _folder(tmp_path / "root" / "evil" / "test", good, name)
    monkeypatch.chdir(folder)
    rc = main(["eval", "--model", f"local-dir:{micro_model_dir}", "--dataset", "wds/evil", "--dataset_root",
               str(tmp_path / "root" / "{dataset}"), "--templates", "fashion", "--workers", "0",
               "--output", str(tmp_path / "{dataset}.json"), "--out", str(tmp_path / "r.json")])
    assert not (folder / "SENTINEL").exists(), "a file name ran as a command"
    assert rc == 0 and json.loads((tmp_path / "r.json").read_text())["n_images"] == 2 * N


@pytest.mark.parametrize("text, ok", [("2", True), ("4", False), ("0", False), ("1;touch SENTINEL", False),
                                      ("-1", False)])
def test_nshards_txt_is_a_count_of_the_shards_there(good, tmp_path, text, ok):
    from parclip.data.benchmark import locate

    folder = _folder(tmp_path / "r" / "x" / "test", good, "0.tar", "1.tar")
    (folder / "nshards.txt").write_text(text)
    if ok:
        assert expand_urls(locate("wds/x", str(tmp_path / "r" / "{dataset}")).path) == [
            str(folder / "0.tar"), str(folder / "1.tar")]
    else:
        with pytest.raises(DataError, match="nshards.txt"):
            locate("wds/x", str(tmp_path / "r" / "{dataset}"))


def test_eval_retrieval_reads_annotation_paths_as_local_files(micro_model_dir, tmp_path, monkeypatch, capsys):
    work = tmp_path / "coco"
    work.mkdir()
    names = ["pipe:touch SENTINEL;true .png", "http:x.png"]
    for i, n in enumerate(names):
        (work / n).write_bytes(_png(i))
    (work / "ann.json").write_text(json.dumps([{"image": n, "caption": ["a bag.", "a shirt."]} for n in names]))
    monkeypatch.chdir(work)
    assert main(["eval-retrieval", "--model", f"local-dir:{micro_model_dir}", "--data", "ann.json", "--workers", "0",
                 "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n_images"] == 2
    (work / "bad.json").write_text(json.dumps([{"image": {"cmd": "x"}, "caption": "a bag."}]))
    assert main(["eval-retrieval", "--model", f"local-dir:{micro_model_dir}", "--data", "bad.json"]) == 2
    assert "not a file name" in capsys.readouterr().err and not (work / "SENTINEL").exists()


def test_scan_reads_shards_with_command_names_as_files(inside, micro_model_dir, tmp_path):
    assert main(["scan", "--model", f"local-dir:{micro_model_dir}", "--data", ".", "--classnames",
                 "../classnames.txt", "--templates", "fashion",
                 "--parts", "encoder", "--n-images", str(2 * N), "--n-invert", "8", "--encoder-steps", "1",
                 "--invert-batch-size", "8", "--workers", "0", "--quiet", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "scan.json").read_text())["data"] == "."


def test_data_synthesize_refuses_generator_folders_that_name_files_or_code(tmp_path, monkeypatch, capsys):
    """A stored generator's JSON names its weights file, a diffusers folder its classes: neither may name a command,
    a file elsewhere or Python code to import."""
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generator.json").write_text(json.dumps({"kind": "pca-gauss", "format_version": 1, "config": {},
                                                    "weights": "pipe:touch SENTINEL;true", "sha256": "0"}))
    monkeypatch.chdir(gen)
    assert main(["data", "synthesize", str(tmp_path / "o"), "--generator", "pca-gauss:.", "--n", "2"]) == 2
    assert "generator.safetensors missing" in capsys.readouterr().err
    pytest.importorskip("diffusers")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "evil.py").write_text("import pathlib\npathlib.Path('SENTINEL').touch()\n")
    for index in ({"_class_name": ["evil", "Evil"]}, {"_class_name": "StableDiffusionPipeline", "unet": ["evil", "U"]}):
        (pipe / "model_index.json").write_text(json.dumps(index))
        monkeypatch.chdir(pipe)
        assert main(["data", "synthesize", str(tmp_path / "o"), "--generator", "diffusers:.", "--captions",
                     str(tmp_path / "gen" / "generator.json"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "outside diffusers" in err or "custom pipeline" in err
    assert not (pipe / "SENTINEL").exists() and not (gen / "SENTINEL").exists()


def test_data_synthesize_resumes_only_chunks_its_settings_make(tmp_path, capsys):
    """The manifest of a run to resume is data: a chunk that is not one of the run's is refused, never a file name
    or a count taken on trust."""
    from parclip.synth import Generator, register_generator
    from parclip.synth.base import _REGISTRY, image_from_array

    class Noise(Generator):
        kind, conditioning = "names-test-noise", "text"

        @classmethod
        def load(cls, argument, **options):
            return cls()

        def generate(self, prompts, seeds):
            return [image_from_array(np.random.default_rng(s).random((8, 8, 3))) for s in seeds]

        def describe(self):
            return {"kind": self.kind}

    register_generator(Noise)
    try:
        (tmp_path / "captions.txt").write_text("a bag.\na shirt.\na coat.\n")
        argv = ["data", "synthesize", str(tmp_path / "o"), "--generator", "names-test-noise:x", "--captions",
                str(tmp_path / "captions.txt"), "--chunk-size", "2", "--shards"]
        assert main(argv) == 0
        manifest_path = tmp_path / "o" / "manifest.json"
        clean = json.loads(manifest_path.read_text())
        for chunk in ({"chunk": "../../x", "first": 0, "count": 2, "sha256": "0"},
                      {"chunk": 1, "first": 2, "count": 10 ** 9, "sha256": "0"}):
            manifest_path.write_text(json.dumps({**clean, "chunks": [chunk]}))
            assert main(argv) == 2
            assert "is not one these settings make" in capsys.readouterr().err
    finally:
        _REGISTRY.pop("names-test-noise", None)


# ----------------------------------------------------------------------------------------- names written into files
def test_tar_keys_become_one_file_each_inside_the_output(tmp_path):
    """A key is a name from data: '../../escape' stays inside images/, and keys that meet once their '/' is gone
    ('a/x', 'a_x') or that come twice in a shard ('k') each keep a file of their own."""
    keys = ["../../escape", "a/x", "a_x", "k", "j", "k"]
    write_shard([{"__key__": k, "png": _png(i), "txt": f"caption {i}"} for i, k in enumerate(keys)],
                tmp_path / "s" / "0.tar")
    r = shards_to_table(str(tmp_path / "s"), tmp_path / "t")
    files = {p.name: p.read_bytes() for p in (tmp_path / "t" / "images").iterdir()}
    assert r["n_samples"] == 6 and sorted(files.values()) == sorted(map(_png, range(6)))
    assert not list(tmp_path.glob("*escape*")) and not list((tmp_path / "t").glob("*escape*"))


def test_clip_benchmark_record_names_stay_in_their_folder(tmp_path):
    from parclip.evaluation.clip_benchmark import record_path

    path = record_path(str(tmp_path / "out" / "{dataset}" / "{model}.json"), dataset="wds/..", model="m/../x",
                       pretrained=None, language="en", task="zeroshot_classification")
    assert path == tmp_path / "out" / "__" / "m_.._x.json"
    assert record_path("{dataset}_{model}.json", dataset="wds/vtab/cifar10", model="ViT-B-32", pretrained="",
                       language="en", task="t") == Path("vtab_cifar10_ViT-B-32.json")  # clip_benchmark's names


def test_a_poisoning_manifest_beside_the_data_never_crashes_its_readers():
    from parclip.attacks.poison import poisoned_overlap, poisoning_warnings

    assert poisoning_warnings({"image_size": "x", "trigger": [1], "n_poison": 1}, 32, cleaning=True)[0].startswith(
        "the training data is a poisoned set")
    assert "patch" in poisoning_warnings({"image_size": 64, "trigger": {"params": {"patch_size": 16}}}, 32)[0]
    assert poisoned_overlap({"root": 3, "rows": "x"}, "nothing.csv") == 0
    assert poisoned_overlap({"root": "/r", "rows": [{"original_path": {"x": 1}}, 7]}, "nothing.csv") == 0


def test_a_model_folder_naming_a_hub_image_tower_is_refused_before_any_fetch(tmp_path, micro_model_dir):
    from parclip.models import create_model

    shutil.copytree(micro_model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"] = {"timm_model_name": "hf-hub:someone/tower", "image_size": 32}
    (tmp_path / "m" / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="offline only"):
        create_model(f"local-dir:{tmp_path / 'm'}")
