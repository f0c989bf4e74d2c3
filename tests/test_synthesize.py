"""`parclip data synthesize`: prompts from class names or a caption file, seeded images, chunks committed atomically,
resume to the same bytes, clear errors for bad captions, collapsed generators and a full disk, output that `parclip
train` reads, and a diffusers pipeline end to end (a tiny random one, built offline)."""
import errno
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parclip.cli import main
from parclip.data import DataError
from parclip.data.captions import read_table
from parclip.synth import Generator, GeneratorError, Prompt, register_generator
from parclip.synth import synthesize as synth_module
from parclip.synth.base import image_from_array
from parclip.synth.prompts import caption_prompts, class_prompts, make_prompts, read_captions
from parclip.synth.synthesize import MANIFEST, TABLE, SynthesisError, image_seed, synthesize


class NoiseGenerator(Generator):
    """Test generator: an 8x8 noise image from (caption, seed). A caption with COLLAPSE gives a constant image, one
    with NAN non-finite values; ``crash_after`` calls to generate raise (a run killed mid-way)."""

    kind = "test-noise"
    conditioning = "text"
    crash_after: int | None = None
    calls = 0

    def __init__(self, argument: str = ""):
        self.argument = argument

    @classmethod
    def load(cls, argument: str, **options):
        if options:
            raise TypeError(f"unknown options {options}")
        return cls(argument)

    def generate(self, prompts, seeds):
        type(self).calls += 1
        if self.crash_after is not None and type(self).calls > self.crash_after:
            raise KeyboardInterrupt("injected: the run is killed here")
        images = []
        for j, (p, s) in enumerate(zip(prompts, seeds)):
            if "COLLAPSE" in p.caption:
                images.append(Image.new("RGB", (8, 8), (7, 7, 7)))
                continue
            rng = np.random.default_rng([s, zlib.crc32(p.caption.encode())])
            a = rng.random((8, 8, 3))
            if "NAN" in p.caption:
                a[2, 3, 1] = np.nan
            images.append(image_from_array(a, index=j))
        return images

    def describe(self):
        return {"kind": self.kind, "argument": self.argument}


CLASSES = ["t-shirt/top", "trouser", "bag", "shirt"]


class ClassNoise(NoiseGenerator):
    kind = "test-class-noise"
    conditioning = "class"

    @property
    def classnames(self):
        return list(CLASSES)

    def generate(self, prompts, seeds):
        assert all(p.label is not None and CLASSES[p.label] == p.classname for p in prompts)
        return super().generate(prompts, seeds)


register_generator(NoiseGenerator)
register_generator(ClassNoise)


@pytest.fixture(autouse=True)
def _reset():
    NoiseGenerator.calls, NoiseGenerator.crash_after = 0, None
    yield
    NoiseGenerator.calls, NoiseGenerator.crash_after = 0, None


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _captions(tmp_path, lines, name="captions.txt"):
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def _run(out, generator=None, n=10, seed=0, chunk_size=3, batch_size=2, shards=False, image_size=None, **kw):
    generator = generator or NoiseGenerator("a")
    classes = generator.classnames if generator.conditioning == "class" else None
    prompts, source = make_prompts(classes, **{"classnames": None, "templates": "fashion", "n": n, "seed": seed, **kw})
    return synthesize(out, generator, prompts, source, seed=seed, chunk_size=chunk_size, batch_size=batch_size,
                      shards=shards, image_size=image_size, progress=False)


@pytest.fixture
def classfile(tmp_path):
    return _captions(tmp_path, ["sneaker", "bag", "coat"], "classes.txt")


# ------------------------------------------------------------------------------------------------------------ prompts
def test_class_prompts_are_balanced_and_seeded():
    p = class_prompts(["a", "b", "c"], ["x {}", "y {}", "z {}"], seed=0, per_class=4)
    assert len(p) == 12 and [q.classname for q in p[:6]] == ["a", "b", "c"] * 2
    assert [q.label for q in p] == [0, 1, 2] * 4
    same = class_prompts(["a", "b", "c"], ["x {}", "y {}", "z {}"], seed=0, n=12)
    other = class_prompts(["a", "b", "c"], ["x {}", "y {}", "z {}"], seed=1, n=12)
    assert [q.caption for q in p] == [q.caption for q in same] != [q.caption for q in other]
    assert len({q.caption.split()[0] for q in p}) > 1  # templates are drawn, not always the first
    with pytest.raises(DataError, match="does not know the classes"):
        class_prompts(["bag", "sneaker"], ["{}"], seed=0, n=2, known=CLASSES)


def test_a_caption_file_with_empty_lines_or_none_is_refused(tmp_path):
    assert read_captions(_captions(tmp_path, [" a bag ", "a shirt"])) == ["a bag", "a shirt"]
    with pytest.raises(DataError, match=r"2 empty line\(s\) \(line 2, 4\).*remove them"):
        read_captions(_captions(tmp_path, ["a bag", "", "a shirt", "   "]))
    with pytest.raises(DataError, match="has no captions"):
        read_captions(_captions(tmp_path, [], "empty.txt"))
    with pytest.raises(DataError, match="has no captions"):
        read_captions(_captions(tmp_path, ["", " "], "blank.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_captions(tmp_path / "latin1.txt")


def test_the_caption_source_and_the_counts_fit_together(tmp_path, classfile):
    captions = _captions(tmp_path, ["a bag", "a shirt", "a coat"])
    prompts, source = make_prompts(None, captions=captions, n=2)
    assert [p.caption for p in prompts] == ["a bag", "a shirt"] and source["lines"] == 3
    with pytest.raises(DataError, match="--n 4 but .* has only 3 captions"):
        make_prompts(None, captions=captions, n=4)
    with pytest.raises(DataError, match="drop --classnames and --per-class"):
        make_prompts(None, captions=captions, per_class=2)
    with pytest.raises(DataError, match="--n N .* or --per-class N"):
        make_prompts(None, classnames=classfile)
    with pytest.raises(DataError, match="unknown template set"):
        make_prompts(None, classnames=classfile, templates="nope", n=3)


def test_image_from_array_refuses_non_finite_values():
    assert image_from_array(np.full((4, 5), 0.5)).size == (5, 4)  # greyscale floats -> RGB
    assert image_from_array(np.zeros((4, 4, 3), np.uint8)).mode == "RGB"
    spoiled = np.full((4, 4, 3), 0.2)
    spoiled[1, 2, 0] = np.inf
    with pytest.raises(GeneratorError, match="1 of 48 are NaN or infinite") as e:
        image_from_array(spoiled, index=3)
    assert e.value.index == 3


def test_class_conditional_captions_need_exactly_one_class():
    ok = caption_prompts(["a photo of a t-shirt/top", "two shirts", "A BAG."], classnames=CLASSES)
    assert [(p.label, p.classname) for p in ok] == [(0, "t-shirt/top"), (3, "shirt"), (2, "bag")]
    with pytest.raises(DataError) as e:
        caption_prompts(["a bag", "a dog", "a cat", "a bag and a trouser"], classnames=CLASSES)
    msg = str(e.value)
    assert "2 name none of its classes (line 2: 'a dog'; 3: 'a cat')" in msg
    assert "1 name several (line 4: 'a bag and a trouser' names ['trouser', 'bag'])" in msg


# ------------------------------------------------------------------------------------------------- seeds and output
def test_runs_are_seeded_and_the_table_reads_back(tmp_path, classfile):
    a = _run(tmp_path / "a", classnames=classfile)
    _run(tmp_path / "b", classnames=classfile)
    _run(tmp_path / "c", classnames=classfile, seed=1)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    ia, ic = _files(tmp_path / "a" / "images"), _files(tmp_path / "c" / "images")
    assert ia.keys() == ic.keys() and all(ia[k] != ic[k] for k in ia)
    fields, rows = read_table(tmp_path / "a" / TABLE)
    assert fields == ["filepath", "title", "label", "classname"] and len(rows) == 10
    assert [r["classname"] for r in rows[:4]] == ["sneaker", "bag", "coat", "sneaker"]
    assert rows[0]["filepath"] == "images/00000/00000000.png" and rows[9]["filepath"] == "images/00003/00000009.png"
    for r in rows:
        with Image.open(tmp_path / "a" / r["filepath"]) as im:
            assert im.mode == "RGB" and im.size == (8, 8)
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert m == a and m["complete"] and [c["chunk"] for c in m["chunks"]] == [0, 1, 2, 3]
    assert m["settings"]["seed"] == 0 and m["settings"]["generator"] == {"kind": "test-noise", "argument": "a"}
    assert m["settings"]["source"]["classnames"] == ["sneaker", "bag", "coat"] and m["parclip_version"]
    assert len(m["settings"]["source"]["sha256"]) == 64 and "a photo of a {}." in m["settings"]["source"]["templates"]


def test_image_i_depends_on_its_seed_and_prompt_only(tmp_path, classfile):
    """Batch and chunk sizes change how the work is cut, not the images (for a generator that keeps the promise)."""
    _run(tmp_path / "a", classnames=classfile, chunk_size=3, batch_size=2)
    _run(tmp_path / "b", classnames=classfile, chunk_size=10, batch_size=7)
    pa, pb = sorted((tmp_path / "a").rglob("*.png")), sorted((tmp_path / "b").rglob("*.png"))
    assert [p.name for p in pa] == [p.name for p in pb] and all(x.read_bytes() == y.read_bytes()
                                                                  for x, y in zip(pa, pb))
    assert image_seed(0, 1) != image_seed(0, 2) != image_seed(1, 1) and 0 <= image_seed(5, 7) < 2 ** 63


@pytest.mark.parametrize("shards", [False, True], ids=["table", "shards"])
def test_a_killed_run_resumes_to_the_same_bytes(tmp_path, classfile, shards):
    _run(tmp_path / "whole", classnames=classfile, shards=shards)
    # 10 images in chunks of 3, batches of 2: chunks 0 and 1 (2 calls each) commit, chunk 2 dies in its 2nd batch
    NoiseGenerator.crash_after, NoiseGenerator.calls = 5, 0
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", classnames=classfile, shards=shards)
    m = json.loads((tmp_path / "cut" / MANIFEST).read_text())
    assert [c["chunk"] for c in m["chunks"]] == [0, 1] and not m["complete"]
    assert not (tmp_path / "cut" / TABLE).exists() and not (tmp_path / "cut" / "shards" / "sizes.json").exists()
    assert not list((tmp_path / "cut").rglob(".*.tmp"))
    NoiseGenerator.crash_after, NoiseGenerator.calls = None, 0
    _run(tmp_path / "cut", classnames=classfile, shards=shards)
    assert NoiseGenerator.calls == 3  # chunks 2 (2 batches) and 3 (1 image) only
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")
    _run(tmp_path / "cut", classnames=classfile, shards=shards)  # a finished run run again: nothing to do
    assert NoiseGenerator.calls == 3 and _files(tmp_path / "cut") == _files(tmp_path / "whole")


def test_shards_hold_the_pairs(tmp_path, classfile):
    from parclip.data.shards import decode_image, read_shard

    m = _run(tmp_path / "s", classnames=classfile, shards=True)
    assert m["outputs"]["shards"] == "shards/{00000..00003}.tar"
    assert json.loads((tmp_path / "s/shards/sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3,
                                                                          "00002.tar": 3, "00003.tar": 1}
    samples = [s for k in range(4) for s in read_shard(str(tmp_path / f"s/shards/{k:05d}.tar"))]
    assert len(samples) == 10 and decode_image(samples[4]).size == (8, 8)
    assert json.loads(samples[4]["json"])["classname"] == "bag" and samples[4]["txt"].decode().count("bag") == 1


def test_other_arguments_into_the_same_folder_are_refused(tmp_path, classfile):
    _run(tmp_path / "a", classnames=classfile)
    with pytest.raises(DataError, match=r"other settings.*seed: 0 → 1"):
        _run(tmp_path / "a", classnames=classfile, seed=1)
    with pytest.raises(DataError, match=r"n_images: 10 → 12"):
        _run(tmp_path / "a", classnames=classfile, n=12)
    with pytest.raises(DataError, match=r"generator.argument: \"a\" → \"b\""):
        _run(tmp_path / "a", NoiseGenerator("b"), classnames=classfile)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no manifest.json"):
        _run(tmp_path / "other", classnames=classfile)


def test_a_moved_caption_file_is_the_same_source(tmp_path):
    _run(tmp_path / "a", captions=_captions(tmp_path, ["a bag", "a shirt"]), n=None)
    (tmp_path / "moved").mkdir()
    _run(tmp_path / "a", captions=_captions(tmp_path / "moved", ["a bag", "a shirt"]), n=None)
    with pytest.raises(DataError, match=r"source.sha256"):
        _run(tmp_path / "a", captions=_captions(tmp_path, ["a bag", "a coat"], "changed.txt"), n=None)


# ---------------------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("word, what", [("COLLAPSE", r"constant image \(every pixel \(7, 7, 7\)\)"),
                                        ("NAN", "non-finite pixel values")])
def test_a_collapsed_generator_names_the_prompt(tmp_path, word, what):
    captions = [f"caption {k}" for k in range(7)]
    captions[4] = f"a {word} bag"
    prompt = rf"prompt 4 \('a {word} bag'\)"
    with pytest.raises(SynthesisError, match=rf"{prompt}.*{what}|{what}.*{prompt}"):
        _run(tmp_path / "o", captions=_captions(tmp_path, captions), n=None)
    m = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert [c["chunk"] for c in m["chunks"]] == [0]  # chunk 1 (prompts 3..5) wrote nothing
    assert not (tmp_path / "o" / "images" / "00001").exists()


def test_a_full_disk_keeps_the_committed_chunks_and_resumes(tmp_path, classfile, monkeypatch):
    _run(tmp_path / "whole", classnames=classfile)
    real, writes = synth_module._write, []

    def full_after_7(path, data):
        writes.append(path)
        if len(writes) > 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(synth_module, "_write", full_after_7)
    with pytest.raises(SynthesisError, match=r"disk is full.*chunk 2.*6 of 10 images of the 2 committed chunks are "
                                             r"kept.*run the same command again"):
        _run(tmp_path / "o", classnames=classfile)
    assert [c["chunk"] for c in json.loads((tmp_path / "o" / MANIFEST).read_text())["chunks"]] == [0, 1]
    monkeypatch.setattr(synth_module, "_write", real)
    _run(tmp_path / "o", classnames=classfile)
    assert _files(tmp_path / "o") == _files(tmp_path / "whole")


def test_a_committed_chunk_with_missing_files_is_made_again(tmp_path, classfile):
    _run(tmp_path / "a", classnames=classfile)
    whole = _files(tmp_path / "a")
    (tmp_path / "a" / "images" / "00001" / "00000004.png").unlink()
    NoiseGenerator.calls = 0
    _run(tmp_path / "a", classnames=classfile)
    assert NoiseGenerator.calls == 2 and _files(tmp_path / "a") == whole


@pytest.mark.slow
def test_a_run_killed_at_a_commit_resumes_to_the_same_bytes(tmp_path, classfile):
    """A real SIGKILL (utils.files' fault injection) at the worst moment: the third manifest write (the commit of
    chunk 1), after chunk 1's images are on disk. The chunk is not counted; the rerun makes it again."""
    import os
    import subprocess
    import sys

    _run(tmp_path / "whole", classnames=classfile)
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_synthesize as t; from pathlib import Path; "
              "t._run(Path(sys.argv[2]), classnames=Path(sys.argv[3]))")
    argv = [sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path / "cut"), str(classfile)]
    env = {**os.environ, "PARCLIP_FAULT_KILL": "manifest.json:3"}
    assert subprocess.run(argv, env=env, timeout=120).returncode == -9
    m = json.loads((tmp_path / "cut" / MANIFEST).read_text())
    assert [c["chunk"] for c in m["chunks"]] == [0] and (tmp_path / "cut/images/00001/00000005.png").is_file()
    env.pop("PARCLIP_FAULT_KILL")
    assert subprocess.run(argv, env=env, timeout=120).returncode == 0
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")


# ------------------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("shards", [False, True], ids=["table", "shards"])
def test_cli_synthesizes_pairs_that_train_reads(tmp_path, classfile, capsys, one_thread, shards):
    out = tmp_path / "synth"
    assert main(["data", "synthesize", str(out), "--generator", "test-noise:x", "--classnames", str(classfile),
                 "--templates", "fashion", "--per-class", "4", "--image-size", "28", "--chunk-size", "5",
                 *(["--shards"] if shards else [])]) == 0
    printed = capsys.readouterr().out
    data = out / ("shards/{00000..00002}.tar" if shards else TABLE)
    assert f"12 synthetic pairs from test-noise:x → {data}" in printed and "parclip train" in printed
    if not shards:
        with Image.open(out / "images" / "00000" / "00000000.png") as im:
            assert im.size == (28, 28)
    assert main(["train", "--model", "parclip-micro", "--train-data", str(data), "--objective", "clip",
                 "--epochs", "1", "--batch-size", "12", "--workers", "0", "--no-progress",
                 "--output-dir", str(tmp_path / "runs"), "--name", "synth"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/synth/metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 1


def test_a_class_conditional_generator_brings_its_classes(tmp_path, capsys):
    assert main(["data", "synthesize", str(tmp_path / "o"), "--generator", "test-class-noise:x", "--per-class", "2",
                 "--templates", "simple"]) == 0
    _, rows = read_table(tmp_path / "o" / TABLE)
    assert [(r["label"], r["classname"]) for r in rows] == [(str(k), c) for k, c in enumerate(CLASSES)] * 2
    assert all(r["classname"] in r["title"] for r in rows)
    m = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert m["settings"]["source"]["from"] == "the generator"


def test_cli_errors_are_messages(tmp_path, classfile, capsys):
    bad = _captions(tmp_path, ["a bag", "", "a dog"])
    assert main(["data", "synthesize", str(tmp_path / "o"), "--generator", "test-noise:x", "--captions", str(bad)]) == 2
    assert "1 empty line(s) (line 2)" in capsys.readouterr().err
    assert main(["data", "synthesize", str(tmp_path / "o"), "--generator", "test-noise:x"]) == 2
    assert "needs a caption source: --classnames FILE" in capsys.readouterr().err
    assert main(["data", "synthesize", str(tmp_path / "o"), "--generator", "nope:x", "--n", "2"]) == 2
    assert "unknown generator kind 'nope'" in capsys.readouterr().err
    good = _captions(tmp_path, ["a bag", "a dog"], "good.txt")
    assert main(["data", "synthesize", str(tmp_path / "o"), "--generator", "test-class-noise:x",
                 "--captions", str(good)]) == 2
    assert "1 name none of its classes (line 2: 'a dog')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "synthesize", str(tmp_path / "o"), "--generator", "test-noise:x", "--classnames",
              str(classfile), "--captions", str(good)])
    assert "not allowed with argument" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- diffusers
def _tiny_pipeline(folder: Path) -> Path:
    """A randomly initialised Stable Diffusion pipeline a few kB large (UNet, VAE, CLIP text encoder, a tokenizer
    with a 56-token vocabulary written here), saved with save_pretrained: nothing is downloaded."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), sample_size=8)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                        intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                        vocab_size=64, max_position_embeddings=16))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    scratch = folder.parent / "tokenizer-files"
    scratch.mkdir()
    (scratch / "vocab.json").write_text(json.dumps(vocab))
    (scratch / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(scratch / "vocab.json"), str(scratch / "merges.txt"), model_max_length=16)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    return _tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def _sd_argv(out, pipe, captions, *extra):
    return ["data", "synthesize", str(out), "--generator", f"diffusers:{pipe}", "--captions", str(captions),
            "--device", "cpu", "--chunk-size", "2", "--batch-size", "2", "--generator-option", "steps=2",
            "--generator-option", "height=16", "--generator-option", "width=16", *extra]


def test_diffusers_pipeline_end_to_end(tiny_sd, tmp_path, capsys, monkeypatch, one_thread):
    from parclip.synth.diffusers_gen import DiffusersGenerator

    captions = _captions(tmp_path, ["a red bag", "a blue shirt", "a green shoe"])
    assert main(_sd_argv(tmp_path / "whole", tiny_sd, captions)) == 0, capsys.readouterr().err
    fields, rows = read_table(tmp_path / "whole" / TABLE)
    assert fields == ["filepath", "title"] and [r["title"] for r in rows] == ["a red bag", "a blue shirt",
                                                                             "a green shoe"]
    pixels = []
    for r in rows:
        with Image.open(tmp_path / "whole" / r["filepath"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (16, 16)
            pixels.append(np.asarray(im))
    assert not np.array_equal(pixels[0], pixels[1])
    g = json.loads((tmp_path / "whole" / MANIFEST).read_text())["settings"]["generator"]
    assert g["kind"] == "diffusers" and g["pipeline"] == "StableDiffusionPipeline" and len(g["sha256"]) == 64
    assert (g["device"], g["dtype"], g["steps"], g["height"]) == ("cpu", "float32", 2, 16)

    real, calls = DiffusersGenerator.generate, []

    def dies_in_the_second_chunk(self, prompts, seeds):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt("injected kill")
        return real(self, prompts, seeds)

    monkeypatch.setattr(DiffusersGenerator, "generate", dies_in_the_second_chunk)
    assert main(_sd_argv(tmp_path / "cut", tiny_sd, captions)) == 130
    assert not (tmp_path / "cut" / TABLE).exists()
    monkeypatch.setattr(DiffusersGenerator, "generate", real)
    assert main(_sd_argv(tmp_path / "cut", tiny_sd, captions)) == 0
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")
    assert main(_sd_argv(tmp_path / "cut", tiny_sd, captions, "--seed", "3")) == 2
    assert "seed: 0 → 3" in capsys.readouterr().err


def test_diffusers_pipeline_that_diverges_is_named(tiny_sd, tmp_path, capsys, one_thread):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-sd"
    shutil.copytree(tiny_sd, broken)
    weights = next((broken / "vae").glob("*.safetensors"))
    state = load_file(weights)
    state["decoder.conv_out.bias"][:] = float("nan")
    save_file(state, weights)
    captions = _captions(tmp_path, ["a red bag", "a blue shirt"])
    assert main(_sd_argv(tmp_path / "o", broken, captions)) == 2
    err = capsys.readouterr().err
    assert "prompt 0 ('a red bag')" in err and "non-finite pixel values" in err
    assert not list((tmp_path / "o").rglob("*.png"))


def test_diffusers_missing_is_a_clear_error(tiny_sd, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert main(_sd_argv(tmp_path / "o", tiny_sd, _captions(tmp_path, ["a bag"]))) == 2
    assert "pip install parclip[synth]" in capsys.readouterr().err
    assert main(_sd_argv(tmp_path / "o", tmp_path, _captions(tmp_path, ["a bag"]))) == 2
    assert "not a saved diffusers pipeline" in capsys.readouterr().err
