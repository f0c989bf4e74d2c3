import open_clip
import pytest
import torch
import torch.nn.functional as F

from parclip.objectives import clip_loss, embedding_distance, par_loss, threshold, triplet_loss


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_matches_open_clip():
    img, txt = unit(8, 16, 0), unit(8, 16, 1)
    ours = clip_loss(img, txt, 14.3)
    ref = open_clip.ClipLoss()(img, txt, torch.tensor(14.3))
    assert torch.allclose(ours, ref, atol=1e-6)


def test_clip_loss_is_small_for_aligned_pairs():
    img = unit(8, 16, 0)
    assert clip_loss(img, img, 100.0) < 0.01 < clip_loss(img, unit(8, 16, 1), 100.0)


def test_distance_is_mean_of_two_minus_two_cos():
    a, b = unit(32, 8, 0), unit(32, 8, 1)
    expected = (2 - 2 * (a * b).sum(-1)).mean()
    assert torch.allclose(embedding_distance(a, b), expected, atol=1e-6)
    assert embedding_distance(a, -a).item() == pytest.approx(4.0)
    assert embedding_distance(a, b, per_sample=True).shape == (32,)


@pytest.mark.parametrize("tau", [0.5, 2.15])
def test_threshold_boundary(tau):
    t32 = torch.tensor(tau, dtype=torch.float32)
    at = t32.clone()
    above = torch.nextafter(t32, torch.tensor(10.0))
    below = torch.nextafter(t32, torch.tensor(0.0))
    assert threshold(at, tau) == at  # D = τ is kept ('>' is strict)
    assert threshold(below, tau) == below
    assert threshold(above, tau) == 0


def test_zero_gradient_beyond_tau_and_push_below():
    img0, txt0 = unit(16, 8, 0), unit(16, 8, 1)
    # below τ: the perturbation term has a gradient that increases the distance
    img = (img0 + 0.3 * unit(16, 8, 2)).requires_grad_(True)
    out = par_loss(img, txt0, img0, txt0, 10.0, tau=2.15)
    assert out.dist_img < 2.15
    (g_pert,) = torch.autograd.grad(-out.perturb, img)
    assert g_pert.abs().sum() > 0
    stepped = (img - 0.01 * g_pert).detach()
    assert embedding_distance(stepped, img0) > embedding_distance(img.detach(), img0)
    # beyond τ: exactly zero gradient from the perturbation term, the total is the CLIP loss alone
    far = (-img0).clone().requires_grad_(True)  # distance 4 > τ
    out = par_loss(far, txt0, img0, txt0, 10.0, tau=2.15)
    assert out.perturb.item() == 0.0
    (g,) = torch.autograd.grad(out.perturb, far, allow_unused=True, materialize_grads=True)
    assert torch.count_nonzero(g) == 0
    assert torch.allclose(out.total, out.clip)


def test_par_equals_clip_at_start():
    img, txt = unit(8, 16, 0), unit(8, 16, 1)
    out = par_loss(img, txt, img, txt, 14.0)
    assert out.dist_img == 0 and out.dist_txt == 0
    assert torch.allclose(out.total, clip_loss(img, txt, 14.0))


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_par_loss_weight_scales_the_perturbation_term(weight):
    """Catches par_loss ignoring `weight`: L = L_CLIP − w·(D_img + D_txt) below τ, written out here."""
    img0, txt0, img, txt = unit(8, 16, 0), unit(8, 16, 1), unit(8, 16, 2), unit(8, 16, 3)
    d_img = ((img - img0) ** 2).sum(dim=1).mean()
    d_txt = ((txt - txt0) ** 2).sum(dim=1).mean()
    logits = 10.0 * img @ txt.t()
    labels = torch.arange(8)
    lc = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    out = par_loss(img, txt, img0, txt0, 10.0, tau=4.0, weight=weight)
    assert out.perturb.item() == pytest.approx(weight * (d_img + d_txt).item(), rel=1e-5, abs=1e-7)
    assert out.total.item() == pytest.approx((lc - weight * (d_img + d_txt)).item(), rel=1e-5)
    assert out.clip.item() == pytest.approx(lc.item(), rel=1e-5)


def test_per_sample_threshold_keeps_near_rows():
    img0 = unit(4, 8, 0)
    img = torch.cat([-img0[:2], img0[2:]])  # two rows at distance 4, two at 0
    near = F.normalize(img0[2:] + 0.5 * unit(2, 8, 5), dim=-1)
    img = torch.cat([-img0[:2], near])
    batch = par_loss(img, img0, img0, img0, 1.0, tau=1.0)
    sample = par_loss(img, img0, img0, img0, 1.0, tau=1.0, per_sample=True)
    assert batch.perturb == 0  # batch mean ≈ 2 + small > τ: whole term off
    d = embedding_distance(near, img0[2:], per_sample=True)
    assert sample.perturb.item() == pytest.approx(0.5 * d.sum().item() / 4, rel=1e-5)


def test_triplet_loss_by_hand():
    # row 0: ‖a−p‖ = 1, ‖a−n‖ = 5 → max(1 − 5 + 1, 0) = 0;  row 1: ‖a−p‖ = 5, ‖a−n‖ = 1 → 5 − 1 + 1 = 5
    anchor = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    positive = torch.tensor([[1.0, 0.0], [4.0, 5.0]])
    negative = torch.tensor([[3.0, 4.0], [1.0, 2.0]])
    assert triplet_loss(anchor, positive, negative, 1.0).item() == pytest.approx((0.0 + 5.0) / 2)
    assert triplet_loss(anchor, positive, negative, 5.0).item() == pytest.approx((1.0 + 9.0) / 2)
    # the positive broadcasts (one prototype for every anchor); only rows that violate the margin give gradient
    a = anchor.clone().requires_grad_(True)
    loss = triplet_loss(a, torch.tensor([1.0, 0.0]), negative, 1.0)    # row 1: ‖a−p‖ = 1 → 1 − 1 + 1 = 1
    assert loss.item() == pytest.approx((0.0 + 1.0) / 2)
    (g,) = torch.autograd.grad(loss, a)
    assert torch.isfinite(g).all() and torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[1]) > 0


def test_par_loss_text_term_has_its_own_threshold_and_weight():
    """Catches tau_txt / weight_txt being ignored or applied to the image term:
    L = L_CLIP − w_img·thr_τimg(D_img) − w_txt·thr_τtxt(D_txt), written out."""
    img0, txt0, img, txt = unit(8, 16, 0), unit(8, 16, 1), unit(8, 16, 2), unit(8, 16, 3)
    d_img = ((img - img0) ** 2).sum(dim=1).mean().item()
    d_txt = ((txt - txt0) ** 2).sum(dim=1).mean().item()
    below, above = d_txt + 0.1, d_txt - 0.1  # thresholds just above / below the text distance
    keep = par_loss(img, txt, img0, txt0, 10.0, tau=4.0, weight=0.5, tau_txt=below, weight_txt=2.0)
    assert keep.perturb.item() == pytest.approx(0.5 * d_img + 2.0 * d_txt, rel=1e-5)
    off = par_loss(img, txt, img0, txt0, 10.0, tau=4.0, weight=0.5, tau_txt=above)
    assert off.perturb.item() == pytest.approx(0.5 * d_img, rel=1e-5)  # text term beyond its τ, image term kept
    no_img = par_loss(img, txt, img0, txt0, 10.0, tau=4.0, weight=0.0, weight_txt=0.5)
    assert no_img.perturb.item() == pytest.approx(0.5 * d_txt, rel=1e-5)
