"""The small class-conditional generator families (parclip.synth: pca-gauss, cvae): storage as safetensors + JSON
(bit-identical after a round trip, hostile files refused), per-image seeding, conditioning, training from a table."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from parclip.data import write_table
from parclip.synth import FAMILIES, GeneratorFileError, Prompt, list_generators, load_generator, train_generator
from parclip.synth.fit import fit_family, read_class_images
from parclip.synth.stored import CONFIG_FILE, WEIGHTS_FILE

KINDS = ["pca-gauss", "cvae"]
# name -> (kind, fast settings); pca-mix: the same kind with a 3-cluster mixture per class
CONFIGS = {"pca-gauss": ("pca-gauss", dict(components=4)), "pca-mix": ("pca-gauss", dict(components=4, clusters=3)),
           "cvae": ("cvae", dict(epochs=30, batch_size=32, width=8, latent=4, lr=3e-3))}


def toy_data(n_per_class: int = 64, seed: int = 0):
    """Two very different classes: a bright left half (class 0) or a bright right half (class 1), with noise."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, size=(2 * n_per_class, 28, 28)).astype(np.uint8)
    y = np.repeat([0, 1], n_per_class)
    x[:n_per_class, :, :14] += 200
    x[n_per_class:, :, 14:] += 200
    return x, y


@pytest.fixture(scope="module")
def trained(one_thread):
    x, y = toy_data()
    return {name: fit_family(kind, x, y, ["left", "right"], seed=0, **options)
            for name, (kind, options) in CONFIGS.items()}


def _arrays(images):
    return [np.asarray(im) for im in images]


def test_every_family_is_registered_and_trainable():
    assert set(KINDS) <= set(list_generators()) and set(KINDS) == set(FAMILIES)


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_bit_identical(trained, name, tmp_path):
    gen, kind = trained[name], CONFIGS[name][0]
    folder = gen.store(tmp_path / kind)
    assert {p.name for p in folder.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}
    with open(folder / WEIGHTS_FILE, "rb") as f:
        assert f.read(9)[8:9] == b"{"  # a safetensors header, not a pickle
    again = load_generator(f"{kind}:{folder}")
    assert type(again) is type(gen) and again.classnames == ["left", "right"]
    prompts, seeds = [Prompt("a left", 0), Prompt("a right", 1), Prompt("x", classname="right")], [3, 4, 5]
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(gen.generate(prompts, seeds)),
                                                     _arrays(again.generate(prompts, seeds))))
    d = again.describe()
    assert d["kind"] == kind and d["conditioning"] == "class" and d["weights"] == str(folder / WEIGHTS_FILE)
    assert len(d["sha256"]) == 64 and d["settings"]["classnames"] == ["left", "right"]
    assert load_generator(f"{kind}:{folder / CONFIG_FILE}").describe()["sha256"] == d["sha256"]
    assert load_generator(f"{kind}:{folder}", device="cpu").classnames == ["left", "right"]
    with pytest.raises(TypeError, match="unknown option"):
        load_generator(f"{kind}:{folder}", steps=4)


@pytest.mark.parametrize("name", CONFIGS)
def test_image_i_depends_only_on_its_prompt_and_seed(trained, name):
    gen = trained[name]
    prompts = [Prompt("l", 0), Prompt("r", 1), Prompt("l", 0), Prompt("r", 1)]
    batch = gen.generate(prompts, [10, 11, 12, 13])
    assert all(im.mode == "RGB" and im.size == (28, 28) for im in batch)
    assert gen.generate(prompts, [10, 11, 12, 13])[3].tobytes() == batch[3].tobytes()  # reproducible
    alone = gen.generate([prompts[2]], [12])[0]
    assert np.array_equal(np.asarray(alone), np.asarray(batch[2]))
    torch.manual_seed(123)  # the global random state plays no part
    assert np.array_equal(np.asarray(gen.generate([prompts[1]], [11])[0]), np.asarray(batch[1]))
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[2]))  # other seed, other image
    px = np.asarray(batch[0])
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()  # grey as RGB


@pytest.mark.parametrize("name", CONFIGS)
def test_conditioning_makes_the_asked_class(trained, name):
    """Generated images of each class look like that class: the bright half is on the class's side."""
    gen = trained[name]
    labels = [0, 1] * 20
    images = gen.generate([Prompt("", k) for k in labels], list(range(len(labels))))
    side = [np.asarray(im)[..., 0].astype(float) for im in images]
    pred = [int(a[:, 14:].mean() > a[:, :14].mean()) for a in side]
    assert np.mean(np.array(pred) == np.array(labels)) >= 0.95


@pytest.mark.parametrize("name", CONFIGS)
def test_bad_prompts_and_seeds_are_refused(trained, name):
    gen = trained[name]
    with pytest.raises(ValueError, match="needs a label"):
        gen.generate([Prompt("a photo")], [0])
    with pytest.raises(ValueError, match="outside 0..1"):
        gen.generate([Prompt("a photo", 2)], [0])
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        gen.generate([Prompt("a", 0), Prompt("b", 1)], [0])


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_or_broken_files_are_refused(trained, kind, tmp_path):
    folder = trained[kind].store(tmp_path / "ok")
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    good_bytes, meta = weights.read_bytes(), json.loads(config.read_text())

    torch.save(trained[kind].tensors, weights)  # a pickle archive under the safetensors name
    with pytest.raises(GeneratorFileError, match="never unpickles"):
        load_generator(f"{kind}:{folder}")
    weights.write_bytes(b"\x80\x04garbage")  # a bare pickle
    with pytest.raises(GeneratorFileError, match="never unpickles"):
        load_generator(f"{kind}:{folder}")
    weights.write_bytes(b"not a tensor file at all")
    with pytest.raises(GeneratorFileError, match="not a safetensors file"):
        load_generator(f"{kind}:{folder}")
    weights.write_bytes(good_bytes[:-8])  # truncated: the checksum no longer matches
    with pytest.raises(GeneratorFileError, match="sha256"):
        load_generator(f"{kind}:{folder}")
    weights.write_bytes(good_bytes)
    other = "cvae" if kind == "pca-gauss" else "pca-gauss"
    with pytest.raises(GeneratorFileError, match=f"kind '{kind}', not '{other}'"):
        load_generator(f"{other}:{folder}")
    config.write_text(json.dumps({**meta, "config": {**meta["config"], "image_size": 32}}))  # tensors do not fit
    with pytest.raises(GeneratorFileError, match="tensors differ"):
        load_generator(f"{kind}:{folder}")
    config.write_text("{not json")
    with pytest.raises(GeneratorFileError, match="unreadable JSON"):
        load_generator(f"{kind}:{folder}")
    with pytest.raises(GeneratorFileError, match="not a generator folder"):
        load_generator(f"{kind}:{tmp_path / 'nowhere'}")


def test_a_mixture_uses_its_clusters_by_weight(trained):
    gen = trained["pca-mix"]
    w = gen.tensors["weight"]
    assert w.shape == (2, 3) and torch.allclose(w.sum(1), torch.ones(2)) and (w > 0).all()
    with pytest.raises(ValueError, match="mixture weights"):
        type(gen)({**gen.tensors, "weight": torch.full((2, 3), 0.5)}, gen.config)


def test_non_finite_weights_are_refused(trained, tmp_path):
    gen = trained["pca-gauss"]
    gen2 = type(gen)({**gen.tensors, "mean": gen.tensors["mean"].clone().fill_(float("nan"))}, gen.config)
    folder = gen2.store(tmp_path / "nan")
    with pytest.raises(GeneratorFileError, match="non-finite values in mean"):
        load_generator(f"pca-gauss:{folder}")


def test_train_generator_reads_the_pairs_table_only(fmnist_small, tmp_path, one_thread):
    """train_generator learns from the table it is given (train.csv: the 600 pre-training rows, not holdout.csv)."""
    out = train_generator(fmnist_small["train_csv"], tmp_path / "g", seed=0, family="pca-gauss", components=4, clusters=2)
    gen = load_generator(f"pca-gauss:{out}")
    assert gen.config["n_train"] == 600 and gen.config["train_table"] == str(fmnist_small["train_csv"])
    assert gen.classnames[0] == "t-shirt" and len(gen.classnames) == 10
    (im,) = gen.generate([Prompt("a bag", classname="bag")], [0])
    assert im.size == (28, 28) and im.mode == "RGB"
    with Image.open(fmnist_small["root"] / "images" / "train" / "00000.png") as real:
        assert real.size == im.size  # the export's native size


def test_a_table_without_labels_gets_classes_from_captions(tmp_path):
    for i in range(3):
        Image.new("L", (28, 28), 40 * i).save(tmp_path / f"{i}.png")
    rows = [{"filepath": f"{i}.png", "title": t} for i, t in enumerate(["a t-shirt.", "two shirts", "a bag"])]
    write_table(tmp_path / "t.csv", ["filepath", "title"], rows)
    x, y = read_class_images(tmp_path / "t.csv", ["t-shirt", "shirt", "bag"])
    assert y.tolist() == [0, 1, 2] and x.shape == (3, 28, 28) and x[2].max() == 80
    write_table(tmp_path / "bad.csv", ["filepath", "title"], [{"filepath": "0.png", "title": "a hat"}])
    with pytest.raises(Exception, match="names 0 of the classes"):
        read_class_images(tmp_path / "bad.csv", ["t-shirt", "shirt", "bag"])


def test_the_default_is_the_measured_choice():
    """train_generator's default family and settings are those of the candidate docs/synth_quality.md chose."""
    from pathlib import Path

    from parclip.synth import DEFAULT_FAMILY

    report = json.loads((Path(__file__).resolve().parents[1] / "docs" / "synth_quality" / "quality.json").read_text())
    (chosen,) = [r for r in report["candidates"] if r["candidate"] == report["chosen"]]
    assert chosen["family"] == DEFAULT_FAMILY and not report["smoke"]
    assert {k: chosen["settings"][k] for k in FAMILIES[DEFAULT_FAMILY][1]} == FAMILIES[DEFAULT_FAMILY][1]


def test_cli_trains_a_generator_that_synthesize_loads(fmnist_small, tmp_path, capsys, one_thread):
    """`parclip data train-generator` stores a generator `data synthesize` loads by KIND:FOLDER; its pairs name
    Fashion-MNIST's classes and the images are the generator's (not copies of the table's files)."""
    from parclip.cli import main

    gen = tmp_path / "gen"
    assert main(["data", "train-generator", str(fmnist_small["train_csv"]), str(gen), "--seed", "1"]) == 0
    assert f"--generator pca-gauss:{gen}" in capsys.readouterr().out
    assert json.loads((gen / "generator.json").read_text())["config"]["seed"] == 1
    out = tmp_path / "synth"
    assert main(["data", "synthesize", str(out), "--generator", f"pca-gauss:{gen}", "--templates", "fashion",
                 "--per-class", "2"]) == 0
    rows = (out / "synthetic.csv").read_text().splitlines()
    assert rows[0].split("\t")[:2] == ["filepath", "title"] and len(rows) == 21
    assert {r.split("\t")[3] for r in rows[1:]} == set(load_generator(f"pca-gauss:{gen}").classnames)
    assert main(["data", "train-generator", str(fmnist_small["train_csv"]), str(tmp_path / "g2"),
                 "--family", "nope"]) == 2  # an unknown family is a message, not a traceback
    assert "pca-gauss" in capsys.readouterr().err
