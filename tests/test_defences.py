"""The defences: each loss against a hand computation, RoCLIP's pool, the views, recipes and presets, the CLI list.
(The two-process equality of every objective is in test_train.py.)"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from parclip.cli import main
from parclip.config import make_config
from parclip.defences import PRESETS, Embeddings, get_defence, list_defences
from parclip.defences.augment import autoaugment_view, roclip_train_transform
from parclip.defences.roclip import FifoPool
from parclip.objectives import clip_loss, cleanclip_loss, inmodal_loss, roclip_loss


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def ce_diag(logits):
    """Mean over rows of −log softmax(row)[i], written out."""
    n = logits.shape[0]
    return sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(n)) / n


A = unit([1.0, 0.0], [0.6, 0.8], [0.0, 1.0])
B = unit([0.8, 0.6], [1.0, 0.0], [0.3, 0.9])
A2 = unit([0.9, 0.1], [0.5, 0.5], [0.1, 0.9])
B2 = unit([0.7, 0.7], [0.9, -0.1], [0.2, 1.0])


def test_inmodal_and_cleanclip_losses_by_hand():
    s = 10.0
    assert inmodal_loss(A, A2, s).item() == pytest.approx(ce_diag(s * A @ A2.T).item(), rel=1e-5)
    # one direction only: CE(s·A Ãᵀ), not its transpose
    assert inmodal_loss(A, A2, s).item() != pytest.approx(ce_diag(s * A2 @ A.T).item(), rel=1e-3)
    out = cleanclip_loss(A, B, A2, B2, s, clip_weight=0.7, inmodal_weight=2.0)
    lc = 0.5 * (ce_diag(s * A @ B.T) + ce_diag(s * B @ A.T))
    ss = 0.5 * (ce_diag(s * A @ A2.T) + ce_diag(s * B @ B2.T))
    assert out.clip.item() == pytest.approx(lc.item(), rel=1e-5)
    assert out.inmodal.item() == pytest.approx(ss.item(), rel=1e-5)
    assert out.total.item() == pytest.approx(0.7 * lc.item() + 2.0 * ss.item(), rel=1e-5)


def test_roclip_loss_by_hand_and_gradient_only_to_images():
    s = 5.0
    img = A.clone().requires_grad_(True)
    nn_txt = B2.clone().requires_grad_(True)
    loss = roclip_loss(img, nn_txt, s)
    assert loss.item() == pytest.approx(0.5 * (ce_diag(s * A @ B2.T) + ce_diag(s * B2 @ A.T)).item(), rel=1e-5)
    loss.backward()
    assert img.grad.abs().sum() > 0 and nn_txt.grad is None  # the pooled captions carry no gradient
    txt = B.clone()
    both = roclip_loss(A, B2, s, txt=txt, nn_img=A2)
    assert both.item() == pytest.approx(0.5 * (clip_loss(A, B2, s) + clip_loss(A2, B, s)).item(), rel=1e-5)
    with pytest.raises(ValueError, match="txt"):
        roclip_loss(A, B2, s, nn_img=A2)


def test_pool_is_fifo_wraps_around_and_finds_nearest():
    pool = FifoPool(5, 2, seed=0)
    assert torch.allclose(pool.bank.norm(dim=1), torch.ones(5))  # seeded random unit vectors to start
    assert torch.equal(pool.bank, FifoPool(5, 2, seed=0).bank) and not torch.equal(pool.bank, FifoPool(5, 2, seed=1).bank)
    x = unit(*[[math.cos(k), math.sin(k)] for k in range(8)])
    pool.push(x[:3])
    assert pool.ptr == 3 and torch.equal(pool.bank[:3], x[:3])
    pool.push(x[3:6])  # 2 rows fit before the end; the third is dropped and the pointer restarts at 0
    assert pool.ptr == 0 and pool.filled == 5 and torch.equal(pool.bank, x[:5])
    pool.push(x[6:8])  # the oldest rows are overwritten first
    assert pool.ptr == 2 and torch.equal(pool.bank[:2], x[6:8]) and torch.equal(pool.bank[2:], x[2:5])
    q = unit([math.cos(2.1), math.sin(2.1)], [math.cos(6.9), math.sin(6.9)])
    assert torch.equal(pool.nearest(q), torch.stack([x[2], x[7]]))
    state = pool.state_dict()
    other = FifoPool(5, 2, seed=3)
    other.load_state_dict(state)
    assert torch.equal(other.bank, pool.bank) and other.ptr == 2
    with pytest.raises(ValueError, match="pool-size"):
        FifoPool(4, 2).load_state_dict(state)


def _cfg(**kw):
    return make_config(train_data="x.csv", pretrained="p.pt", **kw)


def _random_unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_each_defence_loss_is_its_pure_function_on_the_same_embeddings():
    """Catches a defence that wires its views or settings into its loss wrongly (CleanCLIP's augmented views in the
    cross-modal term, a weight, τ or the per-sample switch not passed): on one batch of distinct random embeddings
    each defence's loss equals its pure function in objectives.py called as its docstring says."""
    from parclip.objectives import par_loss

    img, txt, img_aug, txt_aug, img0, txt0 = (_random_unit(6, 8, seed) for seed in range(6))
    s = torch.tensor(7.0)
    cc = get_defence(_cfg(objective="cleanclip", cleanclip_clip_weight=0.7, cleanclip_inmodal_weight=1.9))
    loss, parts = cc.loss(Embeddings(img=[img, img_aug], txt=[txt, txt_aug]), s, epoch=0)
    ref = cleanclip_loss(img, txt, img_aug, txt_aug, s, clip_weight=0.7, inmodal_weight=1.9)
    assert loss.item() == pytest.approx(ref.total.item(), rel=1e-6)
    assert (parts["clip_loss"], parts["inmodal"]) == pytest.approx((ref.clip.item(), ref.inmodal.item()), rel=1e-6)
    swapped = cleanclip_loss(img_aug, txt_aug, img, txt, s, clip_weight=0.7, inmodal_weight=1.9)
    assert abs(swapped.total.item() - ref.total.item()) > 1e-3  # the batch tells the views apart

    for per_sample in (False, True):
        par = get_defence(_cfg(tau=3.0, par_weight=1.3, per_sample_threshold=per_sample))
        loss, parts = par.loss(Embeddings(img=[img], txt=[txt], img0=img0, txt0=txt0), s, epoch=0)
        ref = par_loss(img, txt, img0, txt0, s, tau=3.0, weight=1.3, per_sample=per_sample)
        assert loss.item() == pytest.approx(ref.total.item(), rel=1e-6)
        assert parts == pytest.approx(dict(clip_loss=ref.clip.item(), perturb=ref.perturb.item(),
                                           dist_img=ref.dist_img.item(), dist_txt=ref.dist_txt.item(),
                                           on_img=float(ref.dist_img.item() <= 3.0),
                                           on_txt=float(ref.dist_txt.item() <= 3.0)), rel=1e-6)
    # the thresholds differ on this batch: τ = 3 keeps the batch mean but drops the rows beyond it
    assert par_loss(img, txt, img0, txt0, s, tau=3.0, per_sample=True).perturb != pytest.approx(
        par_loss(img, txt, img0, txt0, s, tau=3.0).perturb.item(), rel=1e-3)
    ablation = get_defence(_cfg(preset="par-no-perturb"))  # w = 0: no frozen copy, the CLIP loss
    assert ablation.loss(Embeddings(img=[img], txt=[txt]), s, epoch=0)[0].item() == pytest.approx(
        clip_loss(img, txt, s).item(), rel=1e-6)
    assert get_defence(_cfg(objective="clip")).loss(Embeddings(img=[img], txt=[txt]), s, epoch=0)[0].item() == \
        pytest.approx(clip_loss(img, txt, s).item(), rel=1e-6)


def test_roclip_swaps_every_kth_epoch_counted_from_one_and_keeps_pool_state():
    d = get_defence(_cfg(objective="roclip", roclip_every=2, roclip_pool_size=3))
    assert [d.is_roclip_epoch(e) for e in range(5)] == [False, True, False, True, False]
    s = torch.tensor(10.0)
    batch = Embeddings(img=[A], txt=[B])
    loss, parts = d.loss(batch, s, epoch=0)  # a plain epoch: the CLIP loss, the pool untouched
    assert parts["roclip_epoch"] == 0 and loss.item() == pytest.approx(clip_loss(A, B, s).item())
    assert d.text_pool.filled == 0
    pooled = d.text_pool.bank.clone()
    loss, parts = d.loss(batch, s, epoch=1)  # looks up the pool *before* pushing this batch's captions
    expected = roclip_loss(A, pooled[(A @ pooled.T).argmax(1)], s)
    assert parts["roclip_epoch"] == 1 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(d.text_pool.bank, B)
    again = get_defence(_cfg(objective="roclip", roclip_every=2, roclip_pool_size=3))
    again.load_state_dict(d.state_dict())  # resume: the pool comes back before the first batch builds it
    again.loss(Embeddings(img=[A], txt=[A2]), s, epoch=0)
    assert torch.equal(again.text_pool.bank, B)


def test_roclip_prefill_fills_the_pool_in_plain_epochs():
    d = get_defence(_cfg(objective="roclip", roclip_pool_size=3, roclip_prefill=True))
    d.loss(Embeddings(img=[A], txt=[B]), torch.tensor(10.0), epoch=0)
    assert torch.equal(d.text_pool.bank, B)


def test_autoaugment_view_runs_on_the_pil_image_before_preprocessing(monkeypatch):
    from torchvision import transforms as T

    seen = []
    real = T.AutoAugment.forward

    def spy(self, img):
        seen.append(type(img))
        return real(self, img)

    monkeypatch.setattr(T.AutoAugment, "forward", spy)
    pp = {"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
          "resize_mode": "shortest", "mode": "RGB", "fill_color": 0}
    view = autoaugment_view(pp)
    img = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy(), "RGB").convert("P")
    outs = [view(img) for _ in range(8)]
    assert seen and all(issubclass(t, Image.Image) for t in seen)  # the raw (RGB-converted) PIL image
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # a fresh draw each call
    assert roclip_train_transform(pp)(img).shape == (3, 32, 32)


def test_recipes_presets_and_errors():
    assert {d.name for d in list_defences()} >= {"par", "clip", "cleanclip", "roclip"}
    cc = _cfg(objective="cleanclip")
    assert (cc.batch_size, cc.lr, cc.epochs, cc.warmup, cc.beta2, cc.wd) == (64, 1e-5, 10, 50, 0.999, 0.1)
    assert _cfg(objective="cleanclip", lr=3e-5).lr == 3e-5  # explicit values win over the recipe
    par = _cfg()
    assert (par.objective, par.tau, par.lr, par.lr_decay_ratio, par.beta2) == ("par", 2.15, 3e-5, 0.1, 0.98)
    ft = _cfg(preset="clip-cleanclip-recipe")
    assert ft.objective == "clip" and (ft.batch_size, ft.lr, ft.epochs) == (64, 1e-5, 10)
    ab = _cfg(preset="par-no-perturb")
    assert ab.objective == "par" and ab.par_weight == 0 and not get_defence(ab).frozen_copy()
    assert get_defence(par).frozen_copy() and set(PRESETS) >= {"clip-cleanclip-recipe", "par-no-perturb"}
    with pytest.raises(ValueError, match="known: .*cleanclip"):
        _cfg(objective="cleenclip")
    with pytest.raises(ValueError, match="unknown preset"):
        _cfg(preset="nope")
    with pytest.raises(ValueError, match="recipe of --objective par"):
        _cfg(preset="par-no-perturb", objective="clip")
    with pytest.raises(ValueError, match="negatives"):
        get_defence(_cfg(objective="cleanclip", batch_size=1))


def test_cli_lists_defences_and_presets(capsys):
    assert main(["defences", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"]: r for r in rows}
    assert {"par", "clip", "cleanclip", "roclip", "clip-cleanclip-recipe", "par-no-perturb"} <= set(names)
    assert names["cleanclip"]["defaults"]["lr"] == 1e-5 and names["par-no-perturb"]["kind"] == "preset of par"
    assert main(["defences", "list"]) == 0
    assert "roclip" in capsys.readouterr().out
    assert main(["train", "--objective", "nope", "--train-data", "x.csv"]) == 2
    assert "known: " in capsys.readouterr().err


def test_par_latch_switches_each_term_off_for_good_and_survives_a_resume():
    """Catches the latch not switching a term off once its distance exceeded τ, switching it back on when the
    distance falls again, latching both towers together, or losing its state across a resume."""
    s = torch.tensor(10.0)
    d = get_defence(_cfg(objective="par", tau=0.5, tau_text=3.0, par_latch=True))
    assert d.stateful
    far = Embeddings(img=[A], txt=[B], img0=-A, txt0=B2)  # image distance 4 > 0.5, text distance small < 3
    _, parts = d.loss(far, s, epoch=0)
    assert parts["on_img"] == 0 and parts["on_txt"] == 1 and d.latched == {"img": True, "txt": False}
    near = Embeddings(img=[A], txt=[B], img0=A2, txt0=B2)  # both distances now within their τ
    loss, parts = d.loss(near, s, epoch=0)
    d_txt = ((B - B2) ** 2).sum(1).mean().item()
    assert parts["on_img"] == 0 and parts["on_txt"] == 1  # the image term stays off, the text term pushes
    assert loss.item() == pytest.approx(clip_loss(A, B, s).item() - 0.5 * d_txt, rel=1e-5)
    resumed = get_defence(_cfg(objective="par", tau=0.5, tau_text=3.0, par_latch=True))
    resumed.load_state_dict(d.state_dict())
    assert resumed.latched == {"img": True, "txt": False}
    unlatched = get_defence(_cfg(objective="par", tau=0.5))
    assert not unlatched.stateful and unlatched.state_dict() == {}
    _, parts = unlatched.loss(far, s, epoch=0)
    _, parts = unlatched.loss(near, s, epoch=0)
    assert parts["on_img"] == 1  # without the latch the term comes back below τ (the reference)
    with pytest.raises(ValueError, match="latch"):
        unlatched.load_state_dict(d.state_dict())


def test_par_perturb_epochs_leaves_the_clip_loss_alone_afterwards():
    s = torch.tensor(10.0)
    d = get_defence(_cfg(objective="par", tau=4.0, perturb_epochs=1))
    near = Embeddings(img=[A], txt=[B], img0=A2, txt0=B2)
    first, parts0 = d.loss(near, s, epoch=0)
    later, parts1 = d.loss(near, s, epoch=1)
    assert parts0["on_img"] == 1 and parts1["on_img"] == 0 and parts1["on_txt"] == 0
    assert later.item() == pytest.approx(clip_loss(A, B, s).item(), rel=1e-6) and first.item() < later.item()
