"""benchmarks/gpu_check.py, the check a lent GPU runs (docs/gpu_check.md): its --dry-run runs the same code on the CPU
with tiny models, every section passes and the report has the documented format; the pieces that give its verdicts
(deep equality, run comparison, the time budget, a failing section, the memory rule) fail when they should."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    path, environ = list(sys.path), dict(os.environ)
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]
    sys.path[:] = path  # the script puts benchmarks/ on the path for its sibling train_speed
    os.environ.clear()  # and sets CUBLAS_WORKSPACE_CONFIG
    os.environ.update(environ)


@pytest.mark.slow
def test_dry_run_passes_every_section_with_the_documented_report(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    status = gpu_check.main(["--dry-run", "--out", str(out), "--work-dir", str(tmp_path)])  # as the command runs it
    printed = capsys.readouterr().out
    assert status == 0, printed[-3000:]
    report = json.loads(out.read_text())
    sec = report["sections"]
    assert report["format"] == 1 and report["dry_run"] and report["environment"]["device"] == "cpu"
    assert {k: v["status"] for k, v in sec.items()} == dict.fromkeys(
        ["resume", "distributed", "steps", "memory", "pipeline", "compile"], "ok")
    assert list(tmp_path.iterdir()) == [out]  # the scratch folder is gone

    r = sec["resume"]  # SIGKILLed while writing its 2nd checkpoint: the 1st (step 1) is on disk
    assert r["killed_signal"] == 9 and r["checkpoint_step_at_kill"] == 1 and r["steps"] == 4
    assert r["steps_logged"] == [1, 2, 2, 3, 4] and r["resumed"] and r["moved"] > 0
    assert r["weights_identical"] and r["optimizer_identical"] and r["scaler_identical"]
    # the scaler counted all 4 steps: a resumed run with a fresh scaler would count 3
    assert r["scaler"]["_growth_tracker"] == 4 and r["scaler"]["scale"] == 65536.0

    d = sec["distributed"]  # the mode a one-GPU machine runs: one process in a group of its own, under torchrun
    assert d["mode"] == "group of one" and d["backend"] == "gloo" and d["ok"]
    assert len(d["losses"][0]) == len(d["losses"][1]) == 2 and d["max_weight_diff"] < 1e-3 * d["moved"]

    for name, backend, precisions in (("steps", None, ("fp32", "amp", "amp_bf16")), ("compile", "aot_eager", ("amp",))):
        rows = sec[name]["rows"]
        assert sec[name]["compile_backend"] == backend
        assert sorted((x["precision"], x["objective"]) for x in rows) == sorted(
            (p, o) for p in precisions for o in ("clip", "par"))
        assert all(x["step_s"] > 0 and x["images_per_s"] > 0 and x["peak_mem_gib"] is None for x in rows)
        for x in (x for x in rows if x["objective"] == "par"):  # PAR ÷ fine-tuning per precision
            ft = next(y for y in rows if y["precision"] == x["precision"] and y["objective"] == "clip")
            assert x["par_over_ft"] == pytest.approx(x["step_s"] / ft["step_s"])

    m = sec["memory"]["big_model"]
    assert m["model"] == "parclip-tiny" and [x["checkpointing"] for x in m["rows"]] == [False, True]
    assert all(x["estimate_gib"]["total"] > 0 and x["step_s"] > 0 for x in m["rows"])

    p = sec["pipeline"]
    assert p["per_worker_images_per_s"]["csv"] > 0 and p["per_worker_images_per_s"]["webdataset"] > 0
    best = max(x["images_per_s"] for n in ("steps", "compile") for x in sec[n]["rows"] if x["objective"] == "par")
    assert p["par_images_per_s"] == best and p["workers_needed"]["webdataset"] >= 1

    assert "| steps | amp_bf16 |" in printed and "| compile | amp |" in printed  # the printed table
    assert "- resume: ok." in printed


def test_one_configuration_failing_is_recorded_and_the_others_are_measured(gpu_check, monkeypatch):
    def fake(model, batch, steps, objective, *, precision, **kw):
        if (precision, objective) == ("amp_bf16", "par"):
            raise RuntimeError("CUDA out of memory")
        return {"step_s": 2.0 if objective == "par" else 1.0, "images_per_s": 1.0, "peak_mem_gib": None}

    monkeypatch.setattr(gpu_check, "measure_steps", fake)
    r = gpu_check.check_steps(gpu_check.DRY, None, gpu_check.Budget(60))
    rows = {(x["precision"], x["objective"]): x for x in r["rows"]}
    assert not r["ok"] and rows["amp_bf16", "par"]["error"] == "RuntimeError: CUDA out of memory"
    assert "par_over_ft" not in rows["amp_bf16", "par"] and rows["amp_bf16", "clip"]["step_s"] == 1.0
    assert rows["fp32", "par"]["par_over_ft"] == rows["amp", "par"]["par_over_ft"] == 2.0
    report = {"environment": {"torch": "x"}, "wall_s": 1.0, "sections": {"steps": r}}
    assert "Failed: steps amp_bf16 par (RuntimeError: CUDA out of memory)." in gpu_check.table(report)


def test_a_failing_or_late_section_is_recorded_and_the_others_still_run(gpu_check, tmp_path):
    out, report = tmp_path / "r.json", {"sections": {}}

    def broken():
        raise RuntimeError("CUDA out of memory")

    assert gpu_check.run_section(report, "a", gpu_check.Budget(60), broken, out)["status"] == "failed"
    assert gpu_check.run_section(report, "b", gpu_check.Budget(60), lambda: {"ok": False}, out)["status"] == \
        "check failed"
    assert gpu_check.run_section(report, "c", gpu_check.Budget(60), lambda: {"x": 1}, out)["status"] == "ok"
    assert gpu_check.run_section(report, "d", gpu_check.Budget(-1), lambda: {"x": 1}, out)["status"] == "skipped"
    written = json.loads(out.read_text())["sections"]
    assert written["a"]["error"] == "RuntimeError: CUDA out of memory" and "broken" in written["a"]["traceback"]
    assert written["c"]["x"] == 1 and written["d"]["reason"] == "time budget"


def test_state_equality_is_bit_for_bit_and_run_comparison_sees_a_different_update(gpu_check, tmp_path):
    state = {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(2.0)}}, "param_groups": [{"lr": 1e-3}]}
    other = {"state": {0: {"exp_avg": torch.tensor([0.0, 0.0, 1e-30]), "step": torch.tensor(2.0)}},
             "param_groups": [{"lr": 1e-3}]}
    assert gpu_check._equal(state, state) and not gpu_check._equal(state, other)
    assert not gpu_check._equal(state, {**state, "param_groups": [{"lr": 2e-3}]})

    initial = {"w": torch.zeros(4)}
    for name, w, losses in (("a", torch.ones(4), [1.0, 0.5]), ("same", torch.ones(4), [1.0, 0.5]),
                            ("moved_twice", 2 * torch.ones(4), [1.0, 0.5]), ("short", torch.ones(4), [1.0])):
        (tmp_path / name / "model").mkdir(parents=True)
        save_file({"w": w}, tmp_path / name / "model" / "open_clip_model.safetensors")
        (tmp_path / name / "metrics.jsonl").write_text(  # training rows as parclip train writes them
            "".join(json.dumps({"step": i + 1, "epoch": 0, "loss": x}) + "\n" for i, x in enumerate(losses)))
    assert gpu_check._compare_runs(tmp_path / "a", tmp_path / "same", initial)["ok"]
    assert not gpu_check._compare_runs(tmp_path / "a", tmp_path / "moved_twice", initial)["ok"]
    assert not gpu_check._compare_runs(tmp_path / "a", tmp_path / "short", initial)["ok"]


def test_memory_estimate_follows_its_rule(gpu_check):
    """The rule of estimate_gib's docstring, worked by hand for parclip-micro (vision: 2 layers, (28/7)² + 1 = 17
    tokens, width 64; text: 2 layers, 16 tokens, width 64; 18 bytes per trained parameter)."""
    gib = 2**30
    plain = gpu_check.estimate_gib("parclip-micro", 1000, 500, batch=10, checkpointing=False)
    assert plain["fixed"] * gib == pytest.approx(1000 * 18 + 500)
    assert plain["activations"] * gib == pytest.approx(10 * 34 * 64 * (2 * 17 + 2 * 16))
    ckpt = gpu_check.estimate_gib("parclip-micro", 1000, 500, batch=10, checkpointing=True)
    assert ckpt["activations"] * gib == pytest.approx(10 * 2 * 64 * (2 * 17 + 2 * 16) + 34 * 17 * 64 * 10)
    assert ckpt["total"] == pytest.approx(ckpt["fixed"] + ckpt["activations"]) and ckpt["total"] < plain["total"]
