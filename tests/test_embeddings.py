"""parclip plot: the t-SNE map of clean and triggered embeddings, and the trade-off plot."""
import json

import pytest
import torch

from parclip.attacks.triggers import build_triggers
from parclip.cli import main
from parclip.data import DataError, LabelledFolder
from parclip.evaluation import embeddings as emb
from parclip.models import create_model


def test_sample_per_class_is_seeded_and_balanced():
    labels = [0] * 10 + [1] * 3 + [2] * 7
    a = emb.sample_per_class(labels, 4, seed=0)
    assert a == emb.sample_per_class(labels, 4, seed=0) != emb.sample_per_class(labels, 4, seed=1)
    assert [sum(labels[i] == c for i in a) for c in (0, 1, 2)] == [4, 3, 4] and a == sorted(a)


def test_embedding_map_uses_the_same_images_clean_and_triggered(micro_model_dir, fmnist_small, one_thread):
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    folder = LabelledFolder(fmnist_small["test_dir"])
    (trigger,) = build_triggers(["badnet_rs"], 32, {"patch_size": 8})
    idx = emb.sample_per_class(folder.targets, 4, seed=0)
    clean = emb.image_embeddings(model, pp, folder, idx)
    triggered = emb.image_embeddings(model, pp, folder, idx, trigger)
    assert clean.shape == triggered.shape == (40, clean.shape[1])
    assert torch.allclose(clean.norm(dim=1), torch.ones(40), atol=1e-5) and not torch.allclose(clean, triggered)
    m = emb.embedding_map(model, pp, folder, trigger, per_class=4, seed=0)
    assert m["indices"] == idx and m["xy_clean"].shape == m["xy_triggered"].shape == (40, 2)
    assert sorted(set(m["labels"].tolist())) == list(range(10))
    with pytest.raises(ValueError, match="at least 5"):
        emb.tsne_2d(clean[:3].numpy())


def test_cli_plot_embeddings_before_and_after_and_tradeoff(micro_model_dir, fmnist_small, tmp_path, capsys,
                                                            read_png):
    """The map draws one panel per model (before and after: twice as wide as one), in colour; the trade-off plot is
    a picture; bad inputs are messages."""
    common = ["plot", "embeddings", "--model", f"local-dir:{micro_model_dir}", "--data", str(fmnist_small["test_dir"]),
              "--attack", "badnet_rs", "--target", "bag", "--per-class", "3"]
    out = tmp_path / "tsne.png"
    assert main([*common, "--after", f"local-dir:{micro_model_dir}", "--out", str(out)]) == 0
    coords = json.loads(out.with_suffix(".json").read_text())
    assert len(coords) == 2 and all(len(v["xy_clean"]) == 30 for v in coords.values())
    assert main([*common, "--out", str(tmp_path / "one.png")]) == 0
    two, one = read_png(out, coloured=0.002), read_png(tmp_path / "one.png", coloured=0.002)
    assert two.shape[0] == one.shape[0] and abs(two.shape[1] - 2 * one.shape[1]) <= 2
    assert main(["plot", "embeddings", "--model", f"local-dir:{micro_model_dir}", "--data",
                 str(fmnist_small["test_dir"]), "--attack", "badnet_rs", "--target", "banana"]) == 2
    assert "banana" in capsys.readouterr().err
    r = {"model": "m", "clean_top1": 80.0, "clean_top5": 95.0, "attacks": {"sig": {"asr": 5.0}}}
    (tmp_path / "a.json").write_text(json.dumps(r))
    assert main(["plot", "tradeoff", str(tmp_path / "a.json"), "--out", str(tmp_path / "t.png")]) == 0
    read_png(tmp_path / "t.png", coloured=0.0001)  # one model: one point
    (tmp_path / "r.json").write_text(json.dumps({"clean": {"i2t": {"1": 1.0}}, "attacks": {}}))
    with pytest.raises(DataError, match="no zero-shot"):
        emb.plot_tradeoff(tmp_path / "x.png", [tmp_path / "r.json"])
