"""The training loop: steps against a hand computation, the schedule and logit scale it applies, the data order,
BatchNorm modes, multi-process equivalence, resume, bad images, configuration."""
import copy
import csv
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from parclip import train as train_mod
from parclip.cli import build_parser
from parclip.config import config_from_args, make_config
from parclip.data import DataError
from parclip.defences.schedule import lr_at
from parclip.models import create_model, eval_transform, get_tokenizer
from parclip.models.checkpoints import CheckpointError
from parclip.objectives import clip_loss, par_loss
from parclip.train import param_groups, train


def weights(run: Path) -> dict:
    return load_file(run / "model" / "open_clip_model.safetensors")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def linear_adam(**kw):
    """With a huge ε, AdamW's update is lr·m̂/ε: linear in the gradients, so equal updates mean equal gradients
    (a plain Adam step would hide a gradient scaled by the world size)."""
    return dict(lr=10.0, eps=1e4, wd=0.0, schedule="constant", **kw)


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def first_rows(table, n, preprocess, tokenizer):
    """The first n rows of a caption table as (images, tokens), read here with PIL and the model's eval transform."""
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))[:n]
    tf = eval_transform(preprocess)
    images = torch.stack([tf(Image.open(Path(table).parent / r["filepath"]).convert("RGB")) for r in rows])
    return images, tokenizer([r["title"] for r in rows])


def hand_steps(model_dir, images, texts, lrs, *, objective, eps, tau=4.0, weight=0.5):
    """The weights after one AdamW step per entry of `lrs` on the same batch, computed directly from the objectives:
    PAR against a separate frozen copy θ0 of the starting model, the logit scale frozen, no weight decay."""
    model, _ = create_model(f"local-dir:{model_dir}")
    frozen = copy.deepcopy(model).requires_grad_(False)
    model.logit_scale.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lrs[0], betas=(0.9, 0.98),
                            eps=eps, weight_decay=0.0)
    model.train()
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        img, txt, scale = model(images, texts)
        if objective == "par":
            with torch.no_grad():
                img0, txt0, _ = frozen(images, texts)
            loss = par_loss(img, txt, img0, txt0, scale.detach(), tau=tau, weight=weight).total
        else:
            loss = clip_loss(img, txt, scale.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_par_steps_equal_a_hand_computation_against_a_frozen_copy(tmp_path, fmnist_small, micro_model_dir):
    """Catches θ0 aliasing the live model (PAR = plain fine-tuning), a learned logit scale in PAR, the lr schedule
    or --par-weight not reaching the update: two real steps must equal two steps computed here from par_loss."""
    table = str(fmnist_small["train_csv"])
    # One 8-image batch per epoch, two epochs: step 1 moves θ away from θ0, so step 2's perturbation term is non-zero.
    # With a huge ε, AdamW's update is lr·m̂/ε (SGD with momentum, step lr/ε): no sign-like amplification of
    # near-zero gradients, so two correct computations agree to float precision.
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=table, train_rows=8, batch_size=8,
                  epochs=2, augment="none", schedule="reference", lr=100.0, lr_decay_ratio=0.5,
                  eps=1e4, lr_end=0.0, warmup_fraction=0.5, wd=0.0, workers=0, output_dir=str(tmp_path), progress=False,
                  log_every=1)
    par_run = train(make_config(objective="par", tau=4.0, par_weight=1.5, name="par", **common))
    ft_run = train(make_config(objective="clip", logit_scale="frozen", name="ft", **common))

    lrs = [lr_at(s, schedule="reference", steps_per_epoch=1, epochs=2, lr=100.0, lr_decay_ratio=0.5, lr_end=0.0,
                 warmup_fraction=0.5) for s in range(2)]
    assert lrs == [100.0, 50.0]  # the schedule matters for this check
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    images, texts = first_rows(table, 8, pp, get_tokenizer(f"local-dir:{micro_model_dir}"))
    by_hand_par = hand_steps(micro_model_dir, images, texts, lrs, objective="par", eps=1e4, tau=4.0, weight=1.5)
    by_hand_ft = hand_steps(micro_model_dir, images, texts, lrs, objective="clip", eps=1e4)

    par, ft = weights(par_run), weights(ft_run)
    gap = max_diff(by_hand_par, by_hand_ft)  # how far PAR's two steps land from plain fine-tuning's
    assert gap > 1e-4
    assert max_diff(par, by_hand_par) < 1e-2 * gap
    assert max_diff(ft, by_hand_ft) < 1e-2 * gap
    assert max_diff(par, ft) > 0.5 * gap  # the PAR run is not a plain fine-tuning run
    # PAR keeps the starting model's logit scale
    assert torch.equal(par["logit_scale"], model.logit_scale.detach())
    # step 2 measured a real distance to θ0 (zero if θ0 were the live model)
    assert [m["step"] for m in metrics(par_run)] == [1, 2] and metrics(par_run)[1]["dist_img"] > 1e-3


def test_logit_scale_is_frozen_by_par_and_learned_by_clip(tmp_path, fmnist_small, micro_model_dir):
    """Catches PAR learning the logit scale (its default is frozen, as the reference) or CLIP no longer learning it."""
    start = create_model(f"local-dir:{micro_model_dir}")[0].logit_scale.detach()
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]),
                  train_rows=8, batch_size=8, epochs=1, lr=1e-2, lr_decay_ratio=1.0, warmup=0, workers=0,
                  output_dir=str(tmp_path), progress=False, log_every=1)
    par = train(make_config(objective="par", name="par", **common))
    clip = train(make_config(objective="clip", name="clip", **common))
    assert torch.equal(weights(par)["logit_scale"], start)
    assert (weights(clip)["logit_scale"] - start).abs().item() > 1e-3


def test_optimizer_uses_the_scheduled_lr_at_every_step(tmp_path, fmnist_small, micro_model_dir, monkeypatch):
    """Catches a loop that logs the schedule but steps with another lr (e.g. the peak rate throughout)."""
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    # 2 steps per epoch × 3 epochs, cosine with half of training as warm-up: 3 rising steps, then the decay
    cfg = make_config(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]),
                      objective="clip", train_rows=8, batch_size=4, epochs=3, schedule="cosine", lr=1e-3,
                      lr_end=0.0, warmup_fraction=0.5, workers=0, output_dir=str(tmp_path), progress=False,
                      log_every=1, name="lr")
    run = train(cfg)
    expected = [lr_at(s, schedule="cosine", steps_per_epoch=2, epochs=3, lr=1e-3, lr_end=0.0, warmup_fraction=0.5)
                for s in range(6)]
    assert len(set(expected)) > 3
    assert seen == [[lr, lr] for lr in expected]  # both parameter groups, every step
    logged = metrics(run)
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert [m["lr"] for m in logged] == pytest.approx(expected, rel=1e-12)  # the line for step s logs step s-1's lr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(config: Path, nproc: int = 2) -> None:
    """`parclip train --config CONFIG` in `nproc` gloo processes, launched by torchrun exactly as a user would."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(free_port()), "-m", "parclip", "train", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# every defence, with settings that make its own mechanism act within the test's two steps
OBJECTIVES = {"par": dict(tau=4.0), "clip": {}, "cleanclip": {},
              "roclip": dict(roclip_every=1, roclip_pool_size=16)}  # swap in the first epoch; the pool = one batch


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(tmp_path, fmnist_small, micro_model_dir,
                                                                        objective):
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]), objective=objective,
                  epochs=1, train_rows=32, workers=0, output_dir=str(tmp_path), progress=False,
                  log_every=1, **OBJECTIVES[objective], **linear_adam())
    # two processes, 8 images each, launched by torchrun exactly as a user would
    cfg2 = dict(common, batch_size=8, name="w2")
    (tmp_path / "w2.yaml").write_text(yaml.safe_dump(cfg2))
    torchrun_train(tmp_path / "w2.yaml")
    # one process, 16 images per step
    run1 = train(make_config(**dict(common, batch_size=16, name="w1")))
    run2 = tmp_path / "w2"

    m1, m2 = metrics(run1), metrics(run2)
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):  # the same global batch gives the same loss
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    w0, w1, w2 = load_file(micro_model_dir / "open_clip_model.safetensors"), weights(run1), weights(run2)
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w0)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w0)
    assert moved > 1e-4  # the update is lr·m̂/ε, linear in the gradient (RoCLIP moves the image tower only)
    assert diff < 1e-3 * moved, (diff, moved)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_accumulated_micro_batches_equal_one_large_batch(tmp_path, fmnist_small, micro_model_dir, objective):
    """--accum-freq 4 with batch 4 gives the losses and the update of batch 16 (the loss is over the whole accumulated
    batch, not an average of four small-batch losses); RoCLIP's pool moves once per step, as with one batch."""
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]), objective=objective,
                  epochs=1, train_rows=32, workers=0, output_dir=str(tmp_path), progress=False,
                  log_every=1, **OBJECTIVES[objective], **linear_adam())
    big = train(make_config(**dict(common, batch_size=16, name="big")))
    acc = train(make_config(**dict(common, batch_size=4, accum_freq=4, name="acc")))
    small = train(make_config(**dict(common, batch_size=4, name="small")))  # what accumulation must not be
    mb, ma = metrics(big), metrics(acc)
    assert len(mb) == len(ma) == 2 and len(metrics(small)) == 8
    for a, b in zip(mb, ma):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    w0, wb, wa, ws = load_file(micro_model_dir / "open_clip_model.safetensors"), weights(big), weights(acc), weights(small)
    moved = max((wb[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 1e-4
    assert max((wb[k] - wa[k]).abs().max().item() for k in w0) < 1e-3 * moved
    assert max((wb[k] - ws[k]).abs().max().item() for k in w0) > 0.1 * moved  # the case discriminates
    if objective == "roclip":
        pool = lambda run: torch.load(run / "checkpoints/latest.pt", weights_only=True)["defence"]  # noqa: E731
        assert pool(big)["text_pool"]["ptr"] == pool(acc)["text_pool"]["ptr"] == 32 % 16
        assert torch.allclose(pool(big)["text_pool"]["bank"], pool(acc)["text_pool"]["bank"], atol=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_accumulating_equal_one_process_on_the_whole_batch(tmp_path, fmnist_small, micro_model_dir):
    """DDP with --accum-freq 2 (gradients synchronised once per step, after the last micro-batch) = one process, batch
    16; the clip objective learns the logit scale, whose gradient must be counted once."""
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]), objective="clip",
                  epochs=1, train_rows=32, workers=0, output_dir=str(tmp_path), progress=False,
                  log_every=1, **linear_adam())
    (tmp_path / "w2.yaml").write_text(yaml.safe_dump(dict(common, batch_size=4, accum_freq=2, name="w2")))
    torchrun_train(tmp_path / "w2.yaml")
    run1 = train(make_config(**dict(common, batch_size=16, name="w1")))
    for a, b in zip(metrics(run1), metrics(tmp_path / "w2"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    w0, w1, w2 = load_file(micro_model_dir / "open_clip_model.safetensors"), weights(run1), weights(tmp_path / "w2")
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 1e-4 and max((w1[k] - w2[k]).abs().max().item() for k in w0) < 1e-3 * moved
    assert (w1["logit_scale"] - w0["logit_scale"]).abs().item() > 0  # the scale learned, and equally (above)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["grad_checkpointing", "torch_compile"])
def test_gradient_checkpointing_and_compile_give_the_same_training(tmp_path, fmnist_small, micro_model_dir, option,
                                                                  monkeypatch):
    """Both change how the step is computed, not what it computes."""
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]), objective="par",
                  epochs=1, batch_size=8, train_rows=16, workers=0, output_dir=str(tmp_path), progress=False,
                  log_every=1, tau=4.0, **linear_adam())
    plain = train(make_config(**common, name="plain"))
    if option == "torch_compile":  # inductor's C++ build takes ~30 s on 2 cores; the wiring is the same with aot_eager
        real = torch.compile
        monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="aot_eager", **kw))
    other = train(make_config(**common, name="other", **{option: True}))
    w0, wp, wo = load_file(micro_model_dir / "open_clip_model.safetensors"), weights(plain), weights(other)
    moved = max((wp[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 1e-4 and max((wp[k] - wo[k]).abs().max().item() for k in w0) < 1e-3 * moved
    assert [m["loss"] for m in metrics(plain)] == pytest.approx([m["loss"] for m in metrics(other)], abs=1e-5)


def test_accum_freq_must_be_a_positive_integer_and_fit_the_data(tmp_path, fmnist_small, micro_model_dir):
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]), objective="clip",
                  train_rows=32, workers=0, output_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="--accum-freq must be an int >= 1, got 0"):
        train(make_config(**common, batch_size=4, accum_freq=0))
    with pytest.raises(DataError, match="--accum-freq 16"):
        train(make_config(**common, batch_size=4, accum_freq=16))


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra", [
    ("par", dict(tau=1.0, augment="par")),
    # PAR's latch is state: once a distance passed τ its term stays off, so the resumed run must know it
    ("par", dict(tau=1e-3, tau_text=4.0, augment="par", par_latch=True)),
    # RoCLIP's pool is state: filled in epoch 1 (prefill), used in epoch 2; the checkpoint at step 3 must carry it
    ("roclip", dict(roclip_every=2, roclip_pool_size=12, roclip_prefill=True, schedule="cosine", warmup=2)),
])
def test_resume_after_interruption_gives_the_same_model(tmp_path, fmnist_small, micro_model_dir, monkeypatch, objective,
                                                        extra):
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]), objective=objective,
                  epochs=2, batch_size=8, train_rows=32, workers=0, output_dir=str(tmp_path),
                  progress=False, lr=1e-3, lr_decay_ratio=1.0, save_every=3, **extra)
    straight = train(make_config(name="straight", **common))

    real_save = train_mod._save_checkpoint

    def save_then_die(run_dir, model, optimizer, scaler, step, *args):
        real_save(run_dir, model, optimizer, scaler, step, *args)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(name="interrupted", **common))
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    saved = torch.load(tmp_path / "interrupted/checkpoints/latest.pt", weights_only=True)
    assert saved["step"] == 3
    if extra.get("par_latch"):  # the image distance passed τ in step 1: the latch is in the checkpoint
        assert saved["defence"] == {"latched": {"img": True, "txt": False}}
    resumed = train(make_config(name="interrupted", **common))

    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(resumed)][-1] == 8


def images_seen(cfg) -> list[list[int]]:
    """Train with `cfg`; per optimiser step, a fingerprint of each image the model was given, in order (read by a
    forward hook on the CLIP model, so whatever path the loop takes to it)."""
    import zlib

    import open_clip

    steps = []

    def record(module, args):
        if isinstance(module, (open_clip.CLIP, open_clip.CustomTextCLIP)):
            steps.append([zlib.crc32(x.numpy().tobytes()) for x in args[0]])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(cfg)
    finally:
        handle.remove()
    return steps


@pytest.mark.parametrize("source", ["table", "shards"])
def test_every_epoch_has_its_own_order_and_a_seed_repeats_it(tmp_path, fmnist_small, shards, micro_model_dir,
                                                             source):
    """Catches the epoch not reaching the table's sampler or the shard stream (the same order every epoch), or the
    seed not reaching them: two epochs of 2 steps differ in order, the same seed repeats them, another seed does
    not; over a table every epoch shows each of its rows once."""
    data = str(fmnist_small["train_csv"]) if source == "table" else f"{shards[0]}/{{00000..00005}}.tar"
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=data, objective="clip", augment="none",
                  batch_size=8, lr=1e-4, workers=0, output_dir=str(tmp_path), progress=False, shuffle_buffer=16,
                  **({"train_rows": 16} if source == "table" else {"train_num_samples": 16}))
    first = images_seen(make_config(name="a", epochs=2, **common))
    epochs = [first[0] + first[1], first[2] + first[3]]
    assert len(first) == 4 and epochs[0] != epochs[1]
    if source == "table":
        assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 16
    assert images_seen(make_config(name="b", epochs=2, **common)) == first
    assert images_seen(make_config(name="c", epochs=1, seed=1, **common)) != first[:2]


def test_a_table_kept_in_memory_gives_the_batches_and_the_model_of_one_read_every_epoch(tmp_path, fmnist_small,
                                                                                       micro_model_dir):
    """Catches the in-memory copy of a table (--memory-gib) changing what is trained: over two epochs with a corrupt
    image (replaced by the next row and counted), every step's images, the bad-image count and the final weights equal
    those of the run that decodes the table every epoch (--memory-gib 0): for the eval transform (all fixed) and for
    PAR's augmentation, whose random part is drawn per image after the same seeding (against a run with a worker, so
    the seeding cannot touch the loop's own random numbers). RoCLIP's augmentation (not split) and a budget below
    the table's size read the files."""
    lines = Path(fmnist_small["train_csv"]).read_text().splitlines()[:25]
    root = Path(fmnist_small["train_csv"]).parent
    bad = tmp_path / "bad.png"
    bad.write_bytes((root / lines[3].split("\t")[0]).read_bytes()[:40])  # exists, fails to decode
    rows = [lines[0]] + [f"{root / l.split(chr(9))[0]}\t{l.split(chr(9), 1)[1]}" for l in lines[1:]]
    rows[3] = f"{bad}\t{lines[3].split(chr(9), 1)[1]}"
    table = tmp_path / "t.csv"
    table.write_text("\n".join(rows) + "\n")
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(table), objective="clip", augment="none",
                  epochs=2, batch_size=8, lr=1e-3, workers=0, output_dir=str(tmp_path), progress=False, log_every=1,
                  max_bad_fraction=0.2)
    kept = images_seen(make_config(name="kept", **common))
    read = images_seen(make_config(name="read", memory_gib=0, **common))
    assert len(kept) == 6 and kept == read
    log = {run: (tmp_path / run / "out.log").read_text() for run in ("kept", "read")}
    assert "transformed once, into memory" in log["kept"] and "into memory" not in log["read"]
    assert all("2 of 48 images failed to decode" in text for text in log.values())  # row 3, once per epoch
    wk, wr = weights(tmp_path / "kept"), weights(tmp_path / "read")
    assert all(torch.equal(wk[k], wr[k]) for k in wk)
    par = dict(objective="par", augment="par", tau=1.0)
    kept = images_seen(make_config(name="par-kept", **{**common, **par}))
    read = images_seen(make_config(name="par-read", **{**common, **par, "memory_gib": 0, "workers": 1}))
    assert len(kept) == 12 and kept == read  # per step: the trained model's forward and the frozen copy's
    assert "transformed once, into memory" in (tmp_path / "par-kept" / "out.log").read_text()
    wk, wr = weights(tmp_path / "par-kept"), weights(tmp_path / "par-read")
    assert all(torch.equal(wk[k], wr[k]) for k in wk)
    for name, values in (("roclip", dict(objective="roclip", augment="roclip")), ("tight", dict(memory_gib=1e-6))):
        run = train(make_config(**{**common, "epochs": 1, "name": name, **values}))
        assert "into memory" not in (run / "out.log").read_text()


_UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class Payload:
    """An arbitrary pickled object: unpickling it calls _record_unpickling (a stand-in for an attacker's code)."""

    def __reduce__(self):
        return (_record_unpickling, ("payload ran",))


def test_resume_refuses_a_checkpoint_that_is_unsafe_or_does_not_fit(tmp_path, fmnist_small, micro_model_dir):
    """Catches resume loading checkpoints with weights_only=False (which would run pickled code), loading the weights
    non-strictly (a checkpoint missing a weight, or holding one the model lacks, would resume silently) or accepting
    an optimiser state for other parameters: each is a CheckpointError that says what is wrong."""
    cfg = make_config(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]),
                      objective="clip", train_rows=8, batch_size=8, epochs=1, workers=0,
                      output_dir=str(tmp_path), progress=False, name="run")
    ckpt = train(cfg) / "checkpoints" / "latest.pt"
    good = torch.load(ckpt, weights_only=True)
    _UNPICKLED.clear()
    torch.save(dict(good, note=Payload()), ckpt)
    with pytest.raises(CheckpointError, match="refused, never run") as ei:
        train(cfg)  # the same name: resumes from latest.pt
    assert isinstance(ei.value.__cause__, pickle.UnpicklingError) and _UNPICKLED == []

    missing = "visual.proj"
    assert missing in good["state_dict"]
    groups = [dict(g) for g in good["optimizer"]["param_groups"]]
    groups[0]["params"] = groups[0]["params"][1:]  # one parameter fewer in the decayed group
    for state, named in [
            (dict(good, state_dict={k: v for k, v in good["state_dict"].items() if k != missing}), missing),
            (dict(good, state_dict={**good["state_dict"], "visual.extra": torch.zeros(2)}), "visual.extra"),
            (dict(good, optimizer=dict(good["optimizer"], param_groups=groups)), "parameter group")]:
        torch.save(state, ckpt)
        with pytest.raises(CheckpointError, match="does not fit") as ei:
            train(cfg)
        assert named in str(ei.value)  # the message itself names the key, not only the chained error


def test_frozen_batchnorm_keeps_every_running_statistic_and_train_mode_moves_them(tmp_path, fmnist_small,
                                                                                  rn_tiny_dir):
    """Catches a frozen-BatchNorm switch that misses some BatchNorm modules (BatchNorm2d, all of a ResNet's) or is
    not applied: with bn_mode frozen (PAR's default, or asked for) no running mean, variance or batch count moves;
    with bn_mode train every one does, and validation between steps (which puts the model in eval mode) changes
    nothing of that."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    start = load_file(rn_tiny_dir / "open_clip_model.safetensors")
    bn = [k for k in start if k.endswith(stats)]
    assert len(bn) > 30
    common = dict(model=f"local-dir:{rn_tiny_dir}", train_data=str(fmnist_small["train_csv"]), train_rows=16,
                  batch_size=8, epochs=1, lr=1e-3, workers=0, output_dir=str(tmp_path), progress=False)
    for name, kw in {"par": dict(objective="par"), "clip-frozen": dict(objective="clip", bn_mode="frozen")}.items():
        w = weights(train(make_config(name=name, **common, **kw)))
        assert [k for k in bn if not torch.equal(w[k], start[k])] == [], name
        assert max((w[k] - start[k]).abs().max().item() for k in start if k not in bn) > 1e-4  # it did train
    moving = weights(train(make_config(name="par-train", objective="par", bn_mode="train", **common)))
    assert [k for k in bn if torch.equal(moving[k], start[k])] == []
    validated = weights(train(make_config(name="par-train-val", objective="par", bn_mode="train", val_every=1,
                                          imagenet_val=str(fmnist_small["test_dir"]), **common)))
    assert all(torch.equal(moving[k], validated[k]) for k in start)


def test_corrupt_images_are_counted_and_the_bad_image_limit_is_exact(tmp_path, fmnist_small, micro_model_dir):
    """Catches a loosened (or tightened) --max-bad-fraction check: 1 undecodable image of 32 seen stops a run whose
    limit is below 1/32, names the file, and passes one whose limit is exactly 1/32, which says so in its log."""
    lines = Path(fmnist_small["train_csv"]).read_text().splitlines()[:33]
    root = Path(fmnist_small["train_csv"]).parent
    bad = tmp_path / "bad.png"
    bad.write_bytes((root / lines[1].split("\t")[0]).read_bytes()[:40])  # truncated PNG: exists, fails to decode
    rows = [lines[0]] + [f"{root / l.split(chr(9))[0]}\t{l.split(chr(9), 1)[1]}" for l in lines[1:]]  # tab-separated
    rows[1] = f"{bad}\t{lines[1].split(chr(9), 1)[1]}"
    table = tmp_path / "t.csv"
    table.write_text("\n".join(rows) + "\n")
    # one step over all 32 rows, so the check sees exactly 1 bad of 32
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(table), objective="clip", epochs=1,
                  batch_size=32, workers=0, output_dir=str(tmp_path), progress=False, log_every=100)
    with pytest.raises(DataError, match="bad.png"):
        train(make_config(name="below", max_bad_fraction=0.9 / 32, **common))
    run = train(make_config(name="at", max_bad_fraction=1 / 32, **common))
    assert (run / "model" / "open_clip_model.safetensors").is_file()
    assert "1 of 32 images failed to decode" in (run / "out.log").read_text()


def test_yaml_config_with_cli_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("tau: 1.5\nlr: 0.01\nbatch-size: 64\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--lr", "0.5"])
    cfg = config_from_args(args)
    assert (cfg.tau, cfg.lr, cfg.batch_size, cfg.objective) == (1.5, 0.5, 64, "par")
    (tmp_path / "bad.yaml").write_text("taux: 1\n")
    with pytest.raises(ValueError, match="taux"):
        config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "bad.yaml")]))
    clip = config_from_args(build_parser().parse_args(["train", "--objective", "clip"]))
    assert clip.schedule == "cosine" and clip.wd == 0.1  # objective-specific defaults


def test_weight_decay_only_on_matrices():
    model, _ = create_model("parclip-micro")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"])
    assert any(p is model.token_embedding.weight for p in decay["params"])
    assert any(p is model.logit_scale for p in no_decay["params"])


def test_a_run_takes_down_the_process_group_it_set_up_and_leaves_the_callers_alone(tmp_path, fmnist_small,
                                                                                   micro_model_dir, monkeypatch):
    import torch.distributed as dist

    from parclip.utils import distributed as pdist

    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]), objective="clip",
                  epochs=1, batch_size=16, train_rows=32, workers=0, output_dir=str(tmp_path), progress=False)
    one_process_group = lambda: dist.init_process_group(  # noqa: E731
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)

    def set_up_here(device):  # init_distributed under torchrun, with a group of one process
        one_process_group()
        return pdist.DistInfo(owns_group=True)

    try:
        monkeypatch.setattr(pdist, "init_distributed", set_up_here)
        train(make_config(name="own", **common))
        assert not dist.is_initialized()
        monkeypatch.undo()
        one_process_group()  # the caller's own group: the run uses it and leaves it
        train(make_config(name="callers", **common))
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_par_without_a_starting_model_is_refused(tmp_path, fmnist_small):
    with pytest.raises(ValueError, match="--pretrained"):
        train(make_config(model="parclip-micro", train_data=str(fmnist_small["train_csv"]), output_dir=str(tmp_path)))


def test_bf16_autocast_path_runs_on_cpu(tmp_path, fmnist_small, micro_model_dir):
    run = train(make_config(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]),
                            objective="par", precision="amp_bf16", epochs=1, batch_size=16, train_rows=32,
                            workers=0, output_dir=str(tmp_path), progress=False, log_every=1, name="bf16"))
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    w = weights(run)
    assert all(v.dtype == torch.float32 for v in w.values())  # master weights stay fp32


@pytest.mark.slow
def test_validation_during_training_logs_clean_accuracy_and_asr_and_changes_nothing(tmp_path, fmnist_small,
                                                                                    micro_model_dir):
    """Catches validation that measures another model than the one trained, that changes the training (the weights
    must equal those of a run without validation), or that is not run at the epoch ends (the default)."""
    from parclip.attacks.triggers import build_triggers
    from parclip.evaluation import evaluate
    from parclip.models import get_tokenizer
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]), objective="par",
                  epochs=2, batch_size=16, train_rows=32, workers=0, output_dir=str(tmp_path),
                  progress=False, log_every=1)
    plain = train(make_config(name="plain", **common))
    cfg = make_config(name="val", imagenet_val=str(fmnist_small["test_dir"]), val_attack="badnet_rs", val_target="bag",
                      val_templates="fashion", val_trigger_param="patch_size=12, uint8_mode=clamp", **common)
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    (trigger,) = train_mod._Validator(cfg, pp, None, "cpu").triggers  # --val-trigger-param reaches the trigger
    assert trigger.params()["patch_size"] == 12 and trigger.params()["uint8_mode"] == "clamp"
    run = train(cfg)
    assert all(torch.equal(weights(plain)[k], v) for k, v in weights(run).items())
    val = [m for m in metrics(run) if "val_clean_top1" in m]
    assert [m["step"] for m in val] == [2, 4] and all(0 <= m["val_asr"] <= 100 for m in val)
    model, pp = create_model(f"local-dir:{run / 'model'}")
    r = evaluate(model, pp, get_tokenizer(f"local-dir:{run / 'model'}"), fmnist_small["test_dir"],
                 attacks=build_triggers(["badnet_rs"], 32, {"patch_size": 12, "uint8_mode": "clamp"}), target="bag",
                 templates="fashion", workers=0,
                 progress=False)
    assert val[-1]["val_clean_top1"] == pytest.approx(r["clean_top1"]) and val[-1]["val_asr"] == pytest.approx(r["asr"])
    with pytest.raises(ValueError, match="--val-target"):
        train(make_config(name="bad", imagenet_val=str(fmnist_small["test_dir"]), val_attack="badnet_rs", **common))


@pytest.mark.parametrize("precision,dtype", [("amp_bf16", torch.bfloat16), ("amp", torch.float16)])
def test_frozen_copy_is_cheap_and_computes_what_autocast_computes(micro_model_dir, precision, dtype):
    """Catches a frozen copy that keeps gradients or training mode, stores fp32 matrix weights under AMP (twice the
    memory, a cast every step), casts its normalisations too, or whose embeddings drift from the fp32 copy's under the
    same autocast; with fp32 it must be an exact copy that leaves the trained model alone."""
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    model.train()
    images = torch.randn(4, 3, 28, 28)
    texts = get_tokenizer(f"local-dir:{micro_model_dir}")(["a shirt", "a shoe", "a bag", "a coat"])
    exact, low = train_mod.frozen_copy(model, "fp32"), train_mod.frozen_copy(model, precision)
    for frozen in (exact, low):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(exact(images, texts)[:2], model.eval()(images, texts)[:2]))
    dtypes = {n: p.dtype for n, p in low.named_parameters()}
    assert dtypes["visual.transformer.resblocks.0.mlp.c_fc.weight"] == dtype
    assert dtypes["transformer.resblocks.0.attn.in_proj_weight"] == dtype
    assert dtypes["visual.ln_post.weight"] == dtypes["ln_final.weight"] == torch.float32
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert nbytes(low) < 0.55 * nbytes(exact)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        for a, b in zip(exact(images, texts)[:2], low(images, texts)[:2]):
            assert (a.float() - b.float()).abs().max() < (2e-2 if dtype == torch.bfloat16 else 3e-3)
