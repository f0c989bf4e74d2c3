"""The attack catalogue: BadNet, Blended, Blended-Triangles, Blended-Text, WaNet, SIG (par.md §1, baselines.md §4)."""

import numpy as np
import pytest
import torch
from PIL import Image

from parclip.attacks.triggers import get_trigger, to_float, to_uint8, trigger_generator
from parclip.attacks.triggers import text as text_mod
from parclip.attacks.triggers.badnet import BadNet
from parclip.attacks.triggers.blended import Blended
from parclip.attacks.triggers.sig import SIG
from parclip.attacks.triggers.text import BlendedText
from parclip.attacks.triggers.triangles import BlendedTriangles
from parclip.attacks.triggers.wanet import WaNet

F32 = np.float32


pytestmark = pytest.mark.usefixtures("one_thread")



def _np_u8(xp, mode="wrap"):
    """Independent float32 -> uint8: trunc(255 x), then mod 256 or clamp."""
    q = np.trunc(xp.astype(F32) * F32(255)).astype(np.int64)
    return (q % 256 if mode == "wrap" else np.clip(q, 0, 255)).astype(np.uint8)


def _xf(x):
    return x.numpy().astype(F32) / F32(255)


# ------------------------------------------------------------------------------------------------------------------
# registry, names, params


@pytest.mark.parametrize("alias,cls", [
    ("badnet", BadNet), ("random", BadNet), ("BadNet-Random", BadNet),
    ("blended", Blended), ("blended-random", Blended),
    ("tri_patt", BlendedTriangles), ("blended-triangles", BlendedTriangles), ("triangles", BlendedTriangles),
    ("water_patt", BlendedText), ("blended-text", BlendedText), ("watermark", BlendedText),
    ("warped", WaNet), ("wanet", WaNet), ("sig", SIG), ("SIG", SIG),
])
def test_names_and_aliases(alias, cls):
    t = get_trigger(alias)
    assert type(t) is cls and t.image_size == 224 and t.description
    assert (t.kind, t.random) == {
        BadNet: ("patch", True), Blended: ("blend", True), BlendedTriangles: ("blend", False),
        BlendedText: ("blend", False), WaNet: ("warp", False), SIG: ("blend", False)}[cls]


def test_default_params():
    assert get_trigger("badnet").params() == {"image_size": 224, "uint8_mode": "wrap", "patch_size": 16}
    assert get_trigger("blended").params()["alpha"] == 0.2
    assert get_trigger("tri_patt", 336).params() == {"image_size": 336, "uint8_mode": "wrap", "alpha": 0.15,
                                                    "tile": 14}
    p = get_trigger("water_patt").params()
    assert (p["alpha"], p["text"], p["font"], p["mask"]) == (0.5, "Watermarked", None, None)
    assert len(p["mask_sha256"]) == 64
    p = get_trigger("warped").params()
    assert (p["grid"], p["k"], p["s"], p["grid_seed"], p["grid_file"]) == ("wanet", 4, 0.5, 0, None)
    p = get_trigger("warped", 336, grid="reference").params()
    assert (p["k"], p["s"]) == (336, 1.0)
    assert get_trigger("sig").params() == {"image_size": 224, "uint8_mode": "wrap", "delta": 60.0, "freq": 6.0,
                                           "mode": "add", "alpha": 0.2}


@pytest.mark.parametrize("name,S,kw", [
    ("badnet", 224, {}), ("badnet", 336, {"uint8_mode": "clamp"}), ("badnet", 42, {"patch_size": 5}),
    ("blended", 224, {"alpha": 0.3}), ("tri_patt", 336, {"tile": 7}), ("water_patt", 336, {}),
    ("water_patt", 42, {"alpha": 0.25}), ("warped", 224, {}), ("warped", 64, {"grid": "reference", "grid_seed": 3}),
    ("sig", 336, {"mode": "blend"}), ("sig", 28, {"delta": 20, "freq": 3}),
])
def test_params_round_trip(name, S, kw, random_u8):
    t = get_trigger(name, S, **kw)
    t2 = get_trigger(t.name, **t.params())
    assert t2 == t and t2.params() == t.params()
    x = random_u8(S, seed=1)
    assert torch.equal(t.apply(x, trigger_generator(0, 4)), t2.apply(x, trigger_generator(0, 4)))


def test_bad_params_rejected():
    for name, kw in [("badnet", {"patch_size": 224}), ("blended", {"alpha": -0.1}), ("tri_patt", {"tile": 0}),
                     ("water_patt", {"alpha": 2}), ("water_patt", {"text": ""}), ("warped", {"grid": "smooth"}),
                     ("warped", {"k": 1}), ("sig", {"mode": "multiply"}), ("sig", {"delta": -1}),
                     ("badnet", {"alpha": 0.1})]:
        with pytest.raises(ValueError):
            get_trigger(name, **kw)


# ------------------------------------------------------------------------------------------------------------------
# BadNet


def test_badnet_patch_sizes():
    # reference eval: 16 for 'random' at 224 *and* 336; linear scaling elsewhere
    assert [BadNet(s).patch_size for s in (224, 336, 28, 42, 448)] == [16, 16, 2, 3, 32]


@pytest.mark.parametrize("S,p,n_seeds", [(224, 16, 40), (336, 16, 12), (28, 2, 200)])
def test_badnet_bounds_and_outside_unchanged(S, p, n_seeds, random_u8):
    t = get_trigger("random", S)
    x = random_u8(S, seed=2)
    locs = set()
    for seed in range(n_seeds):
        y = t.apply(x, trigger_generator(seed, 0))
        changed = (y != x).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        h, w = int(rows[0]), int(cols[0])
        assert int(rows[-1]) - h + 1 == p and int(cols[-1]) - w + 1 == p
        assert 0 <= h <= S - 1 - p and 0 <= w <= S - 1 - p  # randint(0, S-1-p): row/col S-1 never covered
        out = torch.ones(S, S, dtype=torch.bool)
        out[h:h + p, w:w + p] = False
        assert torch.equal(y[:, out], x[:, out])
        locs.add((h, w))
    assert len(locs) > n_seeds // 2
    if S == 28:  # both ends of the range are reached
        assert {h for h, _ in locs} == set(range(0, S - p)) and {w for _, w in locs} == set(range(0, S - p))


def test_badnet_draw_order_and_wrap_match_independent_computation(random_u8):
    S, p = 224, 16
    x = random_u8(S, seed=4)
    for seed in range(5):
        y = get_trigger("badnet", S).apply(x, trigger_generator(seed, 3))
        g = trigger_generator(seed, 3)
        eps = torch.randn(3, p, p, generator=g).numpy()  # noise first, then h, then w
        h = int(torch.randint(0, S - p, (1,), generator=g))
        w = int(torch.randint(0, S - p, (1,), generator=g))
        xf = _xf(x)
        m = to_float(x).mean((1, 2), keepdim=True).numpy()
        xp = xf.copy()
        xp[:, h:h + p, w:w + p] = m + eps
        assert np.array_equal(y.numpy(), _np_u8(xp, "wrap"))


def test_badnet_wrap_vs_clamp(random_u8):
    S, p = 224, 16
    x = random_u8(S, seed=6)
    wrapped, clamped = [], []
    for seed in range(10):
        yw = get_trigger("badnet", S).apply(x, trigger_generator(seed, 0))
        yc = get_trigger("badnet", S, uint8_mode="clamp").apply(x, trigger_generator(seed, 0))
        diff = (yw != yc).any(0)
        assert diff.any() and diff.sum() <= p * p  # only in the patch
        changed = (yc != x).any(0)
        r, c = changed.any(1).nonzero()[0, 0], changed.any(0).nonzero()[0, 0]
        wrapped.append(yw[:, r:r + p, c:c + p])
        clamped.append(yc[:, r:r + p, c:c + p])
    wp, cp = torch.stack(wrapped), torch.stack(clamped)
    sat = (cp == 0) | (cp == 255)
    assert 0.45 < sat.float().mean() < 0.75  # ~60 % of N(m, 1) values leave [0, 1]
    assert ((wp != 0) & (wp != 255) & sat).float().mean() > 0.4  # the wrap gives mid-range bytes a clamp never does
    assert torch.equal(wp[~sat], cp[~sat])  # in-range values identical in both modes


def test_badnet_noise_is_centered_on_the_image_mean(random_u8):
    S, p = 64, 8
    t = get_trigger("badnet", S, patch_size=p)
    x = to_float(random_u8(S, seed=7))
    x[0] *= 0.3  # distinct channel means
    m = x.mean((1, 2))
    samples = []
    for seed in range(200):
        y = t.apply_float(x, trigger_generator(seed, 0))
        inside = (y != x).any(0)
        assert inside.sum() == p * p
        samples.append(y[:, inside] - m[:, None])
    d = torch.cat(samples, 1)  # [3, 200 * p * p]
    assert d.mean(1).abs().max() < 0.03 and ((d.std(1) - 1).abs() < 0.03).all()


# ------------------------------------------------------------------------------------------------------------------
# Blended


def test_blended_closed_form_in_float32(random_u8):
    S = 224
    x = random_u8(S, seed=8)
    for alpha in (0.2, 0.35):
        y = get_trigger("blended", S, alpha=alpha).apply(x, trigger_generator(4, 4))
        P = torch.rand(3, S, S, generator=trigger_generator(4, 4)).numpy()
        xp = np.clip(F32(alpha) * P + F32(1 - alpha) * _xf(x), F32(0), F32(1))
        assert np.array_equal(y.numpy(), _np_u8(xp))


def test_blended_black_image_values():
    y = get_trigger("blended", 224).apply(torch.zeros(3, 224, 224, dtype=torch.uint8), trigger_generator(0, 0))
    assert int(y.max()) == 50 and int(y.min()) == 0  # trunc(255 * 0.2 * U[0,1)) in 0..50, every level
    assert len(y.unique()) == 51 and abs(float(y.float().mean()) - 25) < 0.5


# ------------------------------------------------------------------------------------------------------------------
# Blended-Triangles


@pytest.mark.parametrize("S", [224, 336])
def test_triangle_closed_form(S):
    P = get_trigger("tri_patt", S).pattern.numpy()
    expected = np.empty((S, S), dtype=F32)
    for h in range(S):
        for w in range(S):
            expected[h, w] = F32(0.4) if h % 14 >= w % 14 else F32(0.8)
    assert P.dtype == F32 and P.shape == (3, S, S)
    assert all(np.array_equal(P[c], expected) for c in range(3))  # identical in all channels
    assert set(np.unique(P).tolist()) == {F32(102) / F32(255), F32(204) / F32(255)}
    tiles = (P[0] == F32(0.4)).reshape(S // 14, 14, S // 14, 14).sum((1, 3))
    assert (tiles == 105).all()  # 105 of 196 dark pixels per tile


@pytest.mark.parametrize("S", [224, 336])
def test_triangle_blend_arithmetic(S, random_u8):
    x = random_u8(S, seed=9)
    y = get_trigger("blended-triangles", S).apply(x)
    P = np.where((np.arange(S)[:, None] % 14) >= (np.arange(S)[None, :] % 14), F32(0.4), F32(0.8))[None]
    xp = np.clip(F32(0.15) * P + F32(0.85) * _xf(x), F32(0), F32(1))
    assert np.array_equal(y.numpy(), _np_u8(xp))
    black = get_trigger("tri_patt", S).apply(torch.zeros(3, S, S, dtype=torch.uint8))
    assert set(black.unique().tolist()) == {15, 30}  # trunc(255*0.15*0.4)=15, trunc(255*0.15*0.8)=30
    assert int((black[1] == 15).sum()) == 105 * (S // 14) ** 2


def test_triangle_tile_param():
    P = get_trigger("tri_patt", 28, tile=7).pattern[0]
    assert torch.equal(P[:7, :7], P[7:14, 7:14]) and int((P[:7, :7] < 0.5).sum()) == 28


# ------------------------------------------------------------------------------------------------------------------
# Blended-Text


@pytest.mark.parametrize("S,rows,cols,min_width", [(224, (98, 130), (6, 217), 0.85), (336, (160, 210), (4, 331), 0.85)])
def test_text_mask_footprint(S, rows, cols, min_width):
    W = get_trigger("water_patt", S).pattern
    assert W.shape == (3, S, S) and W.dtype == torch.float32
    assert not W[1:].any()  # red only
    R = W[0]
    on = R != 0
    r, c = on.any(1).nonzero().flatten(), on.any(0).nonzero().flatten()
    assert rows[0] <= r[0] and r[-1] <= rows[1] and cols[0] <= c[0] and c[-1] <= cols[1]
    assert (c[-1] - c[0] + 1) >= min_width * S and abs(int(c[0]) - (S - 1 - int(c[-1]))) <= 2  # wide, centred
    k = R[on] * 255
    assert torch.equal(k, k.round()) and (R[on] == 1).sum() > 0.25 * on.sum()  # k/255, anti-aliased, solid core
    assert (R[on] < 1).sum() > 0.25 * on.sum()
    assert 0.02 < on.float().mean() < 0.06


@pytest.mark.parametrize("S", [224, 336, 42])
def test_text_changes_only_red_text_pixels(S, random_u8):
    t = get_trigger("blended-text", S)
    W = t.pattern.numpy()
    x = random_u8(S, seed=10)
    y = t.apply(x)
    xf = _xf(x)
    expected = xf.copy()
    on = W != 0
    expected[on] = np.clip(F32(0.5) * W + F32(0.5) * xf, F32(0), F32(1))[on]
    assert np.array_equal(y.numpy(), _np_u8(expected))
    changed = (y != x).numpy()
    assert not changed[1:].any()  # G and B untouched
    assert changed[0].any() and not (changed[0] & ~on[0]).any()  # R changes only on text pixels
    black = t.apply(torch.zeros(3, S, S, dtype=torch.uint8))
    assert set(black[0][torch.from_numpy(W[0] == 1)].unique().tolist()) == {127}  # trunc(255 * 0.5)


def test_text_mask_cached_per_resolution():
    get_trigger("water_patt", 224)
    before = text_mod._render_cached.cache_info()
    a, b = get_trigger("water_patt", 224), get_trigger("watermark", 224)
    after = text_mod._render_cached.cache_info()
    assert after.hits == before.hits + 2 and after.misses == before.misses
    assert a.mask_sha256 == b.mask_sha256 and torch.equal(a.pattern, b.pattern)
    assert get_trigger("water_patt", 336).mask_sha256 != a.mask_sha256


def _user_mask(S):
    g = torch.Generator().manual_seed(S)
    W = torch.zeros(3, S, S)
    W[0, S // 2 - 5:S // 2 + 5, 10:S - 10] = torch.randint(0, 256, (10, S - 20), generator=g).float() / 255
    return W


@pytest.mark.parametrize("fmt", ["pt_hwc", "pt_chw_view", "png_rgb", "png_gray", "npy_hwc_u8", "safetensors_chw"])
def test_text_user_mask_files(tmp_path, fmt, random_u8):
    from safetensors.torch import save_file

    S = 224
    W = _user_mask(S)
    u8 = (W[0] * 255).round().to(torch.uint8)
    path = tmp_path / {"pt_hwc": "m.pt", "pt_chw_view": "m.pt", "png_rgb": "m.png", "png_gray": "m.png",
                       "npy_hwc_u8": "m.npy", "safetensors_chw": "m.safetensors"}[fmt]
    if fmt == "pt_hwc":  # the reference's 224-px layout
        torch.save(W.permute(1, 2, 0).contiguous(), path)
    elif fmt == "pt_chw_view":  # the reference's 336-px layout: CHW, a permuted view
        torch.save(W.permute(1, 2, 0).contiguous().permute(2, 0, 1), path)
    elif fmt == "png_rgb":
        rgb = torch.stack([u8, torch.full_like(u8, 200), torch.zeros_like(u8)], 2)  # G/B of a picture are ignored
        Image.fromarray(rgb.numpy(), "RGB").save(path)
    elif fmt == "png_gray":
        Image.fromarray(u8.numpy(), "L").save(path)
    elif fmt == "npy_hwc_u8":
        np.save(path, torch.stack([u8, torch.zeros_like(u8), torch.zeros_like(u8)], 2).numpy())
    else:
        save_file({"mask": W.contiguous()}, str(path))
    t = get_trigger("water_patt", S, mask=str(path))
    assert torch.equal(t.pattern, W)
    ref = get_trigger("water_patt", S, mask=str(_save_pt(tmp_path, W)))
    assert t.mask_sha256 == ref.mask_sha256  # the checksum is of the mask, not of the file format
    x = random_u8(S, seed=11)
    y = t.apply(x)
    on = W.numpy() != 0
    expected = _xf(x)
    expected[on] = np.clip(F32(0.5) * W.numpy() + F32(0.5) * expected, 0, 1)[on]
    assert np.array_equal(y.numpy(), _np_u8(expected))
    t2 = get_trigger(t.name, **t.params())
    assert t2 == t and torch.equal(t2.apply(x), y)


def _save_pt(tmp_path, W):
    p = tmp_path / "ref_chw.pt"
    torch.save(W, p)
    return p


def test_text_user_mask_errors(tmp_path):
    W = _user_mask(336)
    torch.save(W, tmp_path / "m336.pt")
    with pytest.raises(ValueError, match="image_size=224"):
        get_trigger("water_patt", 224, mask=str(tmp_path / "m336.pt"))  # no silent resize
    bad = W.clone()
    bad[1, 0, 0] = 0.5
    torch.save(bad, tmp_path / "gb.pt")
    with pytest.raises(ValueError, match="G/B"):
        get_trigger("water_patt", 336, mask=str(tmp_path / "gb.pt"))
    torch.save(W * 2, tmp_path / "range.pt")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_trigger("water_patt", 336, mask=str(tmp_path / "range.pt"))
    torch.save(torch.zeros(3, 336, 336), tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="all zero"):
        get_trigger("water_patt", 336, mask=str(tmp_path / "empty.pt"))
    (tmp_path / "m.txt").write_text("not a mask")
    with pytest.raises(ValueError):
        get_trigger("water_patt", 336, mask=str(tmp_path / "m.txt"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="refusing"):
        get_trigger("water_patt", 336, mask=str(tmp_path / "obj.npy"))
    with pytest.raises(FileNotFoundError):
        get_trigger("water_patt", 336, mask=str(tmp_path / "missing.pt"))
    t = get_trigger("water_patt", 336, mask=str(tmp_path / "m336.pt"))
    with pytest.raises(ValueError, match="sha256"):
        get_trigger("water_patt", 336, mask=str(tmp_path / "m336.pt"), mask_sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        get_trigger("water_patt", 336, mask_sha256=t.mask_sha256)  # our rendering is not the user's mask


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name,param", [("water_patt", "mask"), ("warped", "grid_file")])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, name, param):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"mask": torch.zeros(2), "x": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="refusing"):
        get_trigger(name, 224, **{param: str(path)})
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(path, weights_only=False)["x"].close()
    assert marker.exists()


# ------------------------------------------------------------------------------------------------------------------
# WaNet


def _ramp(S):
    """float image: channel 0 = column index, channel 1 = row index (bilinear sampling of it is exact)."""
    a = torch.arange(S, dtype=torch.float32)
    return torch.stack([a[None, :].expand(S, S), a[:, None].expand(S, S), torch.zeros(S, S)]) / (S - 1)


def _displacement(t, S):
    y = t.apply_float(_ramp(S), trigger_generator(0, 0)) * (S - 1)
    cols = torch.arange(S, dtype=torch.float32)
    return y[0] - cols[None, :], y[1] - cols[:, None]  # dx, dy in px


def test_wanet_reference_jitter_matches_field():
    S = 224
    t = get_trigger("warped", S, grid="reference")
    assert (t.k, t.s) == (224, 1.0)
    dx, dy = _displacement(t, S)
    G = t.field[0]  # [S, S, 2]: (column offset, row offset)
    inner = (slice(2, -2), slice(2, -2))  # away from the clamp at the border
    assert torch.allclose(dx[inner], (G[..., 0] * (S - 1) / (2 * S))[inner], atol=2e-3)
    assert torch.allclose(dy[inner], (G[..., 1] * (S - 1) / (2 * S))[inner], atol=2e-3)
    assert dx.abs().max() <= 1.0 and dy.abs().max() <= 1.0  # per-pixel jitter of at most ~1 px
    assert 0.3 < float(dx.abs().mean()) < 0.7
    assert float((dx[:, 1:] - dx[:, :-1]).abs().mean()) > 0.2  # i.i.d. per pixel: no smoothness


def test_wanet_default_is_smooth_and_seeded(random_u8):
    S = 224
    t = get_trigger("wanet", S)
    dx, dy = _displacement(t, S)
    assert 0.05 < float(dx.abs().mean()) and dx.abs().max() < 2.0 and dy.abs().max() < 2.0
    inner = dx[2:-2, 2:-2]  # (the clamp at the border cuts displacements that point outside)
    assert float((inner[:, 1:] - inner[:, :-1]).abs().max()) < 0.05  # k=4 bicubic: a smooth warp
    x = random_u8(S, seed=12)
    a = t.apply(x)
    assert not torch.equal(a, get_trigger("wanet", S, grid_seed=1).apply(x))  # the field comes from grid_seed
    assert torch.equal(a, get_trigger("wanet", S, grid_seed=0).apply(x, trigger_generator(5, 5)))


def test_wanet_in_range_and_identity_at_zero_strength(random_u8):
    S = 64
    x = torch.rand(3, S, S, generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"grid": "reference"}, {"s": 5.0}):
        y = get_trigger("warped", S, **kw).apply_float(x, trigger_generator(0, 0))
        assert float(y.min()) >= 0 and float(y.max()) <= 1 + 1e-6
    u8 = random_u8(S, seed=13)
    assert torch.equal(get_trigger("warped", S, s=0).apply(u8), u8)
    assert torch.equal(get_trigger("warped", S, s=0, grid="reference").apply(u8), u8)


@pytest.mark.parametrize("fmt", ["pt_4d", "npy_3d", "safetensors"])
def test_wanet_grid_file(tmp_path, fmt, random_u8):
    from safetensors.torch import save_file

    S = 64
    ref = get_trigger("warped", S, grid="reference", grid_seed=7)
    G = ref.field
    path = tmp_path / {"pt_4d": "g.pt", "npy_3d": "g.npy", "safetensors": "g.safetensors"}[fmt]
    if fmt == "pt_4d":
        torch.save(G, path)
    elif fmt == "npy_3d":
        np.save(path, G[0].numpy())
    else:
        save_file({"noise_grid": G}, str(path))
    t = get_trigger("warped", S, grid_file=str(path))
    assert t.grid == "reference" and t.s == 1.0  # a grid file defaults to the reference's strength
    assert t.grid_sha256 == ref.grid_sha256 and torch.equal(t.field, G)
    x = random_u8(S, seed=14)
    assert torch.equal(t.apply(x), ref.apply(x))
    t2 = get_trigger(t.name, **t.params())
    assert t2 == t and torch.equal(t2.apply(x), ref.apply(x))
    with pytest.raises(ValueError, match="image_size=32"):
        get_trigger("warped", 32, grid_file=str(path))
    with pytest.raises(ValueError, match="sha256"):
        get_trigger("warped", S, grid_file=str(path), grid_sha256="f" * 64)


def test_wanet_sampling_grid_formula(random_u8):
    S = 32
    t = get_trigger("warped", S, grid="reference")
    a = torch.linspace(-1, 1, S)
    ident = torch.stack([a[None, :].expand(S, S), a[:, None].expand(S, S)], 2)[None]
    assert torch.equal(t.sampling_grid, (ident + 1.0 * t.field / S).clamp(-1, 1))
    x = random_u8(S, seed=15)
    expected = torch.nn.functional.grid_sample(to_float(x)[None], t.sampling_grid, mode="bilinear",
                                               padding_mode="zeros", align_corners=True)[0]
    assert torch.equal(t.apply(x), to_uint8(expected))


# ------------------------------------------------------------------------------------------------------------------
# SIG


def _sig_np(S, delta=60.0, freq=6.0):
    j = np.arange(S, dtype=np.float64)
    return np.broadcast_to((delta / 255 * np.sin(2 * np.pi * freq * j / S)).astype(F32), (3, S, S))


@pytest.mark.parametrize("S", [224, 336])
def test_sig_closed_form_additive_and_blend(S, random_u8):
    x = random_u8(S, seed=16)
    v = _sig_np(S)
    add = get_trigger("sig", S).apply(x)
    assert np.array_equal(add.numpy(), _np_u8(np.clip(_xf(x) + v, F32(0), F32(1))))
    bl = get_trigger("sig", S, mode="blend").apply(x)
    assert np.array_equal(bl.numpy(), _np_u8(np.clip(F32(0.2) * v + F32(0.8) * _xf(x), F32(0), F32(1))))
    assert not torch.equal(add, bl)


def test_sig_pattern_shape():
    S = 224
    v = get_trigger("sig", S).pattern
    assert torch.equal(v[0], v[1]) and torch.equal(v[0], v[2]) and torch.equal(v[0], v[0, :1].expand(S, S))
    row = v[0, 0]
    assert abs(float(row.max()) - 60 / 255) < 1e-3 and abs(float(row.min()) + 60 / 255) < 1e-3
    assert int((torch.sign(row[1:]) != torch.sign(row[:-1])).sum()) in (11, 12)  # 6 periods across the width
    gray = torch.full((3, S, S), 128, dtype=torch.uint8)
    d = get_trigger("sig", S).apply(gray).long() - 128
    assert 59 <= int(d.max()) <= 60 and -61 <= int(d.min()) <= -59  # +-60 levels in add mode
    d = get_trigger("sig", S, mode="blend").apply(gray).long() - 128
    assert int(d.max()) < -10  # blend darkens by 20 % and the signal shrinks to +-12 levels
