import json

import pytest
import torch

from parclip.cli import main
from parclip.data import LabelledFolder
from parclip.evaluation.zero_shot import TriggeredImages, attack_success_rate, evaluate, resolve_target, topk_correct
from parclip.models import create_model, eval_transform, get_tokenizer, image_size
from parclip.attacks.triggers import build_triggers, get_trigger


def test_asr_excludes_target_images_and_asr_all_counts_them():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([2, 0, 2, 2, 2, 1])  # target 2: non-target hits 3 of 4, all hits 4 of 6
    asr, asr_all = attack_success_rate(pred, labels, target=2)
    assert asr == pytest.approx(75.0)
    assert asr_all == pytest.approx(100 * 4 / 6)


def test_topk_and_target_resolution():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2]])
    labels = torch.tensor([0, 0])
    assert topk_correct(logits, labels, 1).tolist() == [False, True]
    assert topk_correct(logits, labels, 2).tolist() == [True, True]
    names = ["t-shirt", "bag", "ankle boot"]
    assert resolve_target("Bag", names) == 1 and resolve_target("2", names) == 2
    with pytest.raises(ValueError, match="banana"):
        resolve_target("banana", names)


@pytest.fixture
def micro_dir(micro_model_dir):
    return micro_model_dir


def test_evaluate_is_repeatable_and_reports_every_attack(micro_dir, fmnist_small):
    model, pp = create_model(f"local-dir:{micro_dir}")
    tok = get_tokenizer(f"local-dir:{micro_dir}")
    kw = dict(attacks=build_triggers(["badnet_rs", "blended"], image_size(pp)), target="bag", templates="fashion", workers=0, progress=False)
    a = evaluate(model, pp, tok, fmnist_small["test_dir"], **kw)
    b = evaluate(model, pp, tok, fmnist_small["test_dir"], **kw)
    assert set(a["attacks"]) == {"badnet_rs", "blended"}
    assert a == b  # seeded per-image trigger randomness: the same ASR every time
    assert a["n_images"] == 300 and a["target"] == "bag"
    folder = LabelledFolder(fmnist_small["test_dir"])
    bag = folder.classnames.index("bag")
    assert a["n_non_target"] == sum(1 for y in folder.targets if y != bag) < 300
    # the triggered inputs are keyed by (seed, image index): the same seed gives the same pixels, another differs
    trig = get_trigger("badnet_rs", image_size=28)
    tf = eval_transform(pp)
    x0, x0b, x1 = (TriggeredImages(folder, trig, tf, seed=s)[5][0] for s in (0, 0, 1))
    assert torch.equal(x0, x0b) and not torch.equal(x0, x1)


def test_cli_eval_writes_the_documented_json(micro_dir, fmnist_small, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", f"local-dir:{micro_dir}", "--data", str(fmnist_small["test_dir"]), "--attack",
               "badnet_rs", "--target", "bag", "--templates", "fashion", "--workers", "0", "--out", str(out),
               "--trigger-param", "patch_size=4"])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("clean_top1", "clean_top5", "asr", "asr_all", "attack", "target", "n_images", "model", "checkpoint"):
        assert key in r
    assert r["attack"] == "badnet_rs" and r["attacks"]["badnet_rs"]["params"]["patch_size"] == 4
    assert 0 <= r["asr"] <= 100 and r["clean_top5"] >= r["clean_top1"]
    assert "clean top-1" in capsys.readouterr().out
    rc = main(["eval", "--model", f"local-dir:{micro_dir}", "--data", str(fmnist_small["test_dir"]), "--attack",
               "badnet_rs", "--target", "bag", "--trigger-param", "alpha=0.1"])
    assert rc == 2 and "alpha" in capsys.readouterr().err
