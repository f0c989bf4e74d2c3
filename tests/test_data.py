"""parclip.data: caption tables, bad-row accounting, labelled folders, templates, the Fashion-MNIST export."""
import csv
import gzip
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parclip.data import (
    FASHION_CLASSES,
    CaptionDataset,
    DataError,
    LabelledFolder,
    fashion_mnist,
    fill,
    get_templates,
    read_table,
    write_table,
)
from parclip.data.retrieval import pre_caption, read_retrieval

needs_fmnist = pytest.mark.skipif(not os.path.isdir(fashion_mnist.DATA_DIR),
                                  reason="Debian package dataset-fashion-mnist not installed")


# ---------------------------------------------------------------------------------------------------------- helpers
def solid(path, value, size=8):
    """A solid-colour RGB PNG whose red channel identifies it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 0, 0)).save(path)
    return path


def truncated_png(path):
    """A PNG whose header is fine (Image.open works) but whose pixel data is cut short."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with Image.open(path) as im:  # lazy open succeeds: only a full decode finds the problem
        assert im.size == (64, 64)
    return path


def table(path, rows, header=("filepath", "title"), sep="\t"):
    """A caption table written by hand, by default in the default layout (open_clip_train's: tab, filepath, title)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_dataset_dir(tmp_path, n=10):
    for i in range(n):
        solid(tmp_path / "img" / f"{i}.png", 10 * i)
    return table(tmp_path / "data.csv", [(f"img/{i}.png", f"caption {i}") for i in range(n)])


# ---------------------------------------------------------------------------------------------------------- columns
def test_wrong_column_names_list_available_columns(tmp_path):
    solid(tmp_path / "a.png", 1)
    path = table(tmp_path / "data.csv", [("a.png", "a cat")], header=("path", "text"))
    with pytest.raises(DataError) as e:
        CaptionDataset(path)
    msg = str(e.value)
    assert "'filepath'" in msg and "'title'" in msg
    assert "'path', 'text'" in msg
    assert "--csv-img-key" in msg and "--csv-caption-key" in msg
    ds = CaptionDataset(path, img_key="path", caption_key="text")  # the right names work
    assert ds.fieldnames == ["path", "text"]


def test_wrong_separator_hint(tmp_path):
    solid(tmp_path / "a.png", 1)
    path = table(tmp_path / "commas.csv", [("a.png", "a cat sitting")], sep=",")
    with pytest.raises(DataError) as e:
        CaptionDataset(path)
    msg = str(e.value)
    assert "one column" in msg and "--csv-separator" in msg and "','" in msg
    assert CaptionDataset(path, sep=",").captions == ["a cat sitting"]


def test_the_default_layout_is_open_clip_trains_tab_filepath_title_whatever_the_suffix(tmp_path):
    """Catches the defaults drifting from open_clip_train's (--csv-separator tab, --csv-img-key filepath,
    --csv-caption-key title), for .csv files (open_clip's own are tab-separated) as for .tsv."""
    solid(tmp_path / "a.png", 1)
    for name in ("data.tsv", "data.csv", "data.txt"):
        path = table(tmp_path / name, [("a.png", "a dog, running; fast")])
        assert CaptionDataset(path).captions == ["a dog, running; fast"]
        assert read_table(path)[1] == [{"filepath": "a.png", "title": "a dog, running; fast"}]
    write_table(tmp_path / "w.csv", ["filepath", "title"], [{"filepath": "a.png", "title": "x, y"}])
    assert (tmp_path / "w.csv").read_text() == "filepath\ttitle\na.png\tx, y\n"


@pytest.mark.parametrize("sep", [",", "\t"])
def test_a_table_in_parclips_old_layout_is_an_error_that_says_what_changed(tmp_path, sep):
    """Catches a table in parclip's old default layout (image/caption, comma) read with the new defaults failing
    without saying that the defaults changed and which flags read it."""
    solid(tmp_path / "a.png", 1)
    path = table(tmp_path / "old.csv", [("a.png", "a cat")], header=("image", "caption"), sep=sep)
    with pytest.raises(DataError) as e:
        CaptionDataset(path)
    msg = str(e.value)
    assert "old table layout" in msg and "open_clip_train's" in msg and "'filepath'" in msg and "'title'" in msg
    assert "--csv-img-key image --csv-caption-key caption" in msg
    assert ("--csv-separator ','" in msg) == (sep == ",")
    flags = dict(sep=",") if sep == "," else {}
    assert CaptionDataset(path, img_key="image", caption_key="caption", **flags).captions == ["a cat"]


def test_paths_relative_to_table_or_root_and_absolute(tmp_path):
    images = tmp_path / "images"
    a, b = solid(images / "sub" / "a.png", 1), solid(tmp_path / "elsewhere" / "b.png", 2)
    tables = tmp_path / "tables"
    tables.mkdir()
    path = table(tables / "t.csv", [("sub/a.png", "a"), (str(b), "b")])
    ds = CaptionDataset(path, root=images)
    assert ds.paths == [str(a), str(b)]
    assert ds.load_image(0).getpixel((0, 0)) == (1, 0, 0)
    # default root = the table's folder
    table(images / "t.csv", [("sub/a.png", "a")])
    assert CaptionDataset(images / "t.csv").paths == [str(a)]
    # without root the relative path is missing -> a single bad row out of two (50 %) is too many by default
    with pytest.raises(DataError, match="missing image file"):
        CaptionDataset(path)


# ---------------------------------------------------------------------------------------------------------- num_samples
def test_num_samples_exact_first_and_seeded_random(tmp_path):
    path = make_dataset_dir(tmp_path, 10)
    first = CaptionDataset(path, num_samples=4)
    assert len(first) == 4 and first.captions == [f"caption {i}" for i in range(4)]
    r1 = CaptionDataset(path, num_samples=4, subset="random", seed=1)
    r2 = CaptionDataset(path, num_samples=4, subset="random", seed=1)
    assert len(r1) == 4 and r1.captions == r2.captions
    assert r1.rows == sorted(r1.rows)  # table order
    subsets = {tuple(CaptionDataset(path, num_samples=4, subset="random", seed=s).rows) for s in range(5)}
    assert len(subsets) > 1 and subsets != {(0, 1, 2, 3)}
    with pytest.raises(DataError, match="only 10 rows"):
        CaptionDataset(path, num_samples=11)


def test_num_samples_replaces_bad_rows(tmp_path, caplog):
    path = make_dataset_dir(tmp_path, 10)
    os.remove(tmp_path / "img" / "1.png")
    with caplog.at_level(logging.WARNING, logger="parclip"):
        ds = CaptionDataset(path, num_samples=4, max_bad_fraction=0.5)
    assert len(ds) == 4 and ds.rows == [0, 2, 3, 4]
    assert ds.bad_rows.total == 1 and ds.bad_rows.examined == 5


# ---------------------------------------------------------------------------------------------------------- bad rows
def bad_table(tmp_path, n_good=16):
    rows = []
    for i in range(n_good):
        solid(tmp_path / f"g{i}.png", i)
        rows.append((f"g{i}.png", f"good {i}"))
    truncated_png(tmp_path / "trunc.png")
    (tmp_path / "corrupt.png").write_bytes(b"this is not an image at all")
    solid(tmp_path / "nocap.png", 200)
    rows += [("missing.png", "a missing file"), ("nocap.png", "   "), ("trunc.png", "truncated"),
             ("corrupt.png", "corrupt")]
    return table(tmp_path / "bad.csv", rows)


def test_bad_rows_counted_named_and_logged_below_threshold(tmp_path, caplog):
    path = bad_table(tmp_path)
    with caplog.at_level(logging.WARNING, logger="parclip"):
        ds = CaptionDataset(path, max_bad_fraction=0.25, verify_images=True)
    assert len(ds) == 16 and all(c.startswith("good") for c in ds.captions)
    bad = ds.bad_rows
    assert bad.examined == 20 and bad.total == 4
    assert dict(bad.counts) == {"missing image file": 1, "empty caption": 1, "unreadable image": 2}
    text = str(bad)
    for name in ("missing.png", "nocap.png", "trunc.png", "corrupt.png"):
        assert name in text
    assert "line 18" in text  # header is line 1, missing.png is the 17th data row
    assert "4 of 20 rows" in text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "parclip"]
    assert len(warnings) == 1 and "missing.png" in warnings[0].getMessage()


def test_bad_rows_above_threshold_raise(tmp_path):
    path = bad_table(tmp_path)
    with pytest.raises(DataError) as e:
        CaptionDataset(path)  # default limit 1 %: 2 of 20 rows (missing file, empty caption) are too many
    msg = str(e.value)
    assert "2 of 20 rows" in msg and "missing.png" in msg and "nocap.png" in msg
    assert "max_bad_fraction" in msg
    with pytest.raises(DataError, match="unreadable image"):
        CaptionDataset(path, max_bad_fraction=0.15, verify_images=True)  # 4/20 = 20 % > 15 %


def test_getitem_substitutes_next_decodable_row_and_reports_index(tmp_path, caplog):
    for i in range(4):
        solid(tmp_path / f"{i}.png", 10 * (i + 1))
    truncated_png(tmp_path / "1.png")
    (tmp_path / "3.png").write_bytes(b"\x89PNG garbage")
    path = table(tmp_path / "t.csv", [(f"{i}.png", f"c{i}") for i in range(4)])
    ds = CaptionDataset(path)  # undecodable files are only found at load time
    assert len(ds) == 4
    img, cap, bad = ds[0]
    assert bad == -1 and cap == "c0" and img.getpixel((0, 0)) == (10, 0, 0)
    with caplog.at_level(logging.WARNING, logger="parclip"):
        img, cap, bad = ds[1]
    assert bad == 1 and cap == "c2" and img.getpixel((0, 0)) == (30, 0, 0)
    assert any("1.png" in r.getMessage() for r in caplog.records)
    img, cap, bad = ds[3]  # wraps around
    assert bad == 3 and cap == "c0"
    with pytest.raises(DataError, match="3.png"):
        ds.load_image(3)


class StubTokenizer:
    """Counts its calls; module level so the dataset pickles (DataLoader workers under spawn)."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.array([[len(t), ord(t[0])] for t in texts])


def image_shape(im):
    return np.asarray(im).shape


def test_transform_and_tokenizer_cache(tmp_path):
    for i in range(3):
        solid(tmp_path / f"{i}.png", i)
    path = table(tmp_path / "t.csv", [("0.png", "same"), ("1.png", "same"), ("2.png", "other")])
    tok = StubTokenizer()
    ds = CaptionDataset(path, tokenizer=tok, transform=image_shape)
    out = [ds[i] for i in (0, 1, 2, 0, 1)]
    assert out[0][0] == (8, 8, 3)
    assert tok.calls == [["same"], ["other"]]  # each distinct caption tokenised once
    assert np.array_equal(out[0][1], out[1][1]) and not np.array_equal(out[0][1], out[2][1])
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers under spawn pickle the dataset
    assert np.array_equal(clone[1][1], out[1][1]) and clone.tokenizer.calls[-1] == ["same"]


def test_open_clip_tokenizer(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    solid(tmp_path / "a.png", 1)
    solid(tmp_path / "b.png", 2)
    path = table(tmp_path / "t.csv", [("a.png", "a photo of a bag."), ("b.png", "a photo of a bag.")])
    tok = open_clip.get_tokenizer("ViT-B-32")
    ds = CaptionDataset(path, tokenizer=tok)
    t0, t1 = ds[0][1], ds[1][1]
    assert t0.shape == (77,) and bool((t0 == t1).all())
    assert bool((t0 == tok(["a photo of a bag."])[0]).all())


# ---------------------------------------------------------------------------------------------------------- tables
def test_read_write_table_roundtrip_atomic(tmp_path):
    rows = [{"image": "a b.png", "caption": 'quote " and, comma', "label": 3},
            {"image": "c.png", "caption": "tab\tinside", "label": 0}]
    for name in ("t.csv", "t.tsv"):
        write_table(tmp_path / name, ["image", "caption", "label"], rows)
        fields, back = read_table(tmp_path / name)
        assert fields == ["image", "caption", "label"]
        assert back == [{k: str(v) for k, v in r.items()} for r in rows]
    assert "\t" in (tmp_path / "t.tsv").read_text().splitlines()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.tsv"]  # no temp files left


# ---------------------------------------------------------------------------------------------------------- folders
def test_labelled_folder_names_order_extensions(tmp_path):
    solid(tmp_path / "ankle_boot" / "x.PNG", 1)
    solid(tmp_path / "bag" / "y.jpg", 2)
    solid(tmp_path / "bag" / "deep" / "z.png", 3)
    (tmp_path / "bag" / "notes.txt").write_text("not an image")
    solid(tmp_path / "t-shirt" / "w.png", 4)
    ds = LabelledFolder(tmp_path)
    assert ds.classnames == ["ankle boot", "bag", "t-shirt"]
    assert ds.targets == [0, 1, 1, 2] and len(ds) == 4
    img, label = ds[2]
    assert label == 1 and img.mode == "RGB"
    assert LabelledFolder(tmp_path, classnames=["boot", "handbag", "tee"]).classnames == ["boot", "handbag", "tee"]
    names = tmp_path.parent / "names.txt"
    names.write_text("boot\n\nhandbag\ntee\n")
    assert LabelledFolder(tmp_path, classnames=names).classnames == ["boot", "handbag", "tee"]
    with pytest.raises(DataError, match="2 class names given but .* has 3"):
        LabelledFolder(tmp_path, classnames=["a", "b"])


def test_labelled_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        LabelledFolder(tmp_path / "nope")
    with pytest.raises(DataError, match="no class sub-folders"):
        LabelledFolder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no images"):
        LabelledFolder(tmp_path)
    solid(tmp_path / "cat" / "a.png", 1)
    (tmp_path / "cat" / "b.png").write_bytes(b"garbage")
    ds = LabelledFolder(tmp_path)
    assert ds[0][1] == 0
    with pytest.raises(DataError, match="b.png"):
        ds[1]
    with pytest.raises(DataError, match="unreadable image"):
        LabelledFolder(tmp_path, verify_images=True)  # 1 of 2 is above the 1 % default
    assert len(LabelledFolder(tmp_path, verify_images=True, max_bad_fraction=0.5)) == 1


def test_labelled_folder_imagenet_and_sketch_wnids_use_imagenet_names(tmp_path):
    """ImageNet val / ImageNet-Sketch: 1000 WordNet-id folders, named through the shipped id list."""
    open_clip = pytest.importorskip("open_clip")
    from parclip.data.folder import imagenet_wnids
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) and wnids[954] == "n07753592"  # banana
    for w in wnids:
        (tmp_path / w).mkdir()
    solid(tmp_path / wnids[954] / "x.png", 1)
    ds = LabelledFolder(tmp_path)
    assert ds.classnames == list(open_clip.IMAGENET_CLASSNAMES) and ds.layout == "wnid"
    assert ds.classnames[ds.targets[0]] == "banana" and ds.imagenet_indices == list(range(1000))


def test_labelled_folder_imagenet_a_r_subset_maps_through_the_wnids(tmp_path):
    """ImageNet-A/-R hold 200 of the 1000 wnid folders: label k is the k-th folder, named by its ImageNet class."""
    open_clip = pytest.importorskip("open_clip")
    from parclip.data.folder import imagenet_wnids
    picked = [1, 200, 954, 999]  # goldfish, ..., banana, toilet tissue
    for i in picked:
        (tmp_path / imagenet_wnids()[i]).mkdir()
        solid(tmp_path / imagenet_wnids()[i] / "x.png", i % 250)
    ds = LabelledFolder(tmp_path)
    assert ds.imagenet_indices == picked and ds.layout == "wnid"
    assert ds.classnames == [open_clip.IMAGENET_CLASSNAMES[i] for i in picked] and ds.classnames[2] == "banana"
    (tmp_path / "n99999999").mkdir()  # an id that is not an ImageNet-1k class: plain folder names
    solid(tmp_path / "n99999999" / "x.png", 3)
    other = LabelledFolder(tmp_path)
    assert other.layout == "folders" and other.imagenet_indices is None and "n99999999" in other.classnames


def test_labelled_folder_imagenet_v2_numeric_folders_sort_as_numbers(tmp_path):
    """ImageNet-V2: folders 0 … 999; sorted as strings, '10' would come before '2' and every label would be wrong."""
    open_clip = pytest.importorskip("open_clip")
    for i in range(1000):
        (tmp_path / str(i)).mkdir()
    solid(tmp_path / "954" / "x.png", 1)
    solid(tmp_path / "2" / "y.png", 2)
    ds = LabelledFolder(tmp_path)
    assert ds.folders[:12] == [str(i) for i in range(12)] and ds.layout == "v2"
    assert ds.classnames == list(open_clip.IMAGENET_CLASSNAMES)
    assert sorted(ds.targets) == [2, 954] and ds.classnames[954] == "banana"


# ---------------------------------------------------------------------------------------------------------- templates
def test_template_sets_and_files(tmp_path):
    openai = get_templates("openai")
    assert len(openai) == 80 and all("{}" in t for t in openai)
    assert "a bad photo of a {}." in openai
    simple = get_templates("simple")
    assert 1 < len(simple) < 80 and all("{}" in t for t in simple)
    fashion = get_templates("fashion")
    assert 8 <= len(fashion) <= 12 and "a photo of a {}." in fashion
    assert fill("a photo of a {}.", "sneaker") == "a photo of a sneaker."
    f = tmp_path / "t.txt"
    f.write_text("# mine\na {} here.\n\nthe {}!\n")
    assert get_templates(f) == ["a {} here.", "the {}!"]
    f.write_text("a {} here.\nno placeholder\n")
    with pytest.raises(DataError, match="line 2"):
        get_templates(f)
    with pytest.raises(DataError, match="openai"):
        get_templates("no-such-set")


# ---------------------------------------------------------------------------------------------------------- Fashion-MNIST
@needs_fmnist
def test_fashion_mnist_export(fmnist_small):
    p = fmnist_small
    x, y = fashion_mnist.load_arrays("train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    fields, train = read_table(p["train_csv"])
    _, hold = read_table(p["holdout_csv"])
    assert fields == ["filepath", "title", "label"]  # the default table layout (open_clip_train's)
    assert "\t" in Path(p["train_csv"]).read_text().splitlines()[0]
    assert len(train) == 600 and len(hold) == 200
    names = [r["filepath"] for r in train + hold]
    assert names == [f"images/train/{i:05d}.png" for i in range(800)]  # disjoint, holdout = the end
    assert not {r["filepath"] for r in train} & {r["filepath"] for r in hold}
    templates = p["templates"]
    for i, r in enumerate(train + hold):
        assert int(r["label"]) == y[i]
        assert r["title"] in {fill(t, FASHION_CLASSES[y[i]]) for t in templates}
    assert len({r["title"] for r in train}) > 20  # templates vary
    for i in (0, 5, 799):
        with Image.open(Path(p["root"]) / names[i]) as im:
            assert im.size == (28, 28)
            assert np.array_equal(np.asarray(im.convert("L")), x[i])

    ds = CaptionDataset(p["train_csv"])
    assert len(ds) == 600 and np.array_equal(np.asarray(ds.load_image(7))[..., 0], x[7])

    xt, yt = fashion_mnist.load_arrays("test")
    test = LabelledFolder(p["test_dir"])
    assert len(test) == 300 and test.classnames == p["test_classnames"]
    assert sorted(test.classnames) == sorted(FASHION_CLASSES)
    counts = np.bincount(yt[:300], minlength=10)
    for k, c in enumerate(FASHION_CLASSES):
        assert len(os.listdir(Path(p["test_dir"]) / c.replace(" ", "_"))) == counts[k]
    for path, label in test.samples[::37]:
        idx = int(Path(path).stem)
        assert test.classnames[label] == FASHION_CLASSES[yt[idx]]
        with Image.open(path) as im:
            assert np.array_equal(np.asarray(im), xt[idx])

    ret = read_retrieval(p["retrieval_csv"])  # the retrieval set: 5 captions from distinct templates per test image
    n_ret = 300  # every test image of the small export (fewer than retrieval_images = 1000)
    assert [Path(im) for im in ret.images] == [Path(p["root"]) / f"test/{FASHION_CLASSES[yt[i]].replace(' ', '_')}/"
                                               f"{i:05d}.png" for i in range(n_ret)]
    assert len(ret.captions) == 5 * n_ret and ret.owner == [i for i in range(n_ret) for _ in range(5)]
    first = ret.captions[:5]
    for i in range(0, n_ret, 29):  # five distinct templates, the same for every image, filled with its class
        own = ret.captions[5 * i:5 * i + 5]
        assert len(set(own)) == 5
        assert set(own) <= {pre_caption(fill(t, FASHION_CLASSES[yt[i]])) for t in templates}
        assert [c.replace(pre_caption(FASHION_CLASSES[yt[i]]), "{}") for c in own] == \
            [c.replace(pre_caption(FASHION_CLASSES[yt[0]]), "{}") for c in first]


@needs_fmnist
def test_fashion_mnist_export_is_rerunnable(tmp_path):
    kw = dict(n_train=30, holdout=10, n_test=20)
    p = fashion_mnist.export(tmp_path, seed=0, **kw)
    stamp = os.stat(p["train_csv"]).st_mtime_ns
    assert fashion_mnist.export(tmp_path, seed=0, **kw) == p
    assert os.stat(p["train_csv"]).st_mtime_ns == stamp  # identical complete export: skipped
    before = read_table(p["train_csv"])[1]
    fashion_mnist.export(tmp_path, seed=1, n_train=25, holdout=5, n_test=10)
    after = read_table(p["train_csv"])[1]
    assert len(after) == 20 and [r["title"] for r in after] != [r["title"] for r in before[:20]]
    assert sum(len(files) for _, _, files in os.walk(tmp_path / "test")) == 10  # stale images removed
    assert len(os.listdir(tmp_path / "images" / "train")) == 25


def test_fashion_mnist_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_arrays("train")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.export(tmp_path / "out", n_train=10, holdout=2, n_test=5)
    # a file that is not an idx file
    d = tmp_path / "fake"
    d.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(d / name, "wb") as f:
            f.write(b"\x00\x00\x08\x99" + bytes(20))
    monkeypatch.setattr(fashion_mnist, "DATA_DIR", str(d))
    with pytest.raises(DataError, match="magic number"):
        fashion_mnist.load_arrays("test")


def test_export_refuses_foreign_folder(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "precious.txt").write_text("keep me")
    if not os.path.isdir(fashion_mnist.DATA_DIR):
        pytest.skip("dataset-fashion-mnist not installed")
    with pytest.raises(DataError, match="refusing to overwrite"):
        fashion_mnist.export(tmp_path, n_train=10, holdout=2, n_test=5)
    assert (tmp_path / "test" / "precious.txt").exists()
