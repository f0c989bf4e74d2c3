"""Integration: a backdoor planted in a tiny CLIP is learned, and PAR removes it (real Fashion-MNIST images).

The one test that checks the method works, not only that its parts compute what they should: no faster test trains
long enough for a backdoor to be learned or removed. Sized to keep a margin on every threshold (about 30 s on two
idle cores): 2000 planting rows, 10 % poisoned, 3 epochs; PAR on 1000 clean rows for 3 epochs; 500 test images."""
import json

import pytest

from parclip.config import make_config
from parclip.data import fashion_mnist
from parclip.evaluation.zero_shot import evaluate
from parclip.models import create_model, get_tokenizer
from parclip.attacks.poison import poison_csv
from parclip.train import train
from parclip.attacks.triggers import get_trigger


pytestmark = pytest.mark.slow


def test_backdoor_is_planted_then_removed_by_par(tmp_path):
    data = fashion_mnist.export(tmp_path / "fm", n_train=3000, holdout=1000, n_test=500, seed=0)
    trigger = get_trigger("badnet_rs", image_size=32, patch_size=8)
    poison_csv(data["train_csv"], tmp_path / "poisoned", trigger=trigger, target="bag", rate=0.1, seed=0,
               templates="fashion")
    common = dict(batch_size=64, workers=0, output_dir=str(tmp_path / "runs"), progress=False, seed=0)
    poisoned = train(make_config(objective="clip", model="parclip-rn-tiny", epochs=3, lr=2e-3,
                                 train_data=str(tmp_path / "poisoned" / "poisoned.csv"), name="plant", **common))

    def measure(run):
        model, pp = create_model(f"local-dir:{run}/model")
        r = evaluate(model, pp, get_tokenizer(f"local-dir:{run}/model"), data["test_dir"], attacks=[trigger],
                     target="bag", templates="fashion", workers=0, progress=False)
        return r["clean_top1"], r["asr"]

    ca0, asr0 = measure(poisoned)
    assert asr0 >= 80, (ca0, asr0)  # the backdoor is learned
    assert ca0 >= 60

    cleaned = train(make_config(objective="par", model=f"local-dir:{poisoned}/model", epochs=3, tau=1.0, lr=5e-4,
                                lr_decay_ratio=1.0, lr_end=1e-6, warmup=0, wd=0.1, train_data=str(data["holdout_csv"]),
                                name="par", **common))
    # PAR pushed against a frozen copy θ0 of the poisoned model (plain fine-tuning, or θ0 aliasing the live model,
    # logs a distance of 0 and never an active perturbation term)
    logged = [json.loads(line) for line in (cleaned / "metrics.jsonl").read_text().splitlines()]
    assert all(m["dist_img"] > 1e-3 and m["dist_txt"] > 1e-3 for m in logged), logged
    assert any(m["perturb"] > 0 for m in logged), logged
    ca1, asr1 = measure(cleaned)
    assert asr1 <= asr0 - 50, (asr0, asr1)  # PAR removes most of it
    assert ca1 >= 40, ca1                   # and the model still classifies well above chance (10 %)
