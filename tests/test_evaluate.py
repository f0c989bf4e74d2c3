import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from parclip.cli import main
from parclip.data import LabelledFolder, get_templates
from parclip.evaluation.zero_shot import TriggeredImages, attack_success_rate, evaluate, resolve_target, topk_correct
from parclip.models import create_model, eval_transform, get_tokenizer, image_size
from parclip.attacks.triggers import Trigger, build_triggers, get_trigger


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


def test_evaluate_is_repeatable_and_reports_every_attack(micro_model_dir, fmnist_small):
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    tok = get_tokenizer(f"local-dir:{micro_model_dir}")
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


def test_triggered_images_one_view_for_folders_and_retrieval_sets(tmp_path):
    """One TriggeredImages serves labelled folders (item: (x, label)) and retrieval sets (item: x); the default
    triggers the squash-resized raw image (the reference), after_crop triggers after resize + centre crop. On a
    wide image the two differ, and each equals its hand-made construction."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from parclip.attacks.triggers import trigger_generator
    from parclip.data.retrieval import RetrievalSet

    rng = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(torch.randint(0, 256, (20, 44, 3), generator=rng, dtype=torch.uint8).numpy()).save(
            tmp_path / c / "wide.png")
    folder = LabelledFolder(tmp_path)
    rset = RetrievalSet(images=[p for p, _ in folder.samples], captions=["x", "y"], owner=[0, 1])
    trig = get_trigger("badnet_rs", image_size=16)
    tf = T.Compose([T.Resize(16, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(16), T.ToTensor()])
    raw = Image.open(folder.samples[1][0]).convert("RGB")
    squash = tf(trig(raw.resize((16, 16), Image.BICUBIC), generator=trigger_generator(3, 1)))
    cropped = tf(trig(T.CenterCrop(16)(T.Resize(16, interpolation=InterpolationMode.BICUBIC)(raw)),
                      generator=trigger_generator(3, 1)))
    assert (squash - cropped).abs().max() > 0.1
    x, y = TriggeredImages(folder, trig, tf, seed=3)[1]
    assert y == 1 and torch.allclose(x, squash, atol=1 / 255)
    assert torch.allclose(TriggeredImages(rset, trig, tf, seed=3)[1], squash, atol=1 / 255)
    assert torch.allclose(TriggeredImages(rset, trig, tf, seed=3, after_crop=True)[1], cropped, atol=1 / 255)
    assert torch.equal(TriggeredImages(rset, None, tf)[1], tf(raw))


def test_cli_eval_writes_the_documented_json(micro_model_dir, fmnist_small, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", f"local-dir:{micro_model_dir}", "--data", str(fmnist_small["test_dir"]), "--attack",
               "badnet_rs", "--target", "bag", "--templates", "fashion", "--workers", "0", "--out", str(out),
               "--trigger-param", "patch_size=4"])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("clean_top1", "clean_top5", "asr", "asr_all", "attack", "target", "n_images", "model", "checkpoint"):
        assert key in r
    import hashlib
    assert r["checkpoint_sha256"] == hashlib.sha256((micro_model_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert r["template_set"] == "fashion" and r["data"] == str(fmnist_small["test_dir"])
    assert 0 <= r["attacks"]["badnet_rs"]["robust_acc"] <= 100 and len(r["per_class_recall"]) == 10
    assert r["attack"] == "badnet_rs" and r["attacks"]["badnet_rs"]["params"]["patch_size"] == 4
    assert 0 <= r["asr"] <= 100 and r["clean_top5"] >= r["clean_top1"]
    assert "clean top-1" in capsys.readouterr().out
    rc = main(["eval", "--model", f"local-dir:{micro_model_dir}", "--data", str(fmnist_small["test_dir"]), "--attack",
               "badnet_rs", "--target", "bag", "--trigger-param", "alpha=0.1"])
    assert rc == 2 and "alpha" in capsys.readouterr().err


class _ScoreTableModel(torch.nn.Module):
    """A fake CLIP whose zero-shot scores are a given table: image j (recognized by its gray level) embeds as
    scores[j], class c's prompt embeds as the one-hot e_c, so cos(image j, class c) ∝ scores[j, c]."""

    def __init__(self, scores: torch.Tensor, step: int):
        super().__init__()
        self.scores, self.step = scores, step

    def encode_image(self, x, normalize=False):
        idx = (x[:, 0].mean(dim=(1, 2)) * 255 / self.step).round().long() - 1
        f = self.scores[idx]
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=False):
        return F.one_hot(tokens, self.scores.shape[1]).float()


def test_clean_top1_and_top5_on_a_hand_built_score_table(tmp_path):
    """Catches wrong clean accuracy, e.g. clean_top5 computed as top-1: 6 images whose true class is ranked
    0, 4, 5, 1, 6, 0 among 7 classes give top-1 2/6 and top-5 4/6."""
    n_classes, step = 7, 20
    ranks = [0, 4, 5, 1, 6, 0]  # the true class's place in each image's descending scores
    scores = torch.zeros(len(ranks), n_classes)
    for j, r in enumerate(ranks):
        order = [c for c in range(n_classes) if c != j]
        order.insert(r, j)  # image j belongs to class j
        for place, c in enumerate(order):
            scores[j, c] = n_classes - place
        folder = tmp_path / f"class_{j}"
        folder.mkdir()
        Image.new("L", (8, 8), step * (j + 1)).save(folder / f"{j}.png")
    (tmp_path / f"class_{n_classes - 1}").mkdir()  # a class without images
    pp = {"size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

    def tokenizer(texts):  # "class 3" -> 3
        return torch.tensor([int(t.split()[-1]) for t in texts])

    r = evaluate(_ScoreTableModel(scores, step), pp, tokenizer, tmp_path, templates=["{}"], workers=0,
                 progress=False)
    assert r["n_images"] == 6 and len(r["classnames"]) == n_classes
    assert r["clean_top1"] == pytest.approx(100 * 2 / 6)
    assert r["clean_top5"] == pytest.approx(100 * 4 / 6)
    # per-class recall: images 0 and 5 (rank 0) are right, the others wrong; class_6 has no image and no entry
    assert r["per_class_recall"] == {f"class {j}": (100.0 if j in (0, 5) else 0.0) for j in range(6)}
    assert r["template_set"] == "custom" and r["data"] == str(tmp_path) and r["parclip_version"]


class _Brighten(Trigger):
    """A test trigger: every pixel 120 gray levels brighter (exactly, in uint8), so a uniform image of level L becomes
    one of level L + 120, which _ScoreTableModel recognizes as another row of its table."""

    name, kind = "brighten", "blend"

    def apply_float(self, x, generator):
        return x + 120.5 / 255  # trunc(255·x + 120.5) = L + 120


def _level_folder(root, folders, step):
    """One uniform 8×8 image per class folder, image j at gray level step·(j + 1), so the fake model knows it."""
    for j, name in enumerate(folders):
        (root / name).mkdir()
        Image.new("L", (8, 8), step * (j + 1)).save(root / name / f"{j}.png")
    return root


def test_the_top_level_asr_fields_are_the_single_attacks_entry(tmp_path):
    """Catches the top-level asr and asr_all swapped or taken from another number: 6 images of 6 classes, target 2;
    the triggered images are predicted 2, 2, 0, 3, 2, 5, so asr = 3/5 (target image excluded), asr_all = 3/6 and
    R-Acc = 2/5 (images 3 and 5 keep their label), three different numbers."""
    step, n = 15, 6
    root = _level_folder(tmp_path, [f"class_{j}" for j in range(n)], step)
    scores = torch.zeros(16, n)  # rows 0-5: the clean images; rows 8-13: the same images brightened by 120 = 8 steps
    scores[torch.arange(n), torch.arange(n)] = 1.0  # clean: every image right
    for j, pred in enumerate([2, 2, 0, 3, 2, 5]):
        scores[8 + j, pred] = 1.0
    pp = {"size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    r = evaluate(_ScoreTableModel(scores, step), pp, lambda texts: torch.tensor([int(t.split()[-1]) for t in texts]),
                 root, attacks=[_Brighten(8)], target="class 2", templates=["{}"], workers=0, progress=False)
    entry = r["attacks"]["brighten"]
    assert (entry["asr"], entry["asr_all"], entry["robust_acc"]) == pytest.approx((100 * 3 / 5, 100 * 3 / 6,
                                                                                   100 * 2 / 5))
    assert (r["attack"], r["asr"], r["asr_all"]) == ("brighten", entry["asr"], entry["asr_all"])
    assert (r["clean_top1"], r["target"], r["target_index"], r["n_non_target"]) == (100.0, "class 2", 2, 5)


# the first ImageNet-1k classes: sorted wnids whose names (tench, goldfish, great white shark, …) are not sorted
_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]


@pytest.mark.parametrize("names_from", ["wnid folders", "a class-name file", "a list"])
def test_the_classifier_follows_the_label_order_of_unsorted_class_names(tmp_path, names_from):
    """Catches a zero-shot classifier (or the per-class recall, or the target) built from the class names in another
    order than the labels (sorted, say): invisible on folders whose names sort like their labels. The fake model
    embeds image j as e_j (but image 4 as e_0) and a prompt as e_k, k the label of the class it names, so only the
    right order gets 4 of 5 right and names the class it misses."""
    import open_clip

    step = 20
    names = [open_clip.IMAGENET_CLASSNAMES[i] for i in range(len(_WNIDS))]
    assert names != sorted(names)
    folders = _WNIDS if names_from == "wnid folders" else [f"c{j}" for j in range(len(names))]
    (tmp_path / "data").mkdir()
    root = _level_folder(tmp_path / "data", folders, step)
    classnames = {"wnid folders": None, "a list": names}.get(names_from, tmp_path / "names.txt")
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    label = {name: k for k, name in enumerate(names)}
    scores = torch.eye(len(names))
    scores[4] = scores[0]  # the one mistake: the image of class 4 looks like class 0
    pp = {"size": 8, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    r = evaluate(_ScoreTableModel(scores, step), pp, lambda texts: torch.tensor([label[t] for t in texts]), root,
                 templates=["{}"], classnames=classnames, target=names[3], workers=0, progress=False)
    assert r["classnames"] == names
    assert r["clean_top1"] == pytest.approx(80.0)
    assert r["per_class_recall"] == pytest.approx({name: 0.0 if k == 4 else 100.0 for k, name in enumerate(names)})
    assert (r["target"], r["target_index"]) == (names[3], 3)


def test_robust_accuracy_by_hand():
    """R-Acc: of the 4 non-target images (target 2), 2 keep their label under the trigger; target images never count."""
    from parclip.evaluation.zero_shot import robust_accuracy
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    pred = torch.tensor([0, 2, 2, 3, 2, 0])
    assert robust_accuracy(pred, labels, 2) == 50.0
    assert robust_accuracy(torch.tensor([1, 1]), torch.tensor([2, 2]), 2) != robust_accuracy(  # NaN: nothing to count
        torch.tensor([1, 1]), torch.tensor([2, 2]), 2)


def test_clean_accuracy_matches_an_independent_zero_shot_computation(micro_model_dir, fmnist_small):
    """Catches clean_top1/clean_top5 drifting from zero-shot classification as defined: recomputed here with plain
    torch (eval transform, class embedding = normalized mean of normalized template embeddings, rank of the true
    class)."""
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    tok = get_tokenizer(f"local-dir:{micro_model_dir}")
    r = evaluate(model, pp, tok, fmnist_small["test_dir"], templates="fashion", workers=0, progress=False)

    root = Path(fmnist_small["test_dir"])
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    tf = eval_transform(pp)
    images, labels = [], []
    for y, name in enumerate(folders):
        for f in sorted((root / name).glob("*.png")):
            images.append(tf(Image.open(f).convert("RGB")))
            labels.append(y)
    labels = torch.tensor(labels)
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack(images)), dim=-1)
        classes = []
        for name in folders:
            prompts = [t.format(name.replace("_", " ")) for t in get_templates("fashion")]
            emb = F.normalize(model.encode_text(tok(prompts)), dim=-1).mean(dim=0)
            classes.append(F.normalize(emb, dim=0))
        sims = img @ torch.stack(classes).t()
    true = sims[torch.arange(len(labels)), labels]
    rank = (sims > true[:, None]).sum(dim=1)  # classes scored above the true one
    top1, top5 = 100 * (rank == 0).float().mean().item(), 100 * (rank < 5).float().mean().item()
    assert top5 > top1  # the two metrics differ on this model, so a mix-up shows
    assert r["n_images"] == len(labels) == 300
    assert r["clean_top1"] == pytest.approx(top1, abs=1e-6)
    assert r["clean_top5"] == pytest.approx(top5, abs=1e-6)


def test_an_unknown_target_fails_before_any_image_is_encoded(micro_model_dir, fmnist_small, monkeypatch):
    """Catches the target being looked up only after the whole clean pass (minutes on ImageNet)."""
    from parclip.attacks.triggers import build_triggers
    from parclip.evaluation import zero_shot
    from parclip.models import create_model, get_tokenizer
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    monkeypatch.setattr(zero_shot, "_predict", lambda *a, **k: pytest.fail("encoded images before the target check"))
    with pytest.raises(ValueError, match="banana.*not a class"):
        zero_shot.evaluate(model, pp, get_tokenizer(f"local-dir:{micro_model_dir}"), fmnist_small["test_dir"],
                           attacks=build_triggers(["badnet_rs"], 32), target="banana", workers=0, progress=False)


def test_a_corrupt_image_is_counted_named_and_left_out(micro_model_dir, tmp_path, capsys):
    """One undecodable file among 40: above the limit a message naming it (no traceback), below it left out of every
    number (clean and triggered) and counted."""
    for c in ("bag", "shirt"):
        (tmp_path / c).mkdir()
        for i in range(20):
            Image.new("RGB", (32, 32), (10 * i, 100 if c == "bag" else 200, 0)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "shirt" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    tok = get_tokenizer(f"local-dir:{micro_model_dir}")
    from parclip.attacks.triggers import build_triggers
    r = evaluate(model, pp, tok, tmp_path, attacks=build_triggers(["badnet_rs"], image_size(pp)), target="bag",
                 templates=["a photo of a {}."], workers=0, progress=False, max_bad_fraction=0.05)
    assert (r["n_images"], r["n_bad_images"], r["n_non_target"]) == (39, 1, 19)
    rc = main(["eval", "--model", f"local-dir:{micro_model_dir}", "--data", str(tmp_path), "--workers", "0",
               "--templates", "simple"])
    err = capsys.readouterr().err
    assert rc == 2 and "7.png" in err and "max-bad-fraction" in err and "Traceback" not in err
