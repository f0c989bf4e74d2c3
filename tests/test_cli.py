"""The command line as a user meets it: help that teaches, errors as messages, the data and poison commands."""
import json
import subprocess
import sys

import pytest

from parclip.cli import build_parser, main


@pytest.mark.parametrize("command", ["demo", "data", "poison", "train", "eval", "eval-retrieval", "report", "plot",
                                     "models", "triggers", "attack"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_train_help_lists_the_par_options():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--tau", "--lr-decay-ratio", "--objective", "--resume", "--precision", "--csv-img-key", "--config"):
        assert flag in text


@pytest.mark.slow
def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "parclip", "models"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    names = out.stdout.split()
    assert "ViT-B-32-quickgelu" in names and "parclip-rn-tiny" in names and "RN50" in names


def test_user_errors_are_messages_not_tracebacks(tmp_path, capsys):
    rc = main(["eval", "--model", "parclip-micro", "--pretrained", str(tmp_path / "missing.pt"), "--data",
               str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pt" in err and "Traceback" not in err
    rc = main(["poison", str(tmp_path / "none.csv"), str(tmp_path / "o"), "--attack", "nope", "--target", "x",
               "--n", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown trigger" in err and "badnet_rs" in err


def test_data_export_and_poison_commands(tmp_path, capsys):
    assert main(["data", "fashion-mnist", str(tmp_path / "fm"), "--n-train", "300", "--holdout", "100",
                 "--n-test", "50"]) == 0
    assert main(["data", "check", str(tmp_path / "fm" / "train.csv")]) == 0
    assert "200 usable rows" in capsys.readouterr().out
    rc = main(["poison", str(tmp_path / "fm" / "train.csv"), str(tmp_path / "p"), "--attack", "blended-stripes",
               "--target", "bag", "--n", "20", "--image-size", "32", "--templates", "fashion", "--trigger-param",
               "alpha=0.05"])
    assert rc == 0
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["n_poison"] == 20 and manifest["trigger"]["name"] == "blended_rs"
    assert manifest["trigger"]["params"]["alpha"] == 0.05
    assert sum("bag" in r["new_caption"] for r in manifest["rows"]) == 20


@pytest.fixture(scope="module")
def fmnist_tiny(tmp_path_factory):
    """A tiny Fashion-MNIST export (40 train rows, 20 holdout rows, 10 test images): poisoned once per attack."""
    from parclip.data import fashion_mnist

    out = tmp_path_factory.mktemp("fm_cli")
    return fashion_mnist.export(out, n_train=60, holdout=20, n_test=10, seed=0)


def _trigger_names():
    from parclip.attacks.triggers import list_triggers

    return [c.name for c in list_triggers()]


@pytest.mark.parametrize("attack", _trigger_names())
def test_poison_command_handles_every_attack(attack, fmnist_tiny, tmp_path):
    from PIL import Image

    extra = []
    if attack == "badclip":  # needs a patch file: a user's, or one from `parclip attack optimize-patch`
        Image.new("RGB", (16, 16), (250, 220, 30)).save(tmp_path / "patch.png")
        extra = ["--trigger-param", f"patch={tmp_path / 'patch.png'}"]
    out = tmp_path / "p"
    rc = main(["poison", str(fmnist_tiny["train_csv"]), str(out), "--attack", attack, "--target", "bag", "--n", "3",
               "--image-size", "224", "--seed", "1", *extra])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trigger"]["name"] == attack and manifest["n_poison"] == 3
    for row in manifest["rows"]:
        img = Image.open(out / row["new_path"])
        assert img.size == (224, 224) and img.format == "PNG"
