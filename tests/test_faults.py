"""Faults: kill -9 at the worst moments, NaN/Inf, two writers on one run, a full disk, read-only folders, where
unpickling may happen."""
import ast
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from parclip import train as train_mod
from parclip.cli import main
from parclip.config import make_config
from parclip.runs import RunBusyError, RunLock, list_runs
from parclip.train import NonFiniteError, train

PKG = Path(__file__).resolve().parents[1] / "src" / "parclip"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _common(tmp_path, fmnist_small, model_dir, **kw):
    return dict(model=f"local-dir:{model_dir}", train_data=str(fmnist_small["train_csv"]), objective="par",
                epochs=2, batch_size=8, train_rows=32, workers=0, output_dir=str(tmp_path / "runs"),
                progress=False, lr=1e-3, lr_decay_ratio=1.0, tau=1.0, save_every=1, log_every=1, **kw)


def _run(cfg: dict, name: str, tmp_path: Path, env=None, wait=True, prefix=()):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(cfg, name=name)))
    cmd = [*prefix, sys.executable, "-m", "parclip", "train", "--config", str(path)]
    if wait:
        return subprocess.run(cmd, env=env or ENV, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _weights(run: Path) -> dict:
    return load_file(run / "model" / "open_clip_model.safetensors")


def _resumes_to(ref: dict, cfg: dict, name: str, tmp_path: Path) -> None:
    """The same command again finishes run `name`, and its model equals `ref` bit for bit."""
    again = _run(cfg, name, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    out = _weights(tmp_path / "runs" / name)
    assert all(torch.equal(ref[k], out[k]) for k in ref)


@pytest.mark.slow
def test_kill_9_mid_run_and_mid_checkpoint_write_then_resume_is_bit_identical(tmp_path, fmnist_small,
                                                                              micro_model_dir, one_thread):
    cfg = _common(tmp_path, fmnist_small, micro_model_dir)
    ref = _weights(train(make_config(name="straight", **cfg)))  # one thread here: the subprocesses' arithmetic

    # 1. SIGKILL from outside, mid-run (after the 3rd step's metrics line), then the same command again
    proc = _run(cfg, "killed", tmp_path, wait=False)
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "killed" / "model").exists()  # it really died before the end
    _resumes_to(ref, cfg, "killed", tmp_path)

    # 2. the process kills itself inside the 5th checkpoint write: temp file complete, not yet renamed
    died = _run(cfg, "torn", tmp_path, env=dict(ENV, PARCLIP_FAULT_KILL="latest.pt:5"))
    assert died.returncode == -signal.SIGKILL
    ckpt = tmp_path / "runs" / "torn" / "checkpoints" / "latest.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 4  # the last complete one, never the torn one
    assert list((tmp_path / "runs" / "torn" / "checkpoints").glob(".latest.pt.*.tmp"))  # the torn temp file is left
    _resumes_to(ref, cfg, "torn", tmp_path)

    # 3. killed while exporting the final model: the run resumes from its last checkpoint and exports again
    died = _run(cfg, "export", tmp_path, env=dict(ENV, PARCLIP_FAULT_KILL="open_clip_model.safetensors:1"))
    assert died.returncode == -signal.SIGKILL
    assert not (tmp_path / "runs" / "export" / "model" / "open_clip_model.safetensors").exists()
    _resumes_to(ref, cfg, "export", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("objective,extra", [("clip", {}), ("cleanclip", {}),
                                             ("roclip", dict(roclip_every=1, roclip_pool_size=16))])
def test_every_defence_killed_inside_a_checkpoint_write_resumes_bit_identical(tmp_path, fmnist_small,
                                                                             micro_model_dir, objective, extra,
                                                                             one_thread):
    cfg = {**_common(tmp_path, fmnist_small, micro_model_dir), "objective": objective, **extra}
    train(make_config(name="straight", **cfg))  # in this process, one thread: the subprocesses' arithmetic
    died = _run(cfg, "torn", tmp_path, env=dict(ENV, PARCLIP_FAULT_KILL="latest.pt:3"))
    assert died.returncode == -signal.SIGKILL
    _resumes_to(_weights(tmp_path / "runs" / "straight"), cfg, "torn", tmp_path)


@pytest.mark.slow
def test_kill_9_mid_poisoning_leaves_no_half_file_and_a_rerun_is_identical(tmp_path, fmnist_small):
    cmd = [sys.executable, "-m", "parclip", "poison", str(fmnist_small["train_csv"]), None, "--attack", "badnet_rs",
           "--target", "bag", "--n", "40", "--image-size", "28", "--templates", "fashion"]
    ref = subprocess.run([c if c else str(tmp_path / "ref") for c in cmd], env=ENV, capture_output=True, timeout=300)
    assert ref.returncode == 0
    out = str(tmp_path / "p")
    died = subprocess.run([c if c else out for c in cmd], env=dict(ENV, PARCLIP_FAULT_KILL="*.png:20"),
                          capture_output=True, timeout=300)
    assert died.returncode == -signal.SIGKILL
    assert not (tmp_path / "p" / "poisoned.csv").exists() and not (tmp_path / "p" / "manifest.json").exists()
    assert all(p.stat().st_size > 0 for p in (tmp_path / "p" / "images").glob("*.png"))  # only complete images
    assert subprocess.run([c if c else out for c in cmd], env=ENV, capture_output=True, timeout=300).returncode == 0
    for rel in ["poisoned.csv", "manifest.json", *sorted(p.name for p in (tmp_path / "ref" / "images").iterdir())]:
        a = (tmp_path / "ref" / rel) if (tmp_path / "ref" / rel).exists() else (tmp_path / "ref" / "images" / rel)
        b = (tmp_path / "p" / rel) if (tmp_path / "p" / rel).exists() else (tmp_path / "p" / "images" / rel)
        assert a.read_bytes() == b.read_bytes(), rel


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path, fmnist_small,
                                                                              micro_model_dir, monkeypatch):
    real = train_mod.accumulate_step
    calls = {"n": 0}

    def poisoned_loss(*args):
        loss, parts = real(*args)
        calls["n"] += 1
        if calls["n"] == 3:
            return loss * float("nan"), parts
        return loss, parts

    monkeypatch.setattr(train_mod, "accumulate_step", poisoned_loss)
    cfg = _common(tmp_path, fmnist_small, micro_model_dir)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3 .*Last good checkpoint: .*latest\.pt"):
        train(make_config(name="nan", **cfg))
    state = torch.load(tmp_path / "runs/nan/checkpoints/latest.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["state_dict"].values()
                                      if v.is_floating_point())

    calls["n"] = 0
    run = train(make_config(name="skip", skip_nonfinite=True, **cfg))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_nonfinite", 0) for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(torch.isfinite(v).all() for v in _weights(run).values())


def test_nan_gradients_are_caught_too_and_a_nan_model_is_never_saved(tmp_path, fmnist_small, micro_model_dir,
                                                                     monkeypatch):
    real = train_mod.accumulate_step

    def nan_grad(forward, *args):
        loss, parts = real(forward, *args)
        next(p for p in forward.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return loss, parts

    monkeypatch.setattr(train_mod, "accumulate_step", nan_grad)
    with pytest.raises(NonFiniteError, match="non-finite gradients at step 1"):
        train(make_config(name="g", **_common(tmp_path, fmnist_small, micro_model_dir)))
    monkeypatch.setattr(train_mod, "accumulate_step", real)
    model, _ = train_mod.create_model(f"local-dir:{micro_model_dir}")
    with torch.no_grad():
        model.text_projection[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="text_projection"):
        train_mod._check_finite_model(model, "export")


@pytest.mark.slow
def test_one_run_one_writer_and_a_killed_holder_leaves_no_stuck_lock(tmp_path, fmnist_small, micro_model_dir,
                                                                     capsys):
    run = tmp_path / "runs" / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from parclip.runs import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(120)",
                               str(run)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunBusyError, match=f"pid {holder.pid}"):
        train(make_config(name="busy", **_common(tmp_path, fmnist_small, micro_model_dir)))
    assert not (run / "config.yaml").exists()  # the refused run wrote nothing into the busy directory
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(run)
    lock.acquire()  # the OS released the killed holder's lock
    lock.release()
    finished = train(make_config(name="busy", **_common(tmp_path, fmnist_small, micro_model_dir)))
    assert (finished / "model").is_dir()
    assert [r["state"] for r in list_runs(tmp_path / "runs")] == ["finished"]


def test_a_full_disk_is_a_clear_error_and_the_last_checkpoint_stays_intact(tmp_path, fmnist_small, micro_model_dir,
                                                                          monkeypatch, capsys):
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = _common(tmp_path, fmnist_small, micro_model_dir)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(dict(cfg, name="full")))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    ckpts = tmp_path / "runs" / "full" / "checkpoints"
    assert torch.load(ckpts / "latest.pt", weights_only=True)["step"] == 2
    assert not list(ckpts.glob(".*.tmp"))  # the failed write's temp file is cleaned up


def _obeying_permissions(tmp_path: Path) -> list[str]:
    """A command prefix under which file permissions apply: none for an ordinary user; as root (as the tests run
    here), setpriv dropping the capabilities that override them (root otherwise writes into read-only folders)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    try:
        r = subprocess.run(prefix + [sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"], capture_output=True)
    except FileNotFoundError:
        pytest.skip("running as root without setpriv (util-linux): read-only folders cannot be tested")
    if r.returncode == 0 or b"PermissionError" not in r.stderr:
        pytest.skip(f"running as root and setpriv could not drop the permission override: {r.stderr[-300:]!r}")
    return prefix


@pytest.mark.slow
def test_read_only_output_and_unreadable_input_are_clear_errors_and_the_last_files_stay_intact(
        tmp_path, fmnist_small, micro_model_dir, one_thread):
    """Real permissions, in real subprocesses: an output folder that cannot be written, a table that cannot be read,
    and a checkpoints folder made read-only mid-run. Each is an error naming the path, never a traceback; the last
    good checkpoint is untouched, and once the folder is writable again the same command finishes bit-identical."""
    prefix = _obeying_permissions(tmp_path)
    cfg = _common(tmp_path, fmnist_small, micro_model_dir)
    ref = _weights(train(make_config(name="straight", **cfg)))

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    r = _run(dict(cfg, output_dir=str(ro)), "nowhere", tmp_path, prefix=prefix)
    assert r.returncode == 2 and "Permission denied" in r.stderr and str(ro) in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not list(ro.iterdir())

    table = tmp_path / "secret.csv"
    table.write_text(Path(fmnist_small["train_csv"]).read_text().replace("images/", f"{fmnist_small['root']}/images/"))
    table.chmod(0)
    r = _run(dict(cfg, train_data=str(table)), "unreadable", tmp_path, prefix=prefix)
    assert r.returncode == 2 and "Permission denied" in r.stderr and "secret.csv" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr

    died = _run(cfg, "ro_ckpt", tmp_path, env=dict(ENV, PARCLIP_FAULT_KILL="latest.pt:3"))
    assert died.returncode == -signal.SIGKILL
    ckpts = tmp_path / "runs" / "ro_ckpt" / "checkpoints"
    before = (ckpts / "latest.pt").read_bytes()
    for torn in ckpts.glob(".*.tmp"):
        torn.unlink()
    ckpts.chmod(0o555)
    r = _run(cfg, "ro_ckpt", tmp_path, prefix=prefix)
    assert r.returncode == 2 and "Permission denied" in r.stderr and "checkpoints" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert (ckpts / "latest.pt").read_bytes() == before and not list(ckpts.glob(".*.tmp"))
    assert torch.load(ckpts / "latest.pt", weights_only=True)["step"] == 2
    ckpts.chmod(0o755)
    _resumes_to(ref, cfg, "ro_ckpt", tmp_path)


def test_no_unpickling_outside_the_one_guarded_path():
    """Every torch.load in the package passes weights_only=True, except in the checkpoint reader behind
    --allow-unsafe-load; pickle.load(s) and torch.jit.load appear only there, after the allow_unsafe_load check."""
    guarded = {("models/checkpoints.py", "_torch_load"), ("models/checkpoints.py", "_read_checkpoint")}
    offenders = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = str(path.relative_to(PKG))
        parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
                continue
            name = ast.unparse(call.func)
            safe_kw = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                          for k in call.keywords)
            if not ((name == "torch.load" and not safe_kw) or name in ("pickle.load", "pickle.loads",
                                                                          "torch.jit.load")):
                continue
            fn = call
            while fn in parent and not isinstance(fn, ast.FunctionDef):
                fn = parent[fn]
            fname = getattr(fn, "name", "<module>")
            checked_before = any(isinstance(n, ast.Name) and n.id == "allow_unsafe_load" and n.lineno < call.lineno
                                 for n in ast.walk(fn))
            if (rel, fname) not in guarded or not checked_before:
                offenders.append(f"{rel}:{call.lineno} {name} in {fname}")
    assert offenders == []


@pytest.mark.slow
def test_easy_mistakes_are_said_before_they_cost_a_run(tmp_path, fmnist_small, micro_model_dir, caplog, capsys):
    """Poisoning at the default 224 px for a 28-px model shrinks an 8-px patch to 1 px: train and eval say so, with
    both sizes; --model poisons at the model's size; cleaning on the poisoned table and a target no caption names are
    said too."""
    import logging

    caplog.set_level(logging.WARNING, logger="parclip")
    table = str(fmnist_small["train_csv"])
    base = ["poison", table, None, "--attack", "badnet_rs", "--target", "bag", "--n", "60", "--templates", "fashion"]
    assert main([c if c else str(tmp_path / "p224") for c in base] + ["--trigger-param", "patch_size=8"]) == 0
    assert json.loads((tmp_path / "p224" / "manifest.json").read_text())["image_size"] == 224
    assert main([c if c else str(tmp_path / "p28") for c in base] + ["--model", f"local-dir:{micro_model_dir}"]) == 0
    assert json.loads((tmp_path / "p28" / "manifest.json").read_text())["image_size"] == 28

    cfg = dict(model=f"local-dir:{micro_model_dir}", objective="clip", epochs=1, batch_size=20,
               train_rows=40, workers=0, output_dir=str(tmp_path / "runs"), progress=False)
    caplog.clear()
    planted = train(make_config(name="ok", train_data=str(tmp_path / "p28" / "poisoned.csv"), **cfg))
    assert "poisoned at" not in caplog.text
    # cleaning the planted model on pairs that include the images it was poisoned with / on disjoint pairs
    clean = {**cfg, "objective": "par", "tau": 1.0, "model": f"local-dir:{planted / 'model'}"}
    train(make_config(name="overlap", train_data=table, **{**clean, "train_rows": 600}))
    assert "60 pairs of" in caplog.text and "images the starting model was poisoned with" in caplog.text
    caplog.clear()
    train(make_config(name="disjoint", train_data=str(fmnist_small["holdout_csv"]), **clean))
    assert "poisoned with" not in caplog.text
    run = train(make_config(name="mismatch", train_data=str(tmp_path / "p224" / "poisoned.csv"), **cfg))
    assert "poisoned at 224 px" in caplog.text and "runs at 28 px" in caplog.text
    assert "8-px patch becomes 1.0 px and will not survive" in caplog.text
    caplog.clear()
    assert main(["eval", "--model", f"local-dir:{run / 'model'}", "--data", str(fmnist_small["test_dir"]),
                 "--templates", "fashion", "--workers", "0"]) == 0
    assert "trained on" in caplog.text and "poisoned at 224 px" in caplog.text
    caplog.clear()
    train(make_config(name="cleaning", **{**cfg, "objective": "par", "tau": 1.0},
                      train_data=str(tmp_path / "p28" / "poisoned.csv")))
    assert "a defence needs clean pairs" in caplog.text
    caplog.clear()
    assert main(["poison", table, str(tmp_path / "pb"), "--attack", "badnet_rs", "--target", "banana", "--n", "5",
                 "--image-size", "28", "--templates", "fashion"]) == 0
    assert "no clean caption" in caplog.text and "'banana'" in caplog.text


@pytest.mark.slow
def test_the_hostile_input_sweep_finds_no_traceback_no_executed_code_and_no_silent_change():
    """benchmarks/hostile_inputs.py (316 cases, the table in docs/hostile_inputs.md) exits 1 on any FAIL row."""
    proc = subprocess.run([sys.executable, str(PKG.parents[1] / "benchmarks" / "hostile_inputs.py"), "--no-write"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "FAIL (code executed): 0" in proc.stdout


def test_what_the_sweep_found_stays_fixed(tmp_path, micro_model_dir, fmnist_small):
    import numpy as np
    from PIL import Image

    from parclip.data import open_rgb
    from parclip.models import CheckpointError, create_model

    # a 16-bit PNG keeps its grey level (Pillow's own convert clips it to white)
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(tmp_path / "d.png")
    assert np.asarray(open_rgb(tmp_path / "d.png"))[0, 0].tolist() == [156, 156, 156]
    # a torch zip with damaged bytes is refused (torch alone would load the damaged values)
    sd = create_model(f"local-dir:{micro_model_dir}")[0].state_dict()
    torch.save(sd, tmp_path / "w.pt")
    raw = bytearray((tmp_path / "w.pt").read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    (tmp_path / "bad.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum|corrupt"):
        create_model(f"local-dir:{micro_model_dir}", pretrained=str(tmp_path / "bad.pt"))
    # integer values for float weights are a mismatch, not a silent conversion
    from safetensors.torch import save_file
    save_file({k: (v.long() if k == "text_projection" else v).contiguous() for k, v in sd.items()},
              tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match="integer/float mismatches.*text_projection"):
        create_model(f"local-dir:{micro_model_dir}", pretrained=str(tmp_path / "int.safetensors"))
    # --resume with a model's weights instead of a training checkpoint says what to do
    cfg = _common(tmp_path, fmnist_small, micro_model_dir)
    with pytest.raises(CheckpointError, match="pass them as --pretrained"):
        train(make_config(name="r", resume=str(tmp_path / "w.pt"), **cfg))
    # YAML: numbers as strings are numbers, other wrong types and Python tags are errors naming the option
    assert make_config(lr="1e-4", batch_size="8").batch_size == 8
    with pytest.raises(ValueError, match="option lr: expected float, got 'fast'"):
        make_config(lr="fast")
    (tmp_path / "tag.yaml").write_text("lr: !!python/object/apply:os.system ['touch MARKER']\n")
    assert main(["train", "--config", str(tmp_path / "tag.yaml")]) == 2
    assert not Path("MARKER").exists()


@pytest.mark.slow
def test_the_defence_benchmark_killed_mid_export_resumes_to_the_same_models(tmp_path, one_thread):
    """benchmarks/defence_matrix.py --smoke, killed while exporting its planted model, then run again: it finishes,
    and the planted model it resumed equals an uninterrupted training of the same configuration, bit for bit."""
    script = str(PKG.parents[1] / "benchmarks" / "defence_matrix.py")
    cmd = [sys.executable, script, "--smoke", "--attacks", "badnet_rs", "--defences", "par", "--out",
           str(tmp_path / "b")]
    died = subprocess.run(cmd, env=dict(ENV, PARCLIP_FAULT_KILL="open_clip_model.safetensors:2"),  # 1: foundation
                          capture_output=True, text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL and not (tmp_path / "b" / "matrix.json").exists()
    plant = tmp_path / "b" / "runs" / "plant-badnet_rs"
    assert (plant / "checkpoints" / "latest.pt").is_file() and not (plant / "model" / "open_clip_model.safetensors"
                                                                    ).exists()
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    matrix = json.loads((tmp_path / "b" / "matrix.json").read_text())
    assert set(matrix["cells"]["par"]) == {"badnet_rs"}
    cfg = yaml.safe_load((plant / "config.yaml").read_text())
    fresh = train(make_config(**{**cfg, "output_dir": str(tmp_path / "fresh"), "name": "plant"}))
    ref, out = _weights(fresh), _weights(plant)
    assert all(torch.equal(ref[k], out[k]) for k in ref)
