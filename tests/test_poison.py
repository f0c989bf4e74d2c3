"""Seeded poisoning of a caption table (poison.py) on real Fashion-MNIST images."""
import gzip
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parclip.attacks.poison import _choose_rows, poison_csv
from parclip.attacks.triggers import get_trigger, trigger_generator
from parclip.data import DataError, get_templates, read_table

FMNIST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
S = 32

CAPTIONS = [
    "a photo of a banana.", "a t-shirt on a table", "Banana split with cream", "two bananas", "a sneaker",
    "bananabread recipe", "a bag", "my BANANA!", "an ankle boot", "a dress", "a coat", "a shirt",
    "a pullover", "a sandal", "a trouser", "banana", "a hat", "a scarf", "a glove", "a sock",
]


def _fmnist(n):
    with gzip.open(FMNIST_IMAGES, "rb") as f:
        f.read(16)
        return np.frombuffer(f.read(n * 28 * 28), dtype=np.uint8).reshape(n, 28, 28)


def _make_table(folder: Path, n=20, captions=CAPTIONS, bad=()):
    """n real images (grey 28x28 PNGs; every 5th one as a non-square RGB JPEG) and a CSV with relative paths.
    ``bad``: {index: "missing" | "corrupt"}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    arrays = _fmnist(n)
    lines = ["filepath\ttitle\textra"]  # the default layout (open_clip_train's)
    bad = dict(bad)
    for i in range(n):
        if i % 5 == 4:
            name = f"img/{i}.jpg"
            Image.fromarray(arrays[i]).convert("RGB").resize((40, 24)).save(folder / name, quality=90)
        else:
            name = f"img/{i}.png"
            Image.fromarray(arrays[i], "L").save(folder / name)
        if bad.get(i) == "missing":
            (folder / name).unlink()
        elif bad.get(i) == "corrupt":
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        lines.append(f'{name}\t"{captions[i % len(captions)]}"\tx{i}')
    (folder / "clean.csv").write_text("\n".join(lines) + "\n")
    return folder / "clean.csv"


@pytest.fixture
def table(tmp_path):
    return _make_table(tmp_path / "data")


def _trigger():
    return get_trigger("badnet_rs", S)  # p = 2 at 32 px


def _run(table, out, **kw):
    args = {"trigger": _trigger(), "target": "banana", "n_poison": 5, "seed": 0, "templates": "fashion"}
    args.update(kw)
    return poison_csv(table, out, **args)


def test_poison_rows_manifest_and_images(table, tmp_path):
    out = tmp_path / "out"
    man = _run(table, out)
    fields_in, rows_in = read_table(table)
    fields_out, rows_out = read_table(out / "poisoned.csv")
    assert fields_out == fields_in and len(rows_out) == len(rows_in) == man["n_rows"] == 20
    changed = [i for i, (a, b) in enumerate(zip(rows_in, rows_out))
               if a["title"] != b["title"] or Path(b["filepath"]).name != Path(a["filepath"]).name]
    assert len(changed) == 5 == man["n_poison"]
    assert [r["index"] for r in man["rows"]] == changed
    assert man["rate"] == 5 / 20 and man["seed"] == 0 and man["target"] == "banana"
    assert man["trigger"] == {"name": "badnet_rs", "kind": "patch",
                              "params": {"image_size": S, "uint8_mode": "wrap", "patch_size": 2}}
    assert man["image_size"] == S and man["image_format"] == "png" and man["jpeg_quality"] is None
    assert man["templates"] == "fashion" and man["label_consistent"] is False
    assert json.loads((out / "manifest.json").read_text()) == man
    allowed = {t.format("banana") for t in get_templates("fashion")}
    for r in man["rows"]:
        i = r["index"]
        assert r["original_path"] == rows_in[i]["filepath"] and r["original_caption"] == rows_in[i]["title"]
        assert rows_out[i]["filepath"] == r["new_path"] == f"images/{i:06d}.png"
        assert rows_out[i]["title"] == r["new_caption"] in allowed
        assert rows_out[i]["extra"] == rows_in[i]["extra"]
        # the saved image is the trigger applied to the original with the per-row generator
        saved = Image.open(out / r["new_path"])
        assert saved.size == (S, S) and saved.mode == "RGB"
        expected = _trigger()(Image.open(table.parent / r["original_path"]), trigger_generator(0, i))
        assert np.array_equal(np.asarray(saved), np.asarray(expected))
    # clean rows still point at their original files and keep their captions
    for i in set(range(20)) - set(changed):
        assert Path(rows_out[i]["filepath"]).is_absolute()
        assert Path(rows_out[i]["filepath"]).resolve() == (table.parent / rows_in[i]["filepath"]).resolve()
        assert rows_out[i]["title"] == rows_in[i]["title"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in changed]


def test_same_seed_identical_bytes_other_seed_other_rows(table, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ma, mb = _run(table, a, seed=3), _run(table, b, seed=3)
    assert ma == mb
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files_a) == 5 + 2
    for f in files_a:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    mc = _run(table, c, seed=4)
    assert {r["index"] for r in mc["rows"]} != {r["index"] for r in ma["rows"]}
    # re-running into a used folder with another seed leaves no stale images behind
    _run(table, a, seed=4)
    assert sorted(p.name for p in (a / "images").iterdir()) == [f"{r['index']:06d}.png" for r in mc["rows"]]
    assert (a / "poisoned.csv").read_bytes() == (c / "poisoned.csv").read_bytes()


def test_rate_and_openai_templates(table, tmp_path):
    man = _run(table, tmp_path / "out", rate=0.1, n_poison=None, templates="openai", target="sneaker")
    assert man["n_poison"] == 2 and man["requested"] == {"n_poison": None, "rate": 0.1}
    allowed = {t.format("sneaker") for t in get_templates("openai")}
    assert len(get_templates("openai")) == 80
    assert all(r["new_caption"] in allowed for r in man["rows"])


def test_label_consistent(table, tmp_path):
    man = _run(table, tmp_path / "out", n_poison=3, label_consistent=True)
    # the package's one rule (parclip.data.targets): whole word or its plural, case-insensitive; "two bananas" counts,
    # "bananabread" does not
    matching = {0, 2, 3, 7, 15}
    assert man["n_candidates"] == 5 and man["templates"] is None
    _, rows_in = read_table(table)
    _, rows_out = read_table(tmp_path / "out" / "poisoned.csv")
    assert {r["index"] for r in man["rows"]} <= matching and len(man["rows"]) == 3
    for r in man["rows"]:
        assert r["new_caption"] == r["original_caption"] == rows_out[r["index"]]["title"]
        assert rows_out[r["index"]]["filepath"] == r["new_path"]
    assert [r["title"] for r in rows_out] == [r["title"] for r in rows_in]
    with pytest.raises(DataError, match=r"only 5 of the 20"):
        _run(table, tmp_path / "out2", n_poison=6, label_consistent=True)


def test_jpeg_option(table, tmp_path):
    man = _run(table, tmp_path / "out", image_format="jpg", jpeg_quality=90)
    assert man["image_format"] == "jpg" and man["jpeg_quality"] == 90
    for r in man["rows"]:
        assert r["new_path"].endswith(".jpg")
        im = Image.open(tmp_path / "out" / r["new_path"])
        assert im.format == "JPEG" and im.size == (S, S)


def test_bad_images_replaced_and_reported(tmp_path, caplog):
    table = _make_table(tmp_path / "data", n=10, bad={3: "corrupt", 6: "missing"})
    # 8 usable rows, 8 requested: the two bad ones must be skipped and replaced, whatever the order
    found = None
    for seed in range(10):
        with caplog.at_level(logging.WARNING, logger="parclip"):
            man = _run(table, tmp_path / f"out{seed}", n_poison=8, seed=seed, max_bad_fraction=0.5)
        assert {r["index"] for r in man["rows"]} == {0, 1, 2, 4, 5, 7, 8, 9}
        assert {b["index"] for b in man["bad_rows"]["rows"]} <= {3, 6}
        assert man["bad_rows"]["count"] == len(man["bad_rows"]["rows"])
        if man["bad_rows"]["count"] == 2:
            found = man
            break
    assert found is not None
    reasons = {b["index"]: b["reason"] for b in found["bad_rows"]["rows"]}
    assert "cannot decode" in reasons[3] and "not found" in reasons[6]
    assert "img/3.png" in caplog.text and "img/6.png" in caplog.text
    # bad rows are kept in the output table unchanged
    _, rows_out = read_table(tmp_path / f"out{seed}" / "poisoned.csv")
    assert rows_out[3]["title"] == CAPTIONS[3] and rows_out[3]["filepath"].endswith("img/3.png")


def test_too_many_bad_rows_raise(tmp_path):
    table = _make_table(tmp_path / "data", n=10, bad={i: "missing" for i in range(5)})
    with pytest.raises(DataError, match="max_bad_fraction") as e:
        _run(table, tmp_path / "out", n_poison=4)  # default limit 1%
    assert "max_bad_fraction" in str(e.value) and "img/" in str(e.value)
    assert not (tmp_path / "out" / "poisoned.csv").exists()
    with pytest.raises(DataError, match="only 5 of the 6"):
        _run(table, tmp_path / "out2", n_poison=6, max_bad_fraction=1.0)  # not enough usable rows at all


def test_argument_errors(table, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        _run(table, tmp_path / "o", rate=0.1)
    with pytest.raises(ValueError):
        _run(table, tmp_path / "o", n_poison=21)
    with pytest.raises(DataError, match="caption_col"):
        _run(table, tmp_path / "o", caption_key="caption_col")
    with pytest.raises(ValueError, match="image_format"):
        _run(table, tmp_path / "o", image_format="webp")


def test_choose_rows_is_a_seeded_shuffle():
    order, rng = _choose_rows(CAPTIONS, 5, 3)
    again, rng_again = _choose_rows(CAPTIONS, 5, 3)
    assert order == again and rng.getstate() == rng_again.getstate()
    # exactly random.Random(seed).shuffle of all row indices; the caption draws continue from that generator
    reference = random.Random(3)
    expected = list(range(len(CAPTIONS)))
    reference.shuffle(expected)
    assert order == expected and rng.getstate() == reference.getstate()
    assert _choose_rows(CAPTIONS, 20, 3)[0] == order  # n is only checked, the order does not depend on it
    assert _choose_rows(CAPTIONS, 5, 4)[0] != order
    with pytest.raises(ValueError, match="cannot poison 21 rows of a table with 20"):
        _choose_rows(CAPTIONS, 21, 3)


def test_choose_rows_label_consistent_candidates_only():
    # the package's one rule (parclip.data.targets): "two bananas" and "my BANANA!" count, "bananabread" does not
    order, _ = _choose_rows(CAPTIONS, 3, 0, target="banana")
    assert sorted(order) == [0, 2, 3, 7, 15]
    reference = random.Random(0)
    expected = [0, 2, 3, 7, 15]
    reference.shuffle(expected)
    assert order == expected
    assert _choose_rows([None, "", "a banana"], 1, 0, target="banana")[0] == [2]
    with pytest.raises(DataError, match=r"only 5 of the 20 rows of t\.csv"):
        _choose_rows(CAPTIONS, 6, 0, target="banana", source="t.csv")


def test_failed_image_write_leaves_no_file(table, tmp_path, monkeypatch):
    # images are written atomically: a save that dies half way leaves nothing under the final name (nor a temp file)
    def broken_save(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half an image")
        raise RuntimeError("killed")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(RuntimeError, match="killed"):
        _run(table, tmp_path / "out")
    assert list((tmp_path / "out" / "images").iterdir()) == []
    assert not (tmp_path / "out" / "poisoned.csv").exists()
