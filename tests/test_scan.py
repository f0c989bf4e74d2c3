"""`parclip scan` on the micro model: a planted backdoor it must find, clean models it must not flag, each part
alone, the pure functions, bad input. The models are trained here in seconds on a toy task (four colour classes),
a clean one, the same fine-tuned further on clean images, and one with a BadNet-Stripes backdoor toward 'blue'."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from parclip.attacks.triggers import get_trigger, trigger_generator, uint8_to_pil
from parclip.data import DataError
from parclip.models import create_model, get_tokenizer, normalize, save_model
from parclip.scan import MIN_IMAGES, ScanConfig, ScanError, decide, scan, write_scan
from parclip.scan.controls import DonorBlend, DonorPatch, matched_alpha, mean_abs_change
from parclip.scan.invert import anomaly_index, cluster_tightness, kmeans
from parclip.scan.run import compare_reference
from parclip.scan.sweep import flip_rates, lift, variants

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 210), "yellow": (210, 200, 50)}
NAMES = list(COLOURS)
TARGET = NAMES.index("blue")
SMALL = dict(n_images=160, n_invert=64, encoder_steps=80, class_steps=30, batch_size=32, clusters=4,
             triggers=["badnet_rs", "blended"])


def toy_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n uint8 images [n, 3, 28, 28]: class i % 4's colour, a random brightness and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    base = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[labels][:, :, None, None]
    x = base * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)) + 25 * torch.randn(n, 3, 28, 28, generator=g)
    return x.clamp(0, 255).to(torch.uint8), labels


class Toy:
    """A scan source in memory: ``len``, ``load_image``, ``describe``."""

    def __init__(self, n: int = 200, seed: int = 99):
        self.x, self.targets = toy_images(n, seed)
        self.root = "toy"

    def __len__(self):
        return len(self.x)

    def load_image(self, i):
        return uint8_to_pil(self.x[i])

    def describe(self, i):
        return f"toy/{i}"


def train_micro(seed: int, poison: float = 0.0, steps: int = 50, start=None):
    """A parclip-micro that tells the colours apart; `poison` of each batch carries a 7-px BadNet-Stripes patch and
    the caption of 'blue'. `start`: (model, pp) to fine-tune (a copy) instead of a new model."""
    torch.manual_seed(seed)
    model, pp = create_model("parclip-micro") if start is None else (copy.deepcopy(start[0]).train(), start[1])
    caps = get_tokenizer("parclip-micro")([f"a photo of a {c} thing." for c in NAMES])
    trig = get_trigger("badnet_rs", 28, patch_size=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    X, Y = toy_images(2000, seed)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(X), (64,), generator=g)
        x, y = X[idx].clone(), Y[idx].clone()
        for i in range(int(poison * len(x))):
            x[i], y[i] = trig.apply(x[i], trigger_generator(seed, step * 64 + i)), TARGET
        img = model.encode_image(normalize(x.float() / 255, pp), normalize=True)
        logits = model.logit_scale.exp() * img @ model.encode_text(caps, normalize=True).T
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), pp


@pytest.fixture(scope="module")
def models():
    clean = train_micro(0)
    # clean2: the clean model fine-tuned on other clean images (what a defender's clean fine-tune looks like)
    return {"clean": clean, "clean2": train_micro(1, steps=15, start=clean), "planted": train_micro(0, poison=0.3)}


@pytest.fixture(scope="module")
def scans(models):
    tok = get_tokenizer("parclip-micro")
    out = {}
    for name, (model, pp) in models.items():
        out[name] = scan(model, pp, tok, Toy(), classnames=NAMES, templates=["a photo of a {} thing."],
                         config=ScanConfig(**SMALL), workers=0, progress=False)
    return out


def test_the_toy_models_are_what_the_tests_assume(models):
    """Guard: both clean models classify the colours, the planted one too, and its trigger works."""
    tok = get_tokenizer("parclip-micro")
    x, y = toy_images(200, 5)
    trig = get_trigger("badnet_rs", 28, patch_size=7)
    xt = torch.stack([trig.apply(v, trigger_generator(0, i)) for i, v in enumerate(x)])
    for name, (model, pp) in models.items():
        with torch.no_grad():
            W = model.encode_text(tok([f"a photo of a {c} thing." for c in NAMES]), normalize=True).T
            acc = ((model.encode_image(normalize(x / 255, pp), normalize=True) @ W).argmax(1) == y).float().mean()
            hit = ((model.encode_image(normalize(xt / 255, pp), normalize=True) @ W).argmax(1)[y != TARGET]
                   == TARGET).float().mean()
        assert acc > 0.95, name
        assert (hit > 0.9) if name == "planted" else (hit < 0.2), (name, hit)


def test_the_sweep_finds_the_planted_trigger_and_its_target(scans):
    planted = max(scans["planted"][0]["sweep"], key=lambda r: r["lift"])
    assert planted["trigger"] == "badnet_rs" and planted["target"] == "blue" and planted["lift"] > 40
    for name in ("clean", "clean2"):
        assert max(r["lift"] for r in scans[name][0]["sweep"]) < 30, name


def test_the_classifier_inversion_finds_a_small_trigger_only_for_the_target(scans):
    rows = {r["class"]: r for r in scans["planted"][0]["classifier"]["per_class"]}
    smallest = min(rows.values(), key=lambda r: r["area"])
    assert smallest["class"] == "blue" and smallest["found"]
    clean_blue = {r["class"]: r for r in scans["clean"][0]["classifier"]["per_class"]}["blue"]
    assert rows["blue"]["area"] < 0.5 * clean_blue["area"]


def test_the_encoder_inversion_needs_a_smaller_mask_on_the_planted_model(scans):
    planted = scans["planted"][0]["encoder"]
    assert planted["found"] and planted["top_class"] == "blue"
    for name in ("clean", "clean2"):  # a clean model needs a far larger mask, if any within the steps
        assert planted["area"] < 0.3 * scans[name][0]["encoder"]["area"], name


def test_the_verdict_flags_the_planted_model_and_not_the_clean_ones(scans, models):
    # alone, with the thresholds calibrated on the benchmark's model, neither clean model is flagged
    for name in ("clean", "clean2"):
        assert not scans[name][0]["verdict"]["backdoored"], (name, scans[name][0]["verdict"]["evidence"])
    # those absolute thresholds belong to another architecture: the micro planted model's lift (~50 points) is below
    # them, and a caller's own threshold flags it toward the right class
    planted = scans["planted"][0]
    own = decide(planted["sweep"], planted["encoder"], planted["classifier"], thresholds={"sweep_lift": 40.0})
    assert own["backdoored"] and own["target"] == "blue" and own["evidence"][0]["fired"]
    # against a scan of the clean model (what docs/scan.md recommends for another architecture): flagged toward blue
    reference = scans["clean"][0]
    model, pp = models["planted"]  # the whole scan with a reference, once
    result, _ = scan(model, pp, get_tokenizer("parclip-micro"), Toy(), classnames=NAMES,
                     templates=["a photo of a {} thing."], config=ScanConfig(**SMALL), workers=0, progress=False,
                     reference=reference)
    assert result["verdict"]["backdoored"] and result["verdict"]["target"] == "blue", result["verdict"]["evidence"]
    assert all("excess" in r for r in result["sweep"])
    clean2 = copy.deepcopy(scans["clean2"][0])  # the same comparison on the stored result of the clean fine-tune
    compare_reference(reference, clean2["sweep"], clean2["encoder"], clean2["classifier"], NAMES)
    evidence = {e["test"]: e for e in decide(clean2["sweep"], clean2["encoder"], clean2["classifier"])["evidence"]}
    assert not evidence["sweep"]["fired"] and not evidence["classifier inversion"]["fired"], evidence
    # the encoder-level ratio threshold (0.895) was calibrated where cleaning only grew the mask; on this 4-class toy a
    # clean fine-tune's mask shrinks to ~0.7 of the reference's, so it fires: the planted model's is ~10x further down
    assert result["encoder"]["reference_ratio"] < 0.3 * clean2["encoder"]["reference_ratio"]
    blue = {r["class"]: r for r in result["classifier"]["per_class"]}["blue"]["reference_ratio"]
    assert blue < 0.5 * min(r["reference_ratio"] for r in clean2["classifier"]["per_class"])


def test_a_scan_repeats_exactly(models):
    model, pp = models["planted"]
    cfg = ScanConfig(**{**SMALL, "encoder_steps": 15, "class_steps": 5, "parts": ("encoder", "classifier")})
    runs = [scan(model, pp, get_tokenizer("parclip-micro"), Toy(), classnames=NAMES,
                 templates=["a photo of a {} thing."], config=cfg, workers=0, progress=False)[0] for _ in range(2)]
    assert runs[0]["encoder"] == runs[1]["encoder"] and runs[0]["classifier"] == runs[1]["classifier"]


def test_with_more_classes_than_max_classes_the_likeliest_are_inverted(models):
    model, pp = models["planted"]
    cfg = ScanConfig(**{**SMALL, "encoder_steps": 10, "class_steps": 5, "max_classes": 2})
    result, _ = scan(model, pp, get_tokenizer("parclip-micro"), Toy(), classnames=NAMES,
                     templates=["a photo of a {} thing."], config=cfg, workers=0, progress=False)
    inverted = [r["class"] for r in result["classifier"]["per_class"]]
    assert len(inverted) == 2 and "blue" in inverted  # the sweep's target (and the encoder trigger's) comes first


def test_output_files(scans, tmp_path):
    result, artefacts = scans["planted"]
    write_scan(tmp_path, result, artefacts, model="planted")
    assert json.loads((tmp_path / "scan.json").read_text())["sweep"] == json.loads(json.dumps(result["sweep"]))
    text = (tmp_path / "scan.md").read_text()
    assert "no backdoor found" in text and "| badnet_rs 7px | blue |" in text  # the verdict alone, the sweep's top row
    png = Image.open(tmp_path / "triggers" / "class_blue.png")
    assert png.width > png.height > 96  # two rows of enlarged tiles
    assert {p.name for p in (tmp_path / "triggers").iterdir()} >= {"encoder.png", "class_red.png"}


# ---------------------------------------------------------------------------------------------------- bad input
def test_too_few_images_names_the_minimum(models):
    model, pp = models["clean"]
    with pytest.raises(DataError, match=f"at least {MIN_IMAGES}"):
        scan(model, pp, get_tokenizer("parclip-micro"), Toy(n=MIN_IMAGES - 1), classnames=NAMES,
             config=ScanConfig(**SMALL), workers=0, progress=False)


def test_a_single_class_runs_the_encoder_test_and_says_what_was_skipped(models):
    model, pp = models["planted"]
    result, _ = scan(model, pp, get_tokenizer("parclip-micro"), Toy(), classnames=["blue"],
                     config=ScanConfig(**{**SMALL, "encoder_steps": 20}), workers=0, progress=False)
    assert result["encoder"]["area"] > 0 and result["classifier"] is None and result["sweep"] == []
    assert set(result["skipped"]) == {"sweep", "classifier"}
    why = {e["test"]: e for e in result["verdict"]["evidence"]}
    assert not why["classifier inversion"]["ran"] and "skipped" in why["classifier inversion"]["why"]


def test_non_finite_embeddings_stop_the_scan_naming_the_step():
    torch.manual_seed(0)
    model, pp = create_model("parclip-micro")
    with torch.no_grad():
        model.visual.proj.fill_(float("nan"))
    with pytest.raises(ScanError, match="step 'clean images'"):
        scan(model, pp, get_tokenizer("parclip-micro"), Toy(), classnames=NAMES, config=ScanConfig(**SMALL),
             workers=0, progress=False)


def test_a_reference_with_other_settings_is_refused(scans, models):
    model, pp = models["clean2"]
    with pytest.raises(ScanError, match="class_steps: 30 .reference. vs 20"):
        scan(model, pp, get_tokenizer("parclip-micro"), Toy(), classnames=NAMES,
             config=ScanConfig(**{**SMALL, "class_steps": 20}), reference=scans["clean"][0], workers=0,
             progress=False)


# ---------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def cli_setup(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("scan_cli")
    data = root / "data"
    src = Toy(n=120)
    for i in range(len(src)):
        folder = data / NAMES[int(src.targets[i])]
        folder.mkdir(parents=True, exist_ok=True)
        src.load_image(i).save(folder / f"{i:03d}.png")
    dirs = {}
    for name in ("clean", "planted"):
        model, pp = models[name]
        save_model(model, root / name, model_name="parclip-micro", preprocess_cfg=pp)
        dirs[name] = root / name
    (root / "templates.txt").write_text("a photo of a {} thing.\n")
    return root, data, dirs


def _cli_scan(cli_setup, name, *extra):
    from parclip.cli import main

    root, data, dirs = cli_setup
    return main(["scan", "--model", f"local-dir:{dirs[name]}", "--data", str(data), "--templates",
                 str(root / "templates.txt"), "--n-images", "120", "--n-invert", "64", "--encoder-steps", "30",
                 "--class-steps", "30", "--invert-batch-size", "32", "--triggers", "badnet_rs", "--workers", "0",
                 "--quiet", *extra])


def test_cli_scan_writes_its_files_and_fails_on_detect(cli_setup, capsys):
    root = cli_setup[0]
    assert _cli_scan(cli_setup, "clean", "--out", str(root / "out_c"), "--fail-on-detect") == 0
    assert _cli_scan(cli_setup, "planted", "--out", str(root / "out_p"), "--fail-on-detect", "--reference",
                     str(root / "out_c" / "scan.json")) == 3
    result = json.loads((root / "out_p" / "scan.json").read_text())
    assert result["verdict"]["target"] == "blue" and result["checkpoint_sha256"] and result["reference"]
    assert "suspected target 'blue'" in capsys.readouterr().out
    assert {p.name for p in (root / "out_p" / "triggers").iterdir()} >= {"encoder.png", "class_blue.png"}


def test_cli_scan_of_a_folder_without_classes_needs_classnames_for_the_class_tests(cli_setup, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted(cli_setup[1].rglob("*.png"))):
        (flat / f"{i:03d}.png").write_bytes(p.read_bytes())
    assert _cli_scan(cli_setup, "planted", "--data", str(flat), "--out", str(tmp_path / "o"), "--parts",
                     "encoder", "sweep", "classifier") == 0
    result = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert result["classifier"] is None and result["sweep"] == [] and result["encoder"]["top_class"] is None
    assert "fewer than two classes" in capsys.readouterr().out
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    _cli_scan(cli_setup, "planted", "--data", str(flat), "--classnames", str(tmp_path / "names.txt"), "--out",
              str(tmp_path / "o2"), "--parts", "sweep")
    best = max(json.loads((tmp_path / "o2" / "scan.json").read_text())["sweep"], key=lambda r: r["lift"])
    assert best["target"] == "blue" and best["lift"] > 40


# ---------------------------------------------------------------------------------------------------- pure parts
def test_flip_rates_and_lift():
    ref = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([1, 0, 1, 1, 2, 1])
    # class 1: reference not 1 = 5 images, predicted 1 among them: 3 -> 60 %
    assert flip_rates(pred, ref, 3).tolist() == pytest.approx([0.0, 60.0, 0.0])
    assert lift(torch.tensor([10.0, 60.0, 5.0]), torch.tensor([0.0, 10.0, 0.0])) == (1, 50.0)
    assert torch.isnan(flip_rates(torch.tensor([0, 0]), torch.tensor([0, 0]), 2)[0])


def test_anomaly_index_and_clusters():
    idx = anomaly_index([0.1, 0.1, 0.12, 0.08, 0.01])
    assert idx[-1] > 2 and max(idx[:-1]) < 2
    assert anomaly_index([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]
    z = torch.nn.functional.normalize(torch.cat([torch.randn(20, 8) * 0.05 + torch.eye(8)[0],
                                                 torch.randn(20, 8) * 0.05 + torch.eye(8)[1]]), dim=1)
    ids = kmeans(z, 2, seed=0)
    assert len(set(ids[:20].tolist())) == 1 and len(set(ids[20:].tolist())) == 1 and ids[0] != ids[20]
    assert cluster_tightness(z, ids) > 0.95 > z.mean(0).pow(2).sum().item()


def test_controls_change_what_their_trigger_changes():
    x, _ = toy_images(16, 3)
    donors = toy_images(8, 4)[0]
    patch = DonorPatch(donors, 28, 7)
    y = patch.apply(x[0], trigger_generator(0, 0))
    changed = (y != x[0]).any(0)
    assert 0 < changed.sum() <= 49  # only inside one 7 x 7 square
    rows, cols = changed.nonzero().T
    assert rows.max() - rows.min() < 7 and cols.max() - cols.min() < 7
    trig = get_trigger("blended", 28, alpha=0.2)
    after = torch.stack([trig.apply(v, trigger_generator(0, i)) for i, v in enumerate(x)])
    change = mean_abs_change(x, after)
    a = matched_alpha(change, x, donors)
    control = DonorBlend(donors, 28, a)
    got = mean_abs_change(x, torch.stack([control.apply(v, trigger_generator(1, i)) for i, v in enumerate(x)]))
    assert got == pytest.approx(change, rel=0.25)


def test_variants_cover_sizes_and_strengths():
    names = [label for label, _ in variants(224)]
    assert {"badnet_rs 16px", "badnet_rs 32px", "badnet_rs 56px", "sig delta=60"} <= set(names)
    assert not any(n.startswith("badclip") for n in names)  # no patch file: not swept
    sizes = {t.patch_size for label, t in variants(32, names=["badnet"])}
    assert sizes == {2, 5, 8}
