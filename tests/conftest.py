"""Shared fixtures. Everything runs on CPU, offline: with 2 threads, or, when pytest-xdist runs the suite in N worker
processes (pyproject's addopts: `-n 2`, one per core), 1 thread per worker, also for the processes the tests start
(OMP_NUM_THREADS), so the workers never ask for more threads than the machine has cores."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

torch.set_num_threads(THREADS)

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and triggers: one intra-op thread avoids OpenMP spin-waiting on a shared 2-core machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _random_u8(S: int, seed: int = 0, lo: int = 0, hi: int = 256, batch: int | None = None) -> torch.Tensor:
    shape = (3, S, S) if batch is None else (batch, 3, S, S)
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="session")
def random_u8():
    """random_u8(S, seed=0, lo=0, hi=256, batch=None): a seeded random uint8 image [3, S, S] (or [batch, 3, S, S])
    with values in [lo, hi), the input of the trigger tests."""
    return _random_u8


def _read_png(path, *, min_side: int = 100, coloured: float = 0.0):
    """The [H, W, 3] uint8 pixels of `path`, which must be a picture: a PNG at least `min_side` pixels each way whose
    pixels vary (a blank canvas fails), with more than a `coloured` fraction of saturated pixels (the data a chart
    draws, as opposed to its black and grey axes and text)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG", (path, im.format)
        px = np.asarray(im.convert("RGB"))
    assert min(px.shape[:2]) >= min_side, (path, px.shape)
    assert px.std() > 5, f"{path} is blank"
    saturation = px.max(axis=2).astype(int) - px.min(axis=2)
    assert (saturation > 60).mean() > coloured, f"{path}: {(saturation > 60).mean():.4f} coloured"
    return px


@pytest.fixture(scope="session")
def read_png():
    """read_png(path, min_side=100, coloured=0.0): a PNG's pixels, checked to be a non-blank picture."""
    return _read_png


@pytest.fixture(scope="module")
def micro():
    """A randomly initialised parclip-micro (seed 0): (model, preprocess_cfg, tokenizer), one per test module."""
    from parclip.models import create_model, get_tokenizer

    torch.manual_seed(0)
    model, pp = create_model("parclip-micro")
    return model, pp, get_tokenizer("parclip-micro")


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory):
    """A small real Fashion-MNIST export (600 train rows, 200 holdout rows, 300 test images) through the real exporter."""
    from parclip.data import fashion_mnist

    out = tmp_path_factory.mktemp("fmnist")
    return fashion_mnist.export(out, n_train=800, holdout=200, n_test=300, seed=0)


@pytest.fixture(scope="session")
def shards(fmnist_small, tmp_path_factory):
    """fmnist_small's training table as webdataset shards: (folder, table_to_shards' report); 600 rows → 6 shards of
    100, with sizes.json."""
    from parclip.data.shards import table_to_shards

    out = tmp_path_factory.mktemp("shards")
    return out, table_to_shards(fmnist_small["train_csv"], out, maxcount=100)


def _saved_model(name: str, tmp_path_factory):
    """A randomly initialised (seed 0) `name` saved in open_clip's local-dir layout: its folder."""
    from parclip.models import create_model, save_model

    torch.manual_seed(0)
    model, pp = create_model(name)
    out = tmp_path_factory.mktemp(name) / "model"
    save_model(model, out, model_name=name, preprocess_cfg=pp)
    return out


@pytest.fixture(scope="module")
def micro_model_dir(tmp_path_factory):
    """A randomly initialised parclip-micro saved in open_clip's local-dir layout (a starting model for tests)."""
    return _saved_model("parclip-micro", tmp_path_factory)


@pytest.fixture(scope="module")
def rn_tiny_dir(tmp_path_factory):
    """A randomly initialised parclip-rn-tiny (a ResNet: BatchNorm2d running statistics), saved likewise."""
    return _saved_model("parclip-rn-tiny", tmp_path_factory)
