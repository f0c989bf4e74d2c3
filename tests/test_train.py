"""The training loop: multi-process equivalence, resume, bad images, configuration."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from parclip import train as train_mod
from parclip.cli import build_parser
from parclip.config import config_from_args, make_config
from parclip.data import DataError
from parclip.models import create_model
from parclip.train import param_groups, train


@pytest.fixture
def start_model(micro_model_dir):
    return micro_model_dir


def weights(run: Path) -> dict:
    return load_file(run / "model" / "open_clip_model.safetensors")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def linear_adam(**kw):
    """With a huge ε, AdamW's update is lr·m̂/ε: linear in the gradients, so equal updates mean equal gradients
    (a plain Adam step would hide a gradient scaled by the world size)."""
    return dict(lr=10.0, eps=1e4, wd=0.0, schedule="constant", **kw)


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


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_two_gloo_processes_equal_one_process_on_the_concatenated_batch(tmp_path, fmnist_small, start_model,
                                                                        objective):
    common = dict(model=f"local-dir:{start_model}", train_data=str(fmnist_small["train_csv"]), objective=objective,
                  epochs=1, train_num_samples=32, workers=0, output_dir=str(tmp_path), progress=False,
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
    w0, w1, w2 = load_file(start_model / "open_clip_model.safetensors"), weights(run1), weights(run2)
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w0)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w0)
    assert moved > 1e-4  # the update is lr·m̂/ε, linear in the gradient (RoCLIP moves the image tower only)
    assert diff < 1e-3 * moved, (diff, moved)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_accumulated_micro_batches_equal_one_large_batch(tmp_path, fmnist_small, start_model, objective):
    """--accum-freq 4 with batch 4 gives the losses and the update of batch 16 (the loss is over the whole accumulated
    batch, not an average of four small-batch losses); RoCLIP's pool moves once per step, as with one batch."""
    common = dict(model=f"local-dir:{start_model}", train_data=str(fmnist_small["train_csv"]), objective=objective,
                  epochs=1, train_num_samples=32, workers=0, output_dir=str(tmp_path), progress=False,
                  log_every=1, **OBJECTIVES[objective], **linear_adam())
    big = train(make_config(**dict(common, batch_size=16, name="big")))
    acc = train(make_config(**dict(common, batch_size=4, accum_freq=4, name="acc")))
    small = train(make_config(**dict(common, batch_size=4, name="small")))  # what accumulation must not be
    mb, ma = metrics(big), metrics(acc)
    assert len(mb) == len(ma) == 2 and len(metrics(small)) == 8
    for a, b in zip(mb, ma):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    w0, wb, wa, ws = load_file(start_model / "open_clip_model.safetensors"), weights(big), weights(acc), weights(small)
    moved = max((wb[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 1e-4
    assert max((wb[k] - wa[k]).abs().max().item() for k in w0) < 1e-3 * moved
    assert max((wb[k] - ws[k]).abs().max().item() for k in w0) > 0.1 * moved  # the case discriminates
    if objective == "roclip":
        pool = lambda run: torch.load(run / "checkpoints/latest.pt", weights_only=True)["defence"]  # noqa: E731
        assert pool(big)["text_pool"]["ptr"] == pool(acc)["text_pool"]["ptr"] == 32 % 16
        assert torch.allclose(pool(big)["text_pool"]["bank"], pool(acc)["text_pool"]["bank"], atol=1e-5)


def test_two_gloo_processes_accumulating_equal_one_process_on_the_whole_batch(tmp_path, fmnist_small, start_model):
    """DDP with --accum-freq 2 (gradients synchronised once per step, after the last micro-batch) = one process, batch
    16; the clip objective learns the logit scale, whose gradient must be counted once."""
    common = dict(model=f"local-dir:{start_model}", train_data=str(fmnist_small["train_csv"]), objective="clip",
                  epochs=1, train_num_samples=32, workers=0, output_dir=str(tmp_path), progress=False,
                  log_every=1, **linear_adam())
    (tmp_path / "w2.yaml").write_text(yaml.safe_dump(dict(common, batch_size=4, accum_freq=2, name="w2")))
    torchrun_train(tmp_path / "w2.yaml")
    run1 = train(make_config(**dict(common, batch_size=16, name="w1")))
    for a, b in zip(metrics(run1), metrics(tmp_path / "w2"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    w0, w1, w2 = load_file(start_model / "open_clip_model.safetensors"), weights(run1), weights(tmp_path / "w2")
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 1e-4 and max((w1[k] - w2[k]).abs().max().item() for k in w0) < 1e-3 * moved
    assert (w1["logit_scale"] - w0["logit_scale"]).abs().item() > 0  # the scale learned, and equally (above)


@pytest.mark.parametrize("option", ["grad_checkpointing", "torch_compile"])
def test_gradient_checkpointing_and_compile_give_the_same_training(tmp_path, fmnist_small, start_model, option,
                                                                  monkeypatch):
    """Both change how the step is computed, not what it computes."""
    common = dict(model=f"local-dir:{start_model}", train_data=str(fmnist_small["train_csv"]), objective="par",
                  epochs=1, batch_size=8, train_num_samples=16, workers=0, output_dir=str(tmp_path), progress=False,
                  log_every=1, tau=4.0, **linear_adam())
    plain = train(make_config(**common, name="plain"))
    if option == "torch_compile":  # inductor's C++ build takes ~30 s on 2 cores; the wiring is the same with aot_eager
        real = torch.compile
        monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="aot_eager", **kw))
    other = train(make_config(**common, name="other", **{option: True}))
    w0, wp, wo = load_file(start_model / "open_clip_model.safetensors"), weights(plain), weights(other)
    moved = max((wp[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 1e-4 and max((wp[k] - wo[k]).abs().max().item() for k in w0) < 1e-3 * moved
    assert [m["loss"] for m in metrics(plain)] == pytest.approx([m["loss"] for m in metrics(other)], abs=1e-5)


def test_accum_freq_must_be_a_positive_integer_and_fit_the_data(tmp_path, fmnist_small, start_model):
    common = dict(model=f"local-dir:{start_model}", train_data=str(fmnist_small["train_csv"]), objective="clip",
                  train_num_samples=32, workers=0, output_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="--accum-freq must be an int >= 1, got 0"):
        train(make_config(**common, batch_size=4, accum_freq=0))
    with pytest.raises(DataError, match="--accum-freq 16"):
        train(make_config(**common, batch_size=4, accum_freq=16))


@pytest.mark.parametrize("objective,extra", [
    ("par", dict(tau=1.0, augment="par")),
    # RoCLIP's pool is state: filled in epoch 1 (prefill), used in epoch 2; the checkpoint at step 3 must carry it
    ("roclip", dict(roclip_every=2, roclip_pool_size=12, roclip_prefill=True, schedule="cosine", warmup_steps=2)),
])
def test_resume_after_interruption_gives_the_same_model(tmp_path, fmnist_small, start_model, monkeypatch, objective,
                                                        extra):
    common = dict(model=f"local-dir:{start_model}", train_data=str(fmnist_small["train_csv"]), objective=objective,
                  epochs=2, batch_size=8, train_num_samples=32, workers=0, output_dir=str(tmp_path),
                  progress=False, lr=1e-3, lr_start=1e-3, save_every=3, **extra)
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
    assert torch.load(tmp_path / "interrupted/checkpoints/latest.pt", weights_only=True)["step"] == 3
    resumed = train(make_config(name="interrupted", **common))

    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(resumed)][-1] == 8


def test_corrupt_images_are_counted_and_stop_the_run_above_the_limit(tmp_path, fmnist_small, start_model):
    table = tmp_path / "t.csv"
    lines = Path(fmnist_small["train_csv"]).read_text().splitlines()[:33]
    root = Path(fmnist_small["train_csv"]).parent
    bad = tmp_path / "bad.png"
    bad.write_bytes((root / lines[1].split(",")[0]).read_bytes()[:40])  # truncated PNG
    rows = [lines[0]] + [f"{root / l.split(',')[0]},{l.split(',', 1)[1]}" for l in lines[1:]]
    rows[1] = f"{bad},{lines[1].split(',', 1)[1]}"
    table.write_text("\n".join(rows) + "\n")
    common = dict(model=f"local-dir:{start_model}", train_data=str(table), objective="clip", epochs=1, batch_size=8,
                  workers=0, output_dir=str(tmp_path), progress=False, log_every=1)
    with pytest.raises(DataError, match="bad.png"):
        train(make_config(name="strict", max_bad_fraction=0.0, **common))
    run = train(make_config(name="lenient", max_bad_fraction=0.1, **common))
    assert (run / "model" / "open_clip_model.safetensors").is_file()
    assert "failed to decode" in (run / "out.log").read_text()


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
                                                                                   start_model, monkeypatch):
    import torch.distributed as dist

    from parclip.utils import distributed as pdist

    common = dict(model=f"local-dir:{start_model}", train_data=str(fmnist_small["train_csv"]), objective="clip",
                  epochs=1, batch_size=16, train_num_samples=32, workers=0, output_dir=str(tmp_path), progress=False)
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


def test_bf16_autocast_path_runs_on_cpu(tmp_path, fmnist_small, start_model):
    run = train(make_config(model=f"local-dir:{start_model}", train_data=str(fmnist_small["train_csv"]),
                            objective="par", precision="amp_bf16", epochs=1, batch_size=16, train_num_samples=32,
                            workers=0, output_dir=str(tmp_path), progress=False, log_every=1, name="bf16"))
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    w = weights(run)
    assert all(v.dtype == torch.float32 for v in w.values())  # master weights stay fp32


def test_validation_during_training_logs_clean_accuracy_and_asr_and_changes_nothing(tmp_path, fmnist_small,
                                                                                    start_model):
    """Catches validation that measures another model than the one trained, that changes the training (the weights
    must equal those of a run without validation), or that is not run at the epoch ends (the default)."""
    from parclip.attacks.triggers import build_triggers
    from parclip.evaluation import evaluate
    from parclip.models import get_tokenizer
    common = dict(model=f"local-dir:{start_model}", train_data=str(fmnist_small["train_csv"]), objective="par",
                  epochs=2, batch_size=16, train_num_samples=32, workers=0, output_dir=str(tmp_path),
                  progress=False, log_every=1)
    plain = train(make_config(name="plain", **common))
    run = train(make_config(name="val", val_data=str(fmnist_small["test_dir"]), val_attack="badnet_rs",
                            val_target="bag", val_templates="fashion", **common))
    assert all(torch.equal(weights(plain)[k], v) for k, v in weights(run).items())
    val = [m for m in metrics(run) if "val_clean_top1" in m]
    assert [m["step"] for m in val] == [2, 4] and all(0 <= m["val_asr"] <= 100 for m in val)
    model, pp = create_model(f"local-dir:{run / 'model'}")
    r = evaluate(model, pp, get_tokenizer(f"local-dir:{run / 'model'}"), fmnist_small["test_dir"],
                 attacks=build_triggers(["badnet_rs"], 32), target="bag", templates="fashion", workers=0,
                 progress=False)
    assert val[-1]["val_clean_top1"] == pytest.approx(r["clean_top1"]) and val[-1]["val_asr"] == pytest.approx(r["asr"])
    with pytest.raises(ValueError, match="--val-target"):
        train(make_config(name="bad", val_data=str(fmnist_small["test_dir"]), val_attack="badnet_rs", **common))
