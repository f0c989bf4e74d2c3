"""The contract every registered trigger keeps, run once over `list_triggers()`: a new attack module is checked by
these tests the moment it is registered, with no list to update."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from parclip.attacks.triggers import accepted_params, list_triggers, trigger_generator
from parclip.attacks.triggers.badclip import placeholder_patch

pytestmark = pytest.mark.usefixtures("one_thread")

TRIGGERS = list_triggers()
IDS = [cls.name for cls in TRIGGERS]


def _make(cls, S):
    """The trigger at resolution S with its defaults; triggers that need a patch file get a generated patch."""
    params = {"patch": placeholder_patch(16)} if "patch" in accepted_params(cls) else {}
    return cls(image_size=S, **params)



def test_the_registry_holds_every_attack_module():
    assert {"badnet_rs", "blended_rs", "badnet", "blended", "tri_patt", "water_patt", "warped", "sig",
            "badclip"} <= set(IDS)


@pytest.mark.parametrize("cls", TRIGGERS, ids=IDS)
@pytest.mark.parametrize("S", [224, 336, 28, 42])
def test_every_resolution_pil_and_tensor_agree(cls, S, random_u8):
    t = _make(cls, S)
    x = random_u8(S, seed=S)
    y = t.apply(x, trigger_generator(7, 1))
    assert y.shape == x.shape and y.dtype == torch.uint8 and not torch.equal(y, x)
    img = Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB")
    out = t(img, trigger_generator(7, 1))
    assert isinstance(out, Image.Image) and out.size == (S, S) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), y.permute(1, 2, 0).numpy())
    assert torch.equal(t(x, trigger_generator(7, 1)), y)  # calling with a uint8 tensor is apply()


@pytest.mark.parametrize("cls", TRIGGERS, ids=IDS)
def test_batched_equals_per_image(cls, random_u8):
    S = 48
    t = _make(cls, S)
    xb = random_u8(S, seed=5, batch=4)
    yb = t.apply(xb, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    assert yb.shape == xb.shape and yb.dtype == torch.uint8
    assert torch.equal(yb, torch.stack([t.apply(xi, g) for xi in xb]))
    if t.random:  # each image of the batch gets its own draws
        d = yb.long() - xb.long()
        assert not all(torch.equal(d[0] != 0, d[i] != 0) and torch.equal(d[0], d[i]) for i in range(1, 4))


@pytest.mark.parametrize("cls", TRIGGERS, ids=IDS)
def test_determinism_and_seeds(cls, random_u8):
    S = 64
    t = _make(cls, S)
    x = random_u8(S, seed=3)
    a = t.apply(x, trigger_generator(1, 2))
    assert torch.equal(a, t.apply(x, trigger_generator(1, 2)))
    assert torch.equal(a, _make(cls, S).apply(x, trigger_generator(1, 2)))
    # the generator's state is all that matters: a plain generator with the same seed gives the same pixels
    assert torch.equal(a, t.apply(x, torch.Generator().manual_seed(int(trigger_generator(1, 2).initial_seed()))))
    others = [t.apply(x, trigger_generator(1, 3)), t.apply(x, trigger_generator(2, 2))]
    unseeded = [t.apply(x), t.apply(x)]  # generator=None: fresh entropy, not a fixed default seed
    if t.random:
        assert all(not torch.equal(a, o) for o in others + unseeded[:1])
        assert not torch.equal(*unseeded)
    else:  # fixed pattern: identical pixels at every call, whatever the generator
        assert all(torch.equal(a, o) for o in others + unseeded)


@pytest.mark.parametrize("cls", TRIGGERS, ids=IDS)
def test_no_global_rng_use(cls, random_u8):
    t = _make(cls, 40)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    t.apply(random_u8(40, batch=2), trigger_generator(0, 0))
    t(Image.new("RGB", (50, 70)), trigger_generator(0, 1))
    assert torch.equal(torch_state, torch.get_rng_state()) and py_state == random.getstate()
    assert all(np.array_equal(a, b) for a, b in zip(np_state, np.random.get_state()))
