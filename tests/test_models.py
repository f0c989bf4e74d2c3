"""parclip.models: offline building, safe and strict checkpoint loading, open_clip-compatible export."""
import argparse
import fractions
import json
import os
import pickle
import shlex
import socket
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from parclip import models as M
from parclip.models.checkpoints import uses_quick_gelu

MICRO = "parclip-micro"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def fresh_micro(seed=7, **kw):
    torch.manual_seed(seed)
    return M.create_model(MICRO, **kw)[0]


def assert_same(sd_a, sd_b):
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k].float(), sd_b[k].float()), k


def embeddings(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(3, 3, 28, 28, generator=g)
    tok = M.get_tokenizer(MICRO)(["a photo of a shirt", "a boot", "a bag"])
    with torch.no_grad():
        return model.encode_image(img), model.encode_text(tok)


# ------------------------------------------------------------------------------------------------------------- build
def test_build_own_config_offline(micro):
    model, pp, _ = micro
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert pp["size"] == 28 and pp["mean"] == [0.286] * 3 and pp["std"] == [0.353] * 3  # from preprocess.json
    assert {"parclip-micro", "parclip-tiny", "ViT-B-32", "RN50-quickgelu"} <= set(M.list_model_names())
    tok = M.get_tokenizer(MICRO)(["a photo of a banana"])
    assert tok.shape == (1, 16) and tok[0, 0] == 49406


def test_slash_names_and_real_architecture_without_network():
    assert M.model_config("ViT-B/32-quickgelu") == M.model_config("ViT-B-32-quickgelu")
    assert M.model_config("ViT-L/14@336px") == M.model_config("ViT-L-14-336")
    model, pp = M.create_model("ViT-B/32-quickgelu")
    assert pp["size"] == 224 and uses_quick_gelu(model) is True
    assert model.visual.conv1.weight.shape == (768, 3, 32, 32)
    assert M.get_tokenizer("ViT-B/32")(["x"]).shape == (1, 77)


def test_unknown_name_and_network_sources_refused():
    with pytest.raises(ValueError, match="Did you mean: .*ViT-B-32"):
        M.create_model("ViT-B-32x")
    with pytest.raises(ValueError, match="builds architectures offline"):
        M.create_model("hf-hub:timm/ViT-B-32")
    with pytest.raises(ValueError, match="unknown model"):
        M.get_tokenizer("no-such-model")


@pytest.mark.parametrize("tag", ["openai", "laion2b_s34b_b79k", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"])
def test_pretrained_tags_offline_name_the_tag_the_cache_and_how_to_fill_it(tag, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (conftest sets it too: the tests never download)
    with pytest.raises(M.CheckpointError) as ei:
        M.create_model("ViT-B-32", pretrained=tag, cache_dir=tmp_path / "cache")
    msg = str(ei.value)
    assert repr(tag) in msg and str(tmp_path / "cache") in msg and "HF_HUB_OFFLINE" in msg
    assert "open_clip.create_model('ViT-B-32'" in msg


def test_unknown_tag_and_urls_are_refused_with_the_architecture_s_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(M.CheckpointError, match="not an open_clip pretrained tag of ViT-B-32 .its tags: .*openai"):
        M.create_model("ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(M.CheckpointError, match="not an open_clip pretrained tag"):
        M.create_model("ViT-B-32", pretrained="https://x.org/w.pt")


def _fill_hub_cache(cache, repo: str, filename: str, payload: bytes):
    """What huggingface_hub leaves after a download: refs/main naming a snapshot that holds the file."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(payload)
    return snap / filename


def test_a_tag_and_an_hf_hub_repo_load_from_open_clip_s_cache_weights_only(tmp_path, monkeypatch):
    """A tag of the architecture goes through open_clip's download path, which (offline) reads the cache the test
    filled; the weights then load like a file (safetensors / weights-only), with the tag's preprocessing."""
    from open_clip import pretrained as ocp
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = M.create_model(MICRO)
    torch.nn.init.normal_(model.text_projection)
    sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    tmpfile = tmp_path / "w.safetensors"
    save_file(sd, tmpfile)
    cache = tmp_path / "hub"
    _fill_hub_cache(cache, "parclip/micro-test", "open_clip_model.safetensors", tmpfile.read_bytes())
    monkeypatch.setitem(ocp._PRETRAINED, MICRO, {"testtag": ocp._pcfg(hf_hub="parclip/micro-test/",
                                                                        mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))})
    for pretrained in ("testtag", "hf-hub:parclip/micro-test"):
        loaded, pp = M.create_model(MICRO, pretrained=pretrained, cache_dir=cache)
        assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd), pretrained
        if pretrained == "testtag":
            assert tuple(pp["mean"]) == pytest.approx((0.1, 0.2, 0.3))  # the tag's preprocessing, as open_clip does
    # a pickled .bin in the cache is loaded weights-only: a payload that runs code is refused
    cache2 = tmp_path / "hub2"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.bin"
    torch.save({"x": Evil()}, evil)
    _fill_hub_cache(cache2, "parclip/evil", "open_clip_pytorch_model.bin", evil.read_bytes())
    with pytest.raises(M.CheckpointError):
        M.create_model(MICRO, pretrained="hf-hub:parclip/evil", cache_dir=cache2)


def test_missing_file_is_clear(tmp_path):
    path = tmp_path / "nope" / "ckpt.pt"
    with pytest.raises(FileNotFoundError, match="ckpt.pt") as ei:
        M.create_model(MICRO, pretrained=str(path))
    assert isinstance(ei.value, M.CheckpointError)
    with pytest.raises(M.CheckpointNotFoundError):
        M.load_state_dict(path)


# ------------------------------------------------------------------------------------------------ checkpoint formats
def _write(fmt, sd, path):
    if fmt == "plain":
        torch.save(sd, path)
    elif fmt == "legacy-pickle":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == "release":  # CleanCLIP / PAR release layout
        optim = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.98), "params": [0]}]}
        torch.save({"epoch": 10, "name": "poisoned", "state_dict": {"module." + k: v for k, v in sd.items()},
                    "optimizer": optim}, path)
    elif fmt == "par-train":  # PAR's own training checkpoint pickles an argparse.Namespace
        args = argparse.Namespace(model="ViT-B/32", lr=3e-6, thresh=2.15, batch_size=[512], extra={"a": 1})
        torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {},
                    "scaler": {"scale": 65536.0, "_growth_tracker": 3}, "best_acc1": 0.0, "args": args}, path)
    elif fmt == "safetensors-bin":  # content detection, not the extension
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["plain", "legacy-pickle", "release", "par-train", "safetensors-bin"])
def test_checkpoint_formats_round_trip(fmt, micro, tmp_path):
    src, _, _ = micro
    path = tmp_path / ("ckpt.bin" if fmt == "safetensors-bin" else "ckpt.pt")
    _write(fmt, src.state_dict(), path)
    sd = M.load_state_dict(path)
    assert_same(sd, src.state_dict())
    target = fresh_micro()
    assert not torch.equal(target.visual.proj, src.visual.proj)
    with warnings.catch_warnings():  # release layouts warn about QuickGELU (tested below)
        warnings.simplefilter("ignore", UserWarning)
        M.load_weights(target, path)
        model, _ = M.create_model(MICRO, pretrained=path)
    assert_same(target.state_dict(), src.state_dict())
    assert_same(model.state_dict(), src.state_dict())


def test_non_weight_keys_dropped(micro, tmp_path):
    src, _, _ = micro
    sd = dict(src.state_dict())
    sd.update(attn_mask=torch.zeros(16, 16), input_resolution=torch.tensor(28), context_length=torch.tensor(16),
              vocab_size=torch.tensor(49408))
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "x.pt")
    target = fresh_micro()
    M.load_weights(target, tmp_path / "x.pt")
    assert_same(target.state_dict(), src.state_dict())


def test_release_layout_into_gelu_model_warns_about_quickgelu(micro, tmp_path):
    src, _, _ = micro
    _write("release", src.state_dict(), tmp_path / "r.pt")
    with pytest.warns(UserWarning, match="OpenAI CLIP.*-quickgelu"):
        M.load_weights(fresh_micro(), tmp_path / "r.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.load_weights(fresh_micro(force_quick_gelu=True), tmp_path / "r.pt")


# ---------------------------------------------------------------------------------------------------- strict loading
def test_architecture_mismatch_names_keys_and_the_fitting_architecture(micro, tmp_path):
    src, _, _ = micro
    torch.save(src.state_dict(), tmp_path / "micro.pt")
    torch.manual_seed(0)
    tiny, _ = M.create_model("parclip-tiny")
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with pytest.raises(M.CheckpointMismatchError) as ei:
        M.load_weights(tiny, tmp_path / "micro.pt")
    msg = str(ei.value)
    assert "missing from the checkpoint (24)" in msg and "visual.transformer.resblocks.2" in msg
    assert "shape mismatches" in msg and "visual.conv1.weight: checkpoint [64, 3, 7, 7] vs model [128, 3, 7, 7]" in msg
    assert "match architecture parclip-micro" in msg and "--model" in msg
    assert len(ei.value.missing) == 24 and "visual.conv1.weight" in ei.value.mismatched
    assert_same(tiny.state_dict(), before)  # nothing was loaded
    with pytest.raises(M.CheckpointMismatchError):  # create_model never returns a random model instead
        M.create_model("parclip-tiny", pretrained=tmp_path / "micro.pt")


def test_removed_and_renamed_keys(micro, tmp_path):
    src, _, _ = micro
    sd = dict(src.state_dict())
    del sd["ln_final.bias"]
    sd["visual.projection"] = sd.pop("visual.proj")
    torch.save({"state_dict": sd}, tmp_path / "x.pt")
    with pytest.raises(M.CheckpointMismatchError) as ei:
        M.load_weights(fresh_micro(), tmp_path / "x.pt")
    e = ei.value
    assert sorted(e.missing) == ["ln_final.bias", "visual.proj"] and e.unexpected == ["visual.projection"]
    assert "missing from the checkpoint (2): " in str(e) and "unexpected in the checkpoint (1): visual.projection" in str(e)


def test_foreign_prefix_hint(micro, tmp_path):
    src, _, _ = micro
    torch.save({"model." + k: v for k, v in src.state_dict().items()}, tmp_path / "x.pt")
    with pytest.raises(M.CheckpointMismatchError, match=r"extra prefix 'model\.'"):
        M.load_weights(fresh_micro(), tmp_path / "x.pt")


# ------------------------------------------------------------------------------------------------------------ safety
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_payload_is_live(tmp_path):
    """Guard for the test below: the crafted pickle really runs code when unpickled naively."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "torch.save-legacy", "raw-pickle"])
def test_malicious_pickle_not_executed(how, micro, tmp_path):
    src, _, _ = micro
    marker = tmp_path / "pwned"
    obj = {"state_dict": dict(src.state_dict()), "hook": _Payload(marker)}
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(obj, path)
    elif how == "torch.save-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=4))
    for call in (lambda: M.load_state_dict(path), lambda: M.create_model(MICRO, pretrained=path)):
        with pytest.raises(M.UnsafeCheckpointError) as ei:
            call()
        msg = str(ei.value)
        assert "posix.system" in msg and "--allow-unsafe-load" in msg and "safetensors" in msg
        assert "refuses to run code" in msg
    assert not marker.exists()


def test_unlisted_global_needs_opt_in(micro, tmp_path):
    src, _, _ = micro
    path = tmp_path / "c.pt"
    torch.save({"state_dict": dict(src.state_dict()), "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(M.UnsafeCheckpointError, match=r"fractions\.Fraction"):
        M.load_state_dict(path)
    assert_same(M.load_state_dict(path, allow_unsafe_load=True), src.state_dict())


def test_torchscript_archive_needs_opt_in(micro, tmp_path):
    src, _, _ = micro
    img, tok = torch.zeros(1, 3, 28, 28), M.get_tokenizer(MICRO)(["x"])
    path = tmp_path / "jit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(src, (img, tok), check_trace=False), str(path))
    with pytest.raises(M.UnsafeCheckpointError, match="TorchScript"):
        M.load_state_dict(path)
    with pytest.raises(M.UnsafeCheckpointError, match="--allow-unsafe-load"):
        M.create_model(MICRO, pretrained=path)
    target = fresh_micro()
    with pytest.warns(UserWarning, match="QuickGELU"):  # OpenAI JIT weights are QuickGELU ones
        M.load_weights(target, path, allow_unsafe_load=True)
    assert_same(target.state_dict(), src.state_dict())  # attn_mask and friends dropped, the rest identical


# -------------------------------------------------------------------------------------------------------- bad files
def test_garbage_truncated_and_empty_files(micro, tmp_path):
    src, _, _ = micro
    rng = np.random.default_rng(0)
    (tmp_path / "garbage.pt").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(src.state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    torch.save(src.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "legacy.pt").read_bytes()
    (tmp_path / "trunc_legacy.pt").write_bytes(data[:300])
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 1000])
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")

    expect = {"garbage.pt": "neither a torch checkpoint", "empty.pt": "empty", "trunc.pt": "truncated",
              "trunc_legacy.pt": "truncated", "trunc.safetensors": "truncated",
              "bad.safetensors": "not a valid safetensors header"}
    for name, words in expect.items():
        with pytest.raises(M.CheckpointError, match=words) as ei:
            M.load_state_dict(tmp_path / name)
        assert not isinstance(ei.value, M.UnsafeCheckpointError), name
        assert name in str(ei.value)


def test_non_state_dict_contents(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(M.CheckpointError, match="holds a list"):
        M.load_state_dict(tmp_path / "list.pt")
    torch.save({"epoch": 3, "note": "hi"}, tmp_path / "meta.pt")
    with pytest.raises(M.CheckpointError, match="top-level keys: \\['epoch', 'note'\\]"):
        M.load_state_dict(tmp_path / "meta.pt")


# ----------------------------------------------------------------------------------------------- export / local-dir
@pytest.mark.parametrize("quick", [False, True])
def test_save_model_loads_in_open_clip_with_identical_embeddings(quick, tmp_path):
    torch.manual_seed(5)
    model, pp = M.create_model(MICRO, force_quick_gelu=quick)
    out = M.save_model(model, tmp_path / "export", model_name=MICRO, preprocess_cfg=pp, force_quick_gelu=quick)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"].get("quick_gelu", False) is quick
    assert cfg["preprocess_cfg"]["mean"] == [0.286] * 3

    theirs = open_clip.create_model("local-dir:" + str(out)).eval()
    ours, ours_pp = M.create_model("local-dir:" + str(out))
    ref = embeddings(model)
    for other in (theirs, ours):
        for a, b in zip(ref, embeddings(other)):
            assert torch.equal(a, b)
    assert ours_pp == pp
    assert theirs.visual.preprocess_cfg["mean"] == (0.286,) * 3 or list(theirs.visual.preprocess_cfg["mean"]) == [0.286] * 3
    assert M.get_tokenizer("local-dir:" + str(out))(["a"]).shape == (1, 16)
    assert M.model_config("local-dir:" + str(out)) == cfg["model_cfg"]
    target = fresh_micro()
    M.load_weights(target, out / "open_clip_model.safetensors")
    assert_same(target.state_dict(), model.state_dict())
    assert_same(M.load_state_dict("local-dir:" + str(out)), model.state_dict())


def test_save_model_detects_quickgelu_and_wrong_name(micro, tmp_path):
    torch.manual_seed(5)
    quick_model, pp = M.create_model(MICRO, force_quick_gelu=True)
    out = M.save_model(quick_model, tmp_path / "a", model_name=MICRO, preprocess_cfg=pp)  # flag not repeated
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["quick_gelu"] is True
    gelu_model, _, _ = micro
    with pytest.raises(ValueError, match="uses GELU"):
        M.save_model(gelu_model, tmp_path / "b", model_name=MICRO, preprocess_cfg=pp, force_quick_gelu=True)
    with pytest.raises(M.CheckpointMismatchError, match="parclip-micro"):
        M.save_model(gelu_model, tmp_path / "c", model_name="parclip-tiny", preprocess_cfg=pp)
    assert not (tmp_path / "c" / "open_clip_model.safetensors").exists()


def test_local_dir_errors(micro, tmp_path):
    with pytest.raises(M.CheckpointNotFoundError, match="nowhere"):
        M.create_model("local-dir:" + str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.CheckpointError, match="open_clip_config.json is missing"):
        M.create_model("local-dir:" + str(tmp_path / "empty"))
    model, pp, _ = micro
    out = M.save_model(model, tmp_path / "x", model_name=MICRO, preprocess_cfg=pp)
    (out / "open_clip_model.safetensors").unlink()
    with pytest.raises(M.CheckpointError, match="no weights in model folder"):
        M.create_model("local-dir:" + str(out))
    (out / "open_clip_config.json").write_text('{"preprocess_cfg": {}}')
    with pytest.raises(M.CheckpointError, match="no 'model_cfg'"):
        M.model_config("local-dir:" + str(out))


# ------------------------------------------------------------------------------------------------------- transform
def test_eval_transform_shape_and_normalization(micro):
    _, pp, _ = micro
    tf = M.eval_transform(pp)
    x = tf(Image.new("RGB", (60, 40), (100, 100, 100)))
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (100 / 255 - 0.286) / 0.353), atol=1e-5)
    gray = tf(Image.new("L", (28, 28), 0))  # greyscale becomes 3 channels
    assert gray.shape == (3, 28, 28) and torch.allclose(gray, torch.full_like(gray, -0.286 / 0.353), atol=1e-5)
    big = M.eval_transform({**pp, "size": 56})(Image.new("RGB", (100, 80)))
    assert big.shape == (3, 56, 56)
    with pytest.raises(ValueError, match="unknown preprocess_cfg keys"):
        M.eval_transform({**pp, "means": [0.5] * 3})


def test_denormalize_inverts_normalize_with_the_same_statistics():
    from parclip.models import denormalize, normalize

    x = torch.rand(2, 3, 4, 4)
    for cfg in ({"mean": [0.2, 0.3, 0.4], "std": [0.5, 0.6, 0.7]}, {}):  # {}: OpenAI's statistics for both
        assert torch.allclose(denormalize(normalize(x, cfg), cfg), x, atol=1e-6)
    assert not torch.allclose(normalize(x, {}), x)
