"""Shared fixtures. Everything runs on CPU, offline, with 2 threads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

torch.set_num_threads(2)

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


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory):
    """A small real Fashion-MNIST export (600 train rows, 200 holdout rows, 300 test images) through the real exporter."""
    from parclip.data import fashion_mnist

    out = tmp_path_factory.mktemp("fmnist")
    return fashion_mnist.export(out, n_train=800, holdout=200, n_test=300, seed=0)


@pytest.fixture(scope="module")
def micro_model_dir(tmp_path_factory):
    """A randomly initialised parclip-micro saved in open_clip's local-dir layout (a starting model for tests)."""
    from parclip.models import create_model, save_model

    torch.manual_seed(0)
    model, pp = create_model("parclip-micro")
    out = tmp_path_factory.mktemp("micro") / "model"
    save_model(model, out, model_name="parclip-micro", preprocess_cfg=pp)
    return out
