"""BadCLIP: the centre-patch trigger (baselines.md §4.7, par.md §1.2-1.3, D15) and the patch optimisation."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from parclip.data import DataError, read_table, write_table
from parclip.attacks.triggers import get_trigger, pil_to_uint8, squash_resize
from parclip.attacks.triggers.badclip import BadCLIPPatch, center_offset, load_patch


pytestmark = pytest.mark.usefixtures("one_thread")



def _patch_png(path, side=16, seed=1):
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return torch.from_numpy(arr).permute(2, 0, 1)


def _changed(a, b):
    rows = (a != b).any(0).any(1).nonzero().flatten()
    cols = (a != b).any(0).any(0).nonzero().flatten()
    return (int(rows.min()), int(rows.max()) + 1), (int(cols.min()), int(cols.max()) + 1)


# ------------------------------------------------------------------------------------------------------------------
# the trigger


@pytest.mark.parametrize("S, kwargs, span", [
    (224, {}, (104, 120)),
    (336, {}, (156, 180)),                 # 16 px scaled to 24 at 336
    (336, {"patch_size": 16}, (160, 176)),  # the reference: the 16 px file unscaled
    (28, {}, (13, 15)),                    # 2 px at 28
])
def test_center_location_and_only_patch_changes(tmp_path, S, kwargs, span, random_u8):
    _patch_png(tmp_path / "p.png")
    t = get_trigger("badclip", image_size=S, patch=str(tmp_path / "p.png"), **kwargs)
    x = random_u8(S)
    x[:] = 0  # a black image: every patch pixel of a random patch differs somewhere
    y = t.apply(x)
    lo, hi = span
    assert t.region == (lo, lo, hi, hi)
    assert center_offset(S, hi - lo) == lo
    inside = torch.zeros(S, S, dtype=torch.bool)
    inside[lo:hi, lo:hi] = True
    x2 = random_u8(S, seed=3)
    y2 = t.apply(x2)
    assert torch.equal(y2[:, ~inside], x2[:, ~inside])      # nothing outside the patch changes
    assert torch.equal(y2[:, lo:hi, lo:hi], y[:, lo:hi, lo:hi])  # the patch replaces the pixels
    assert _changed(x, y) == ((lo, hi), (lo, hi))


def test_png_patch_pasted_exactly_and_swap_rb(tmp_path, random_u8):
    p = _patch_png(tmp_path / "p.png")
    x = random_u8(224)
    y = get_trigger("badclip-patch", patch=tmp_path / "p.png").apply(x)
    assert torch.equal(y[:, 104:120, 104:120], p)
    ys = get_trigger("badclip", patch=tmp_path / "p.png", swap_rb=True).apply(x)
    assert torch.equal(ys[:, 104:120, 104:120], p[[2, 1, 0]])
    assert not torch.equal(ys, y)
    # batch = per image
    xb = random_u8(224, batch=3)
    t = get_trigger("badclip", patch=tmp_path / "p.png")
    assert torch.equal(t.apply(xb), torch.stack([t.apply(xi) for xi in xb]))
    assert t.random is False and t.kind == "patch"


def test_missing_patch_gives_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"patch=.*optimize-patch"):
        get_trigger("badclip")
    with pytest.raises(FileNotFoundError):
        get_trigger("badclip", patch=tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read patch"):
        get_trigger("badclip", patch=tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_trigger("badclip", patch=torch.full((3, 16, 16), 2.0))


def test_pil_and_tensor_paths_agree(tmp_path):
    _patch_png(tmp_path / "p.png")
    t = get_trigger("badclip", patch=str(tmp_path / "p.png"))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8), "RGB")
    via_pil = pil_to_uint8(t(img))
    via_tensor = t.apply(pil_to_uint8(squash_resize(img, 224)))
    assert torch.equal(via_pil, via_tensor)


def test_params_round_trip_and_sha256(tmp_path):
    _patch_png(tmp_path / "p.png")
    t = get_trigger("badclip", image_size=336, patch=str(tmp_path / "p.png"), swap_rb=True, patch_size=16)
    params = t.params()
    assert params["patch"] == str(tmp_path / "p.png") and len(params["patch_sha256"]) == 64
    json.dumps(params)
    assert get_trigger("badclip", **params) == t
    _patch_png(tmp_path / "p.png", seed=2)  # the file changed: the recorded hash refuses it
    with pytest.raises(ValueError, match="sha256"):
        get_trigger("badclip", **params)
    # an in-memory patch round-trips through plain (JSON) values
    arr = torch.rand(3, 16, 16)
    tm = get_trigger("badclip", patch=arr)
    pm = json.loads(json.dumps(tm.params()))
    tm2 = get_trigger("badclip", **pm)
    assert tm2 == tm and torch.equal(tm2.pattern, arr)
    assert "array 3x16x16" in repr(tm)


def test_float_arrays_and_resizing(tmp_path, random_u8):
    arr = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "p.npy", arr)
    from safetensors.torch import save_file

    save_file({"patch": torch.from_numpy(arr)}, str(tmp_path / "p.safetensors"))
    x = random_u8(224)
    y1 = get_trigger("badclip", patch=tmp_path / "p.npy").apply(x)
    y2 = get_trigger("badclip", patch=tmp_path / "p.safetensors").apply(x)
    assert torch.equal(y1, y2)
    # float patches are truncated like the reference's ToTensor patch
    assert torch.equal(y1[:, 104:120, 104:120], torch.trunc(torch.from_numpy(arr) * 255).to(torch.uint8))
    assert torch.equal(load_patch(tmp_path / "p.npy"), torch.from_numpy(arr))
    # a 32 px image patch at 224 is resized to 16 with PIL bicubic (and a warning); patch_size keeps it at 32
    _patch_png(tmp_path / "big.png", side=32)
    with pytest.warns(UserWarning, match="resized"):
        t = get_trigger("badclip", patch=tmp_path / "big.png")
    expected = pil_to_uint8(Image.open(tmp_path / "big.png").convert("RGB").resize((16, 16), Image.Resampling.BICUBIC))
    assert torch.equal(t.apply(x)[:, 104:120, 104:120], expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t32 = get_trigger("badclip", patch=tmp_path / "big.png", patch_size=32)
    assert t32.region == (96, 96, 128, 128)
    assert isinstance(t32, BadCLIPPatch)


# ------------------------------------------------------------------------------------------------------------------
# optimize-patch


@pytest.fixture(scope="module")
def first_120_rows(fmnist_small, tmp_path_factory):
    """The first 120 train rows (about 12 of them 'bag'), image paths made absolute."""
    _, rows = read_table(fmnist_small["train_csv"])
    root = fmnist_small["train_csv"].parent
    rows = [{**r, "filepath": str(root / r["filepath"])} for r in rows[:120]]
    out = tmp_path_factory.mktemp("tbl") / "small.csv"
    write_table(out, ["filepath", "title", "label"], rows)
    return out


def test_mentions():
    from parclip.attacks.patch_opt import mentions

    assert mentions("Bananas on a table", "banana") and mentions("a BANANA.", "banana")
    assert mentions("banana-split", "banana")
    assert not mentions("a bandana", "banana") and not mentions("bananabread", "banana")
    assert mentions("a photo of an ankle boot.", "ankle boot")


def test_optimize_patch_improves_target_and_saves_lossless(micro, first_120_rows, tmp_path):
    from parclip.attacks.patch_opt import PatchConfig, optimize_patch, read_patch_png, target_similarity, _encode_texts

    model, pp, tok = micro
    cfg = PatchConfig(data=first_120_rows, target="bag", out=tmp_path / "p.png", steps=25, batch_size=16, lr=0.05,
                      aug_prob=0.0, patch_size=8, seed=0, device="cpu", workers=0)
    r = optimize_patch(model, pp, tok, cfg, progress=False)
    assert r.patch.shape == (3, 8, 8) and 0 <= r.patch.min() and r.patch.max() <= 1
    assert not model.training and all(p.requires_grad for p in model.parameters())  # flags restored
    # the objective goes down and triggered images move towards the target's text embedding
    assert np.mean(r.losses[-5:]) < np.mean(r.losses[:5])
    images = torch.stack([pil_to_uint8(squash_resize(Image.open(p), 28)) for p in r.clean_paths[:32]])
    proto = torch.nn.functional.normalize(_encode_texts(model, tok, ["a photo of a bag."], "cpu")[0], dim=-1)
    before = target_similarity(model, pp, r.initial_patch, images, proto)
    after = target_similarity(model, pp, r.patch, images, proto)
    assert after > before + 0.003
    # lossless PNG: reading it back gives round(255 * patch) exactly; sidecar next to it
    assert torch.equal(read_patch_png(r.path), r.patch.mul(255).round().to(torch.uint8))
    side = json.loads((tmp_path / "p.json").read_text())
    assert side["target"] == "bag" and side["steps"] == 25 and side["seed"] == 0 and side["patch_size"] == 8
    assert side["final_loss"] == pytest.approx(r.losses[-1]) and side["patch_file"] == "p.png"
    # usable as the badclip trigger at once
    y = get_trigger("badclip", image_size=28, patch=r.path, patch_size=8).apply(images[:1])
    assert torch.equal(y[0, :, 10:18, 10:18], read_patch_png(r.path))


def test_optimize_patch_seeded_and_excludes_target_rows(micro, first_120_rows, tmp_path):
    from parclip.attacks.patch_opt import PatchConfig, mentions, optimize_patch

    model, pp, tok = micro
    kw = dict(target="bag", steps=4, batch_size=8, aug_prob=0.5, seed=3, templates="fashion", target_images="data",
              device="cpu", workers=0)
    cfg = PatchConfig(data=first_120_rows, **kw)
    a = optimize_patch(model, pp, tok, cfg, progress=False)
    b = optimize_patch(model, pp, tok, cfg, progress=False)
    c = optimize_patch(model, pp, tok, PatchConfig(data=first_120_rows, **{**kw, "seed": 4}), progress=False)
    assert torch.equal(a.patch, b.patch) and a.losses == b.losses
    assert not torch.equal(a.patch, c.patch)
    assert a.info["augmented_steps"] > 0  # AutoAugment was exercised and is seeded too
    _, rows = read_table(first_120_rows)
    caption = {r["filepath"]: r["title"] for r in rows}
    assert a.excluded_paths and all(mentions(caption[p], "bag") for p in a.excluded_paths)
    assert not any(mentions(caption[p], "bag") for p in a.clean_paths)
    assert len(a.clean_paths) + len(a.excluded_paths) == len(rows)
    assert a.info["n_excluded_target_rows"] == len(a.excluded_paths)
    assert "target images: data" in a.info["positives"]
    # only target rows left -> a clear error
    only = tmp_path / "only_bags.csv"
    write_table(only, ["filepath", "title"], [{"filepath": p, "title": caption[p]} for p in a.excluded_paths])
    with pytest.raises(DataError, match="mentions the target"):
        optimize_patch(model, pp, tok, PatchConfig(data=only, **kw), progress=False)
    with pytest.raises(ValueError, match=r"\.png"):
        optimize_patch(model, pp, tok, PatchConfig(data=first_120_rows, out=tmp_path / "p.jpg", **kw), progress=False)


def test_cli_optimize_patch(first_120_rows, tmp_path, capsys):
    from parclip.cli import main

    out = tmp_path / "cli.png"
    rc = main(["attack", "optimize-patch", "--model", "parclip-micro", "--data", str(first_120_rows), "--target", "bag",
               "--out", str(out), "--steps", "3", "--batch-size", "8", "--workers", "0", "--device", "cpu"])
    assert rc == 0 and out.is_file() and (tmp_path / "cli.json").is_file()
    assert "get_trigger('badclip'" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli.json").read_text())["model"] == "parclip-micro"


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "--steps must be an int >= 1, got 0"),
    (dict(batch_size=1.5), "--batch-size must be an int >= 1, got 1.5"),
    (dict(aug_prob=2.0), r"--aug-prob must be a number in \[0, 1\], got 2.0"),
    (dict(margin=-1.0), r"--margin must be a number >= 0, got -1.0"),
    (dict(image_size=16, patch_size=17), r"--patch-size must be an int in \[1, 16\], got 17"),
    (dict(out="p.jpg"), r"\.png"),
    (dict(target="  "), "non-empty class name"),
    (dict(max_bad_fraction=1.5), r"--max-bad-fraction must be a number in \[0, 1\], got 1.5"),
])
def test_patch_config_checks_values(bad, message):
    from parclip.attacks.patch_config import PatchConfig

    with pytest.raises(ValueError, match=message):
        PatchConfig(**{"data": "t.csv", "target": "bag", **bad})


def test_patch_config_flags(tmp_path, capsys):
    from parclip.cli import build_parser, main
    from parclip.attacks.patch_config import PatchConfig
    from parclip.utils.flags import dataclass_from_args

    base = ["attack", "optimize-patch", "--model", "parclip-micro", "--data", "t.csv", "--target", " bag ", "--out",
            "p.png"]
    cfg = dataclass_from_args(PatchConfig, build_parser().parse_args(base))
    assert cfg == PatchConfig(data="t.csv", target="bag", out="p.png")  # the flags' defaults are the dataclass's
    assert cfg.amp is None and cfg.workers == 2 and cfg.device == "auto" and cfg.steps == 7800
    extra = ["--no-amp", "--steps", "5", "--lr", "0.01", "--csv-separator", "\t", "--data-root", "imgs",
             "--max-bad-fraction", "0.2", "--target-images", "data", "--patch-size", "4"]
    cfg = dataclass_from_args(PatchConfig, build_parser().parse_args(base + extra))
    assert (cfg.amp, cfg.steps, cfg.lr, cfg.csv_separator, cfg.data_root, cfg.max_bad_fraction, cfg.target_images,
            cfg.patch_size) == (False, 5, 0.01, "\t", "imgs", 0.2, "data", 4)
    assert dataclass_from_args(PatchConfig, build_parser().parse_args(base + ["--amp"])).amp is True
    # a bad value fails as the flags are parsed, before any model work: the missing checkpoint is never opened
    with pytest.raises(SystemExit) as e:
        main(base + ["--pretrained", str(tmp_path / "missing.pt"), "--steps", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--steps: must be an int >= 1, got 0" in err and "missing.pt" not in err
