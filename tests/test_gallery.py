"""The trigger catalogue: `parclip triggers list` and the gallery of `parclip triggers show`."""
import json

import numpy as np
import pytest
from PIL import Image

from parclip.cli import main
from parclip.attacks.gallery import bundled_images, change_box, gallery_size, render_gallery, trigger_rows
from parclip.attacks.triggers import Trigger, list_triggers
from parclip.attacks.triggers import base as trigger_base


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bundled_photos_are_small_and_licensed():
    photos = bundled_images()
    assert len(photos) >= 2
    assert sum(p.stat().st_size for p in photos) < 200_000
    licenses = (photos[0].parent / "LICENSES.md").read_text()
    for p in photos:
        with Image.open(p) as im:
            assert max(im.size) <= 256
        assert p.name in licenses


def test_triggers_list_names_every_trigger(capsys):
    assert main(["triggers", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for cls in list_triggers():
        row = next(line for line in lines if line.split()[:1] == [cls.name])
        assert cls.kind in row.split() and ("yes" if cls.random else "no") in row.split()
        for alias in cls.aliases:
            assert alias in row
    assert "patch=<required>" in out  # badclip cannot be built without a patch file
    assert main(["triggers", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [c.name for c in list_triggers()]
    badclip = next(r for r in rows if r["name"] == "badclip")
    assert badclip["params"]["swap_rb"] is False and badclip["needs"]
    assert next(r for r in trigger_rows() if r["name"] == "badnet_rs")["needs"] is None


def test_change_box_centers_on_the_change():
    clean = np.zeros((64, 64, 3), np.uint8)
    trig = clean.copy()
    trig[40:44, 10:14] = 200
    top, left, score = change_box(clean, trig, 16)
    assert score > 0 and top <= 40 and top + 16 >= 44 and left <= 10 and left + 16 >= 14
    assert abs((top + 8) - 42) <= 1 and abs((left + 8) - 12) <= 1   # centred on the 4x4 change
    assert change_box(clean, clean, 16) == (24, 24, 0.0)


def test_show_renders_one_column_per_trigger_on_bundled_photos(tmp_path):
    out = tmp_path / "g.png"
    r = render_gallery(out=out, size=56)
    names = [c.name for c in list_triggers()]
    assert r.attacks == [n for n in names if n not in r.skipped]   # every trigger, in registry order
    assert "badclip" in r.attacks and r.placeholders == ["badclip"]  # no patch: a labelled placeholder
    assert "placeholder" in r.labels[r.attacks.index("badclip")]
    assert r.images == [p.name for p in bundled_images()]
    with Image.open(out) as im:
        assert im.size == r.size == gallery_size(len(r.attacks), len(r.images))


def _green_columns(px) -> int:
    """How many separate runs of pixel columns show the green test photo (or a triggered copy of it)."""
    px = px.astype(int)
    green = ((px[..., 1] > 150) & (px[..., 0] < 120) & (px[..., 2] < 120)).mean(axis=0) > 0.1
    return int(green[0]) + int((green[1:] & ~green[:-1]).sum())


def test_show_uses_user_images_and_patch_via_cli(tmp_path, capsys, read_png):
    green = tmp_path / "green.png"
    Image.new("RGB", (40, 30), (0, 255, 0)).save(green)
    patch = tmp_path / "patch.png"
    Image.new("RGB", (16, 16), (255, 0, 255)).save(patch)
    out = tmp_path / "g.png"
    rc = main(["triggers", "show", "--images", str(green), "--size", "64", "--out", str(out),
               "--attacks", "badclip", "badnet-stripes", "--patch", str(patch), "--no-diff"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "badclip, badnet_rs" in text and "placeholder" not in text
    image = read_png(out, coloured=0.3)
    assert image.shape[1::-1] == gallery_size(2, 1, show_diff=False)
    assert _green_columns(image) == 3  # the photo, then one column per trigger
    px = image.reshape(-1, 3)
    n_green = int((px == [0, 255, 0]).all(1).sum())
    n_magenta = int((px == [255, 0, 255]).all(1).sum())
    assert n_green > 10_000 and n_magenta > 1000   # the user's photo and the user's patch are drawn
    r = render_gallery([green], size=64, attacks=["badclip", "blended", "sig"], patch=patch, out=tmp_path / "h.png")
    assert r.images == ["green.png"] and r.placeholders == []
    assert _green_columns(read_png(tmp_path / "h.png")) == 4


class _Broken(Trigger):
    name = "zz_broken"
    kind = "patch"
    description = "fails when applied"

    def apply_float(self, x, generator):
        raise RuntimeError("boom")


def test_show_skips_failing_triggers_and_rejects_unknown_names(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trigger_base._REGISTRY, "zz_broken", _Broken)
    monkeypatch.setitem(trigger_base._LOOKUP, "zz_broken", "zz_broken")
    r = render_gallery(size=32, attacks=["zz_broken", "blended"], out=tmp_path / "g.png", show_diff=False)
    assert r.attacks == ["blended"] and "boom" in r.skipped["zz_broken"]
    assert main(["triggers", "show", "--attacks", "no_such_attack", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown trigger" in capsys.readouterr().err
