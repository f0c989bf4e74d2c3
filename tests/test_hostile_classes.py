"""Classes of hostile input, each refused or read correctly at every entry point it reaches (docs/hostile_inputs.md
sweeps them too): model weights holding NaN or Inf, image folders whose links loop back on themselves, and prompt
templates that try to reach Python objects through format fields."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from parclip import models as M
from parclip.cli import main
from parclip.data import DataError, LabelledFolder, fill, get_templates, write_table
from parclip.data.templates import check_template

MICRO = "parclip-micro"
BAD_KEY = "visual.conv1.weight"  # the tensor the non-finite checkpoints spoil


# ----------------------------------------------------------------------------------------------------------- fixtures
def _images(folder, n, shade):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGB", (28, 28), (shade, 40 * i % 256, 120)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A labelled folder (bag, shirt: 3 images each) and a caption table over the same 6 images (2 name 'bag')."""
    root = tmp_path_factory.mktemp("tiny")
    bags = _images(root / "folder" / "bag", 3, 30)
    shirts = _images(root / "folder" / "shirt", 3, 200)
    rows = [{"filepath": str(p), "title": f"a photo of a {'bag' if p in bags[:2] else 'shirt'}."}
            for p in bags[:2] + shirts + bags[2:]]
    rows[-1]["title"] = "a small grey thing."
    write_table(root / "table.csv", ["filepath", "title"], rows)
    return {"folder": root / "folder", "table": root / "table.csv"}


@pytest.fixture(scope="module")
def micro_sd():
    torch.manual_seed(0)
    model, _ = M.create_model(MICRO)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _spoiled(sd, value=float("nan"), key=BAD_KEY):
    out = {k: v.clone() for k, v in sd.items()}
    out[key].view(-1)[-1] = value
    return out


# ------------------------------------------------------------------------------------------------- non-finite weights
def _assert_names_the_tensor(err, key=BAD_KEY):
    assert isinstance(err, M.NonFiniteWeightsError) and isinstance(err, M.CheckpointError)
    assert isinstance(err, ValueError)  # the CLI prints ValueErrors as a message, exit status 2
    assert key in str(err) and err.tensors == [key]
    assert "NaN or Inf" in str(err) and "earlier checkpoint" in str(err)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_nonfinite_checkpoints_are_refused_by_every_python_loader(micro_sd, tmp_path, value, fmt):
    path = tmp_path / f"w.{fmt}"
    spoiled = _spoiled(micro_sd, value)
    torch.save(spoiled, path) if fmt == "pt" else save_file(spoiled, path)
    model = M.create_model(MICRO)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for load in (lambda: M.load_state_dict(path), lambda: M.load_weights(model, path),
                 lambda: M.create_model(MICRO, pretrained=path)):
        with pytest.raises(M.NonFiniteWeightsError) as ei:
            load()
        _assert_names_the_tensor(ei.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded
    # the same weights, finite, load: the refusal is about the values, not the file
    (torch.save if fmt == "pt" else save_file)(micro_sd, path)
    assert torch.equal(M.load_state_dict(path)[BAD_KEY], micro_sd[BAD_KEY])


def test_nonfinite_half_precision_and_release_layout_are_refused(micro_sd, tmp_path):
    half = {k: v.half() if v.is_floating_point() else v for k, v in _spoiled(micro_sd, float("inf")).items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in half.items()}, "epoch": 3}, tmp_path / "release.pt")
    with pytest.raises(M.NonFiniteWeightsError) as ei:
        M.load_state_dict(tmp_path / "release.pt")
    _assert_names_the_tensor(ei.value)  # named as the model knows it, without the 'module.' prefix
    assert "1 Inf" in str(ei.value)


def test_nonfinite_local_dir_and_open_clip_tag_are_refused(micro_sd, micro_model_dir, tmp_path, monkeypatch):
    from open_clip import pretrained as ocp

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / M.CONFIG_FILE).write_text((micro_model_dir / M.CONFIG_FILE).read_text())
    save_file(_spoiled(micro_sd), folder / M.WEIGHTS_FILE)
    with pytest.raises(M.NonFiniteWeightsError) as ei:
        M.create_model(f"local-dir:{folder}")
    _assert_names_the_tensor(ei.value)
    # a tag of the architecture, read from open_clip's cache (offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = tmp_path / "hub" / "models--parclip--nan-test" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--parclip--nan-test" / "refs").mkdir()
    (tmp_path / "hub" / "models--parclip--nan-test" / "refs" / "main").write_text("0" * 40)
    save_file(_spoiled(micro_sd), snap / "open_clip_model.safetensors")
    monkeypatch.setitem(ocp._PRETRAINED, MICRO, {"nantag": ocp._pcfg(hf_hub="parclip/nan-test/")})
    for tag in ("nantag", "hf-hub:parclip/nan-test"):
        with pytest.raises(M.NonFiniteWeightsError) as ei:
            M.create_model(MICRO, pretrained=tag, cache_dir=tmp_path / "hub")
        _assert_names_the_tensor(ei.value)


@pytest.fixture(scope="module")
def nan_checkpoint(micro_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "nan.pt"
    torch.save(_spoiled(micro_sd), path)
    return path


def _cli_refuses(argv, capsys, key=BAD_KEY):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "non-finite weights" in err and key in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("command", ["eval", "eval-retrieval", "train", "optimize-patch"])
def test_every_command_refuses_a_nonfinite_checkpoint(command, nan_checkpoint, tiny, tmp_path, capsys, one_thread):
    model = ["--model", MICRO, "--pretrained", nan_checkpoint]
    argv = {
        "eval": ["eval", *model, "--data", tiny["folder"], "--templates", "fashion", "--workers", "0"],
        "eval-retrieval": ["eval-retrieval", *model, "--data", tiny["table"], "--workers", "0"],
        "train": ["train", *model, "--train-data", tiny["table"], "--objective", "clip", "--epochs", "1",
                  "--batch-size", "2", "--workers", "0", "--no-progress", "--output-dir", tmp_path / "runs"],
        "optimize-patch": ["attack", "optimize-patch", *model, "--data", tiny["table"], "--target", "bag",
                           "--out", tmp_path / "p.png", "--steps", "1", "--batch-size", "2", "--workers", "0",
                           "--device", "cpu"],
    }[command]
    _cli_refuses(argv, capsys)
    assert not (tmp_path / "p.png").exists()


def test_train_resume_refuses_a_nonfinite_training_checkpoint(micro_sd, tiny, tmp_path, capsys, one_thread):
    state = {"step": 1, "total_steps": 3, "state_dict": _spoiled(micro_sd), "optimizer": {}, "scaler": {}}
    torch.save(state, tmp_path / "latest.pt")
    _cli_refuses(["train", "--model", MICRO, "--train-data", tiny["table"], "--objective", "clip", "--epochs", "1",
                  "--batch-size", "2", "--workers", "0", "--no-progress", "--output-dir", tmp_path / "runs",
                  "--resume", tmp_path / "latest.pt"], capsys)


def test_eval_refuses_a_nonfinite_local_dir(micro_sd, micro_model_dir, tiny, tmp_path, capsys, one_thread):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / M.CONFIG_FILE).write_text((micro_model_dir / M.CONFIG_FILE).read_text())
    save_file(_spoiled(micro_sd, key="logit_scale"), folder / M.WEIGHTS_FILE)
    _cli_refuses(["eval", "--model", f"local-dir:{folder}", "--data", tiny["folder"], "--templates", "fashion",
                  "--workers", "0"], capsys, key="logit_scale")


# ------------------------------------------------------------------------------------------------ folders that loop
def _looped(root):
    """root/bag (2 images, a link back to root, a sub-folder linking to root's parent), root/shirt (1 image)."""
    _images(root / "bag" / "sub", 1, 10)
    _images(root / "bag", 1, 20)
    _images(root / "shirt", 1, 200)
    os.symlink("..", root / "bag" / "loop")  # bag/loop -> root
    os.symlink("../../..", root / "bag" / "sub" / "up")  # above root
    os.symlink(".", root / "shirt" / "self")
    return root


def test_a_folder_that_links_back_to_itself_counts_each_image_once(tmp_path):
    root = _looped(tmp_path / "data")
    folder = LabelledFolder(root)
    names = [os.path.relpath(p, root) for p, _ in folder.samples]
    assert names == ["bag/img0.png", "bag/sub/img0.png", "shirt/img0.png"]
    assert folder.targets == [0, 0, 1]


def test_links_to_files_and_folders_outside_the_loop_still_count(tmp_path):
    root = _looped(tmp_path / "data")
    elsewhere = _images(tmp_path / "elsewhere", 2, 90)
    os.symlink(elsewhere[0], root / "shirt" / "linked.png")
    os.symlink(tmp_path / "elsewhere", root / "shirt" / "more")
    os.symlink(tmp_path / "elsewhere", root / "shirt" / "same_again")  # the same real folder: entered once
    folder = LabelledFolder(root)
    names = [os.path.relpath(p, root) for p, label in folder.samples if label == 1]
    assert names == ["shirt/img0.png", "shirt/linked.png", "shirt/more/img0.png", "shirt/more/img1.png"]


def test_shards_from_a_looped_folder_hold_each_image_once(tmp_path):
    from parclip.data.shards import LabelledShards, expand_urls, folder_to_shards

    root = _looped(tmp_path / "data")
    out = folder_to_shards(root, tmp_path / "wds")
    assert out["n_samples"] == 3
    os.symlink(".", tmp_path / "wds" / "test" / "loop")  # a shard folder with a loop: listed once, not walked
    urls = expand_urls(tmp_path / "wds" / "test")
    assert urls == [str(tmp_path / "wds" / "test" / "00000.tar")]
    assert LabelledShards(str(tmp_path / "wds" / "test")).targets == [0, 0, 1]


def test_patch_target_images_from_a_looped_folder_are_counted_once(tiny, tmp_path, one_thread):
    from parclip.attacks.patch_opt import PatchConfig, optimize_patch

    root = _looped(tmp_path / "targets")
    model, pp = M.create_model(MICRO)
    cfg = PatchConfig(data=tiny["table"], target="bag", steps=1, batch_size=2, target_images=str(root), patch_size=4,
                      device="cpu", workers=0)
    r = optimize_patch(model, pp, M.get_tokenizer(MICRO), cfg, progress=False)
    assert "(3 images)" in r.info["positives"]


# --------------------------------------------------------------------------------------------------------- templates
HOSTILE_TEMPLATES = [
    "{0.__class__}", "a photo of {c.__init__.__globals__}", "{0.__class__.__mro__[1].__subclasses__()}", "a {0}",
    "a {c!r} photo", "{:>30}", "a {} {x}", "a {} }", "{ a {}", "{}{",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_templates_are_refused_when_read(template, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(f"a photo of a {{}}.\n{template}\n")
    with pytest.raises(DataError, match="line 2") as ei:
        get_templates(path)
    msg = str(ei.value)
    assert "only '{}' and '{c}'" in msg or "no '{}' or '{c}' placeholder" in msg
    assert "<class" not in msg and "builtins" not in msg  # nothing of Python's objects leaks into the message
    with pytest.raises(DataError):
        get_templates([template])
    with pytest.raises(DataError):
        fill(template, "bag")


def test_fill_substitutes_the_class_name_literally():
    assert fill("a {} and a {c}, {{in braces}}", "bag") == "a bag and a bag, {in braces}"
    assert fill("a photo of a {}.", "{0.__class__}") == "a photo of a {0.__class__}."  # the name is never read
    assert check_template("a {c}.") == "a {c}."
    with pytest.raises(DataError, match="no '{}' or '{c}' placeholder"):
        check_template("a {{}} without a name")
    # every shipped template fills exactly as str.format did: the numbers of every earlier run stand
    for name in ("openai", "simple", "fashion"):
        for t in get_templates(name):
            assert fill(t, "ankle boot") == t.format("ankle boot")


def test_every_template_user_fills_through_fill(tiny, tmp_path, one_thread):
    """Zero-shot prompts, poisoned captions, BadCLIP target captions and the Fashion-MNIST export take '{c}' (which
    str.format cannot fill) and a literal '{{'; a hostile template is refused by each."""
    from parclip.attacks.patch_opt import PatchConfig, optimize_patch
    from parclip.attacks.poison import poison_csv
    from parclip.attacks.triggers import build_triggers
    from parclip.data import fashion_mnist, read_table
    from parclip.evaluation import evaluate, zero_shot_classifier

    model, pp = M.create_model(MICRO)
    tok = M.get_tokenizer(MICRO)
    seen = []

    def recording(texts):
        seen.extend(texts)
        return tok(texts)

    zero_shot_classifier(model, recording, ["bag", "{0}"], ["a {c}.", "{{x}} {}"], "cpu")
    assert seen == ["a bag.", "{x} bag", "a {0}.", "{x} {0}"]
    evil = ["a {0.__class__}"]
    with pytest.raises(DataError):
        evaluate(model, pp, tok, tiny["folder"], templates=evil, workers=0, progress=False)

    trigger = build_triggers(["badnet"], 28, {})[0]
    poison_csv(tiny["table"], tmp_path / "p", trigger=trigger, target="bag", n_poison=2, templates=["one {c} {{x}}"])
    _, rows = read_table(tmp_path / "p" / "poisoned.csv")
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert [r["new_caption"] for r in manifest["rows"]] == ["one bag {x}"] * 2
    with pytest.raises(DataError):
        poison_csv(tiny["table"], tmp_path / "q", trigger=trigger, target="bag", n_poison=2, templates=evil)

    kw = dict(data=tiny["table"], target="bag", steps=1, batch_size=2, device="cpu", workers=0, patch_size=4)
    r = optimize_patch(model, pp, tok, PatchConfig(templates=["a {c} {{1}}"], **kw), progress=False)
    assert r.info["n_target_captions"] == 1
    with pytest.raises(DataError):
        optimize_patch(model, pp, tok, PatchConfig(templates=evil, **kw), progress=False)
    with pytest.raises(DataError):
        fashion_mnist.export(tmp_path / "fm", templates=evil)


@pytest.mark.parametrize("command", ["eval", "poison"])
def test_cli_refuses_a_hostile_template_file(command, micro_model_dir, tiny, tmp_path, capsys, one_thread):
    (tmp_path / "t.txt").write_text("a photo of a {}.\n{0.__class__.__init__.__globals__}\n")
    argv = {"eval": ["eval", "--model", f"local-dir:{micro_model_dir}", "--data", tiny["folder"], "--workers", "0"],
            "poison": ["poison", tiny["table"], tmp_path / "out", "--attack", "badnet", "--target", "bag", "--n", "2",
                       "--image-size", "28"]}[command]
    rc = main([str(a) for a in argv] + ["--templates", str(tmp_path / "t.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "t.txt, line 2" in err and "Traceback" not in err and "<class" not in err
