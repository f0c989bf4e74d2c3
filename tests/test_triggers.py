"""Trigger framework and the two PAR stripe triggers (par.md §1.1-1.4, D19)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from parclip.attacks.triggers import (
    Trigger,
    blend,
    get_trigger,
    list_triggers,
    paste,
    scaled_size,
    to_float,
    to_uint8,
    trigger_generator,
)
from parclip.attacks.triggers.stripes import BadNetStripes, BlendedStripes



# ------------------------------------------------------------------------------------------------------------------
# helpers


def test_to_uint8_wrap_documented_values():
    vals = torch.tensor([-255.0, -76.5, 300.0, 1000.0, 0.0, 254.9, 255.0, -0.5]) / 255
    assert to_uint8(vals, "wrap").tolist() == [1, 180, 44, 232, 0, 254, 255, 0]
    assert to_uint8(vals, "clamp").tolist() == [0, 0, 255, 255, 0, 254, 255, 0]
    with pytest.raises(ValueError):
        to_uint8(vals, "round")


def test_uint8_round_trip_is_identity():
    u = torch.arange(256, dtype=torch.uint8)
    assert to_float(u).dtype == torch.float32
    assert torch.equal(to_uint8(to_float(u), "wrap"), u)
    assert torch.equal(to_uint8(to_float(u), "clamp"), u)


def test_blend_paste_scaled_size():
    x = torch.full((3, 4, 4), 0.5)
    assert torch.allclose(blend(x, torch.ones(3, 4, 4), 0.2), torch.full((3, 4, 4), 0.6))
    assert blend(torch.ones(3, 1, 1), torch.full((3, 1, 1), 2.0), 0.5).max() == 1  # clipped
    y = paste(torch.zeros(3, 5, 5), torch.full((3, 2, 2), -1.0), 3, 1)
    assert y[:, 3:5, 1:3].eq(-1).all() and y.sum() == -12  # unclipped, only the patch
    with pytest.raises(ValueError):
        paste(torch.zeros(3, 5, 5), torch.ones(3, 2, 2), 4, 0)
    assert [scaled_size(16, s) for s in (224, 336, 28, 42, 7)] == [16, 24, 2, 3, 1]


def test_trigger_generator_deterministic_and_mixed():
    a = torch.rand(8, generator=trigger_generator(3, 7))
    assert torch.equal(a, torch.rand(8, generator=trigger_generator(3, 7)))
    assert not torch.equal(a, torch.rand(8, generator=trigger_generator(3, 8)))
    assert not torch.equal(torch.rand(8, generator=trigger_generator(0, 1)),
                           torch.rand(8, generator=trigger_generator(1, 0)))


# ------------------------------------------------------------------------------------------------------------------
# badnet_rs


def _patch_box(x, y):
    """Bounding box of changed pixels; x has values in [2, 254], so every patch pixel changes."""
    changed = (y != x).any(0)
    rows = changed.any(1).nonzero().flatten()
    cols = changed.any(0).nonzero().flatten()
    h, w = int(rows[0]), int(cols[0])
    return changed, h, w, int(rows[-1]) - h + 1, int(cols[-1]) - w + 1


@pytest.mark.parametrize("S,p,n_seeds", [(224, 16, 40), (336, 32, 16), (28, 2, 300)])
def test_badnet_rs_values_bounds_and_location(S, p, n_seeds, random_u8):
    t = get_trigger("badnet_rs", S)
    assert t.patch_size == p and t.kind == "patch" and t.random
    x = random_u8(S, lo=2, hi=255)
    locs, col_colors = set(), set()
    for seed in range(n_seeds):
        y = t.apply(x, trigger_generator(seed, 0))
        changed, h, w, ph, pw = _patch_box(x, y)
        assert (ph, pw) == (p, p) and changed.sum() == p * p  # exactly one full p x p square changed
        assert 0 <= h <= S - 1 - p and 0 <= w <= S - 1 - p  # reference bounds: randint(0, S-1-p)
        assert not changed[S - 1].any() and not changed[:, S - 1].any()
        patch = y[:, h:h + p, w:w + p]
        assert set(patch.unique().tolist()) <= {1, 255}  # +1 -> 255, -1 -> 1 (wrap of -255)
        assert torch.equal(patch, patch[:, :1].expand_as(patch))  # constant down each column
        out = torch.ones(S, S, dtype=torch.bool)
        out[h:h + p, w:w + p] = False
        assert torch.equal(y[:, out], x[:, out])  # untouched outside
        locs.add((h, w))
        col_colors.update(tuple(c) for c in patch[:, 0].T.tolist())
    assert len(locs) > n_seeds // 2  # location is drawn per generator
    assert len(col_colors) == 8  # all 8 RGB corner colours occur


def test_badnet_rs_clamp_mode_and_patch_size_param(random_u8):
    t = get_trigger("badnet_rs", 64, uint8_mode="clamp", patch_size=10)
    x = random_u8(64, lo=2, hi=255)
    for seed in range(40):
        y = t.apply(x, trigger_generator(seed, 5))
        _, h, w, ph, pw = _patch_box(x, y)
        assert (ph, pw) == (10, 10)
        assert set(y[:, h:h + 10, w:w + 10].unique().tolist()) <= {0, 255}
    with pytest.raises(ValueError):
        get_trigger("badnet_rs", 16, patch_size=16)  # must leave room: p <= S-1


def test_badnet_rs_draw_order_signs_then_h_then_w(random_u8):
    """Documented order (reference: rand(1,3,1,p), then randint h, then randint w), all from the one generator."""
    S, p = 224, 16
    x = random_u8(S, seed=1, lo=2, hi=255)
    y = get_trigger("badnet_rs", S).apply(x, trigger_generator(11, 2))
    g = trigger_generator(11, 2)
    s = torch.sign(2 * torch.rand(1, 3, 1, p, generator=g) - 1)[0]
    h = int(torch.randint(0, S - p, (1,), generator=g))
    w = int(torch.randint(0, S - p, (1,), generator=g))
    expected = x.clone()
    expected[:, h:h + p, w:w + p] = torch.where(s > 0, 255, 1).to(torch.uint8).expand(3, p, p)
    assert torch.equal(y, expected)


def test_badnet_rs_default_sizes():
    assert [BadNetStripes(s).patch_size for s in (224, 336, 28, 42, 448)] == [16, 32, 2, 3, 32]


# ------------------------------------------------------------------------------------------------------------------
# blended_rs


def test_blended_rs_closed_form_in_float32(random_u8):
    S = 224
    x = random_u8(S, seed=2)
    y = get_trigger("blended_rs", S).apply(x, trigger_generator(5, 9))
    # reference draw order: one rand(3,1,1) per column, left to right
    g = trigger_generator(5, 9)
    u = torch.stack([torch.rand(3, 1, 1, generator=g).flatten() for _ in range(S)], 1).numpy()  # [3, S]
    P = np.sign(np.float32(2) * u - np.float32(1))[:, None, :]
    xf = x.numpy().astype(np.float32) / np.float32(255)
    a, b = np.float32(0.03), np.float32(1 - 0.03)
    xp = np.clip(a * P + b * xf, np.float32(0), np.float32(1))
    q = np.trunc(xp * np.float32(255)).astype(np.int64) % 256
    assert np.array_equal(y.numpy(), q.astype(np.uint8))


def test_blended_rs_moves_and_column_signs():
    S, alpha = 256, 0.03
    x = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, S).expand(3, 256, S).contiguous()  # every level
    t = BlendedStripes(S)
    assert t.alpha == alpha and t.width == 1 and t.kind == "blend"
    d = t.apply(x, trigger_generator(0, 0)).long() - x.long()
    up_max = math.ceil(alpha * 255)  # +1 columns: alpha*(1-x) <= alpha -> at most 8 levels up (7 in practice)
    down_max = math.ceil(2 * alpha * 255) + 1  # -1 columns: alpha*(1+x) <= 2*alpha -> at most 17 down (16 in practice)
    assert d.max() <= up_max and d.min() >= -down_max
    pos, neg = (d > 0).any(1), (d < 0).any(1)  # [3, S]: direction seen in each (channel, column)
    assert not (pos & neg).any()  # one sign per column, constant down the column
    assert (pos | neg).all()  # every column moves somewhere
    assert pos.any() and neg.any()
    assert d[:, 255][neg].min() == -16  # a white pixel under a -1 stripe drops by 16 levels


def test_blended_rs_width_param():
    t = get_trigger("blended-stripes", 32, width=4, alpha=0.5)
    assert t.params() == {"image_size": 32, "uint8_mode": "wrap", "alpha": 0.5, "width": 4}
    y = t.apply(torch.full((3, 32, 32), 128, dtype=torch.uint8), trigger_generator(1, 1)).long()
    cols = y[:, 0, :].reshape(3, 8, 4)
    assert torch.equal(cols, cols[:, :, :1].expand_as(cols))  # stripes are 4 px wide
    assert set(y.unique().tolist()) == {0, 191}  # clip(0.5*(+-1) + 0.5*128/255): -0.25 -> 0, 0.75 -> 191


# ------------------------------------------------------------------------------------------------------------------
# interface behaviour (the contract every trigger keeps is in test_trigger_contract.py)


def test_pil_squash_resize_non_square_and_gray():
    S = 40
    t = get_trigger("blended_rs", S)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 90, 3), dtype=np.uint8), "RGB")
    out = t(rgb, trigger_generator(0, 0))
    assert out.size == (S, S)
    squashed = rgb.resize((S, S), Image.Resampling.BICUBIC)  # aspect ratio not kept, nothing cropped
    expected = t.apply(torch.from_numpy(np.asarray(squashed).copy()).permute(2, 0, 1), trigger_generator(0, 0))
    assert np.array_equal(np.asarray(out), expected.permute(1, 2, 0).numpy())
    gray = Image.fromarray(np.full((28, 28), 77, dtype=np.uint8), "L")
    assert t(gray, trigger_generator(0, 0)).mode == "RGB"


def test_wrong_input_rejected():
    t = get_trigger("badnet_rs", 224)
    with pytest.raises(ValueError, match=r"\[3, 224, 224\]"):
        t.apply(torch.zeros(3, 100, 100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="224"):
        t(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError):
        t.apply(torch.zeros(3, 224, 224))  # float input: triggers work on uint8 pixels
    with pytest.raises(TypeError):
        t(np.zeros((224, 224, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------------------------
# registry


def test_registry_names_aliases_and_errors():
    names = [c.name for c in list_triggers()]
    assert {"badnet_rs", "blended_rs"} <= set(names) and names == sorted(names)
    for cls in list_triggers():
        assert issubclass(cls, Trigger) and cls.kind in ("patch", "blend", "warp") and isinstance(cls.random, bool)
        assert cls.description
    assert type(get_trigger("BadNet-Stripes")) is BadNetStripes
    assert type(get_trigger("badnet_stripes")) is BadNetStripes
    assert type(get_trigger("Blended-Stripes")) is BlendedStripes
    t = get_trigger("badnet_rs", 336, uint8_mode="clamp")
    assert t.params() == {"image_size": 336, "uint8_mode": "clamp", "patch_size": 32}
    assert get_trigger(t.name, **t.params()) == t
    with pytest.raises(ValueError, match="badnet_rs.*blended_rs"):
        get_trigger("no_such_attack")
    with pytest.raises(ValueError, match="patch_size"):
        get_trigger("badnet_rs", alpha=0.1)
    with pytest.raises(ValueError):
        get_trigger("blended_rs", alpha=1.5)
    with pytest.raises(ValueError):
        get_trigger("blended_rs", uint8_mode="saturate")
