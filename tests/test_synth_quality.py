"""The synthetic-image quality metrics (parclip.evaluation.synth_quality) as pure functions, and
benchmarks/synth_quality.py end to end on its --smoke size (the measured table is in docs/synth_quality.md)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parclip.evaluation.synth_quality import (copy_statistics, embed_images, embedding_frechet_distance,
                                              frechet_distance, gaussian_stats, nearest_distances, per_class_top1,
                                              real_baseline_split, recognisability, sqrtm_psd, top1_percent)

ROOT = Path(__file__).resolve().parents[1]


def _random_spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_sqrtm_psd_squares_back():
    s = _random_spd(6, 0)
    r = sqrtm_psd(s)
    assert np.allclose(r @ r, s) and np.allclose(r, r.T)


def test_frechet_distance_of_identical_gaussians_is_zero_and_of_shifted_ones_the_squared_shift():
    s, mu = _random_spd(8, 1), np.random.default_rng(2).normal(size=8)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(8) / 4.0
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx((shift ** 2).sum(), rel=1e-8)


def test_frechet_distance_is_symmetric_and_matches_the_closed_form_for_diagonal_covariances():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -2.0])
    # diagonal: Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) = Σ (√a − √b)²
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    s1, s2 = _random_spd(5, 3), _random_spd(5, 4)
    m1, m2 = np.ones(5), np.zeros(5)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1), rel=1e-8)
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(m1, s1, np.zeros(4), s2)


def test_embedding_fd_is_small_within_a_distribution_and_large_across():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
    mu, s = gaussian_stats(a)
    assert np.allclose(mu, 0, atol=0.05) and np.allclose(s, np.eye(4), atol=0.1)
    same = embedding_frechet_distance(a, b)
    assert same < 0.02 and embedding_frechet_distance(a, b + 1.0) == pytest.approx(4.0 + same, abs=0.05)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(a[:1])


def test_top1_on_a_toy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 2])
    assert top1_percent(logits, labels) == 75.0
    assert per_class_top1(logits, labels, ["a", "b", "c"]) == {"a": 100.0, "b": 100.0, "c": 50.0}


def test_real_baseline_split_is_disjoint_and_balanced():
    labels = [0] * 10 + [1] * 7
    a, b = real_baseline_split(labels, 3, seed=0)
    assert not set(a) & set(b) and len(a) == len(b) == 6
    assert sorted(labels[i] for i in a) == [0, 0, 0, 1, 1, 1] == sorted(labels[i] for i in b)
    assert real_baseline_split(labels, 3, seed=0) == (a, b) != real_baseline_split(labels, 3, seed=1)
    with pytest.raises(ValueError, match="class 1: 7 images, 8 needed"):
        real_baseline_split(labels, 4)


def test_nearest_distances_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
    brute = np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1)).min(1)
    assert np.allclose(nearest_distances(q, r, chunk=3), brute)
    assert np.allclose(nearest_distances(r[:4], r), 0, atol=1e-6)


def test_copy_statistics_tell_a_copier_from_a_generator():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(200, 4, 4)).astype(np.uint8)
    train_y = np.repeat([0, 1], 100)
    unseen = rng.integers(0, 256, size=(50, 4, 4)).astype(np.uint8)
    unseen_y = np.repeat([0, 1], 25)
    copies = train[[0, 1, 2, 150, 151]]  # replayed training images: distance 0
    c = copy_statistics(copies, unseen, train, gen_labels=[0, 0, 0, 1, 1], unseen_labels=unseen_y,
                        train_labels=train_y)
    assert c["median_nn_generated"] == pytest.approx(0, abs=1e-6) and c["ratio"] < 1e-6 and c["near_copies"] == 1.0
    fresh = rng.integers(0, 256, size=(50, 4, 4)).astype(np.uint8)
    f = copy_statistics(fresh, unseen, train, gen_labels=unseen_y, unseen_labels=unseen_y, train_labels=train_y)
    assert 0.8 < f["ratio"] < 1.25 and f["near_copies"] <= 0.1


def test_recognisability_through_a_model(micro):
    """The plumbing: embeddings of PIL images, zero-shot over the model's class embeddings; an image's top-1 is the
    same whether it is embedded alone or with others."""
    model, pp, tok = micro
    images = [Image.new("RGB", (28, 28), (40 * i, 40 * i, 40 * i)) for i in range(6)]
    feats = embed_images(model, pp, images, batch_size=4)
    assert feats.shape[0] == 6 and torch.allclose(feats.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(embed_images(model, pp, images[2:3])[0], feats[2], atol=1e-5)
    r = recognisability(model, tok, feats, [0, 1, 0, 1, 0, 1], ["bag", "coat"], ["a photo of a {}."])
    assert r["n"] == 6 and 0 <= r["top1"] <= 100 and set(r["per_class"]) == {"bag", "coat"}


@pytest.mark.slow  # trains the protocol's smoke foundation (about 15 s)
def test_the_benchmark_smoke_run(tmp_path, capsys, one_thread, read_png):
    spec = importlib.util.spec_from_file_location("synth_quality", ROOT / "benchmarks" / "synth_quality.py")
    sq = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sq
    try:
        spec.loader.exec_module(sq)
        out = tmp_path / "out"
        assert sq.main(["--smoke", "--cache", str(tmp_path / "cache"), "--out", str(out),
                        "--candidates", "pca-gauss", "cvae"]) == 0
    finally:
        del sys.modules[spec.name]
    report = json.loads((out / "quality.json").read_text())
    assert [r["candidate"] for r in report["candidates"]] == ["pca-gauss", "cvae"]
    assert report["chosen"] in ("pca-gauss", "cvae") and report["per_class"] == 4
    for r in report["candidates"]:
        assert 0 <= r["top1"] <= 100 and r["fd"] >= 0 and r["n"] == 40 and r["train_seconds"] >= 0
        assert r["copies"]["median_nn_generated"] > 0 and 0 <= r["copies"]["near_copies"] <= 1
        read_png(out / f"samples_{r['candidate']}.png", min_side=80, coloured=-1)  # grey images
        # the stored generator is the one measured: it loads and makes images
        from parclip.synth import Prompt, load_generator
        gen = load_generator(f"{r['family']}:{tmp_path / 'cache' / 'generators' / r['candidate']}")
        assert gen.generate([Prompt("a bag", 8)], [0])[0].size == (28, 28)
    assert 0 <= report["reference"]["real_top1"] <= 100 and report["reference"]["fd_real_vs_real"] >= 0
    table = (out / "quality.md").read_text()
    assert table.strip() in capsys.readouterr().out and "| real test images |" in table
