"""benchmarks/defence_matrix.py (over parclip.protocol) end to end on its --smoke size (the real matrix is in
docs/defence_matrix.md)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from parclip.protocol import select_lr, stages
from parclip.protocol.stages import select_defender

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dm():
    spec = importlib.util.spec_from_file_location("defence_matrix", ROOT / "benchmarks" / "defence_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _weights(model_dir):
    (path,) = Path(model_dir).glob("*.safetensors")
    return load_file(str(path))


@pytest.mark.slow
def test_defence_matrix_smoke_every_defence_two_attacks_and_curves(dm, tmp_path, monkeypatch, capsys, one_thread,
                                                                   read_png):
    """Catches a stage that skips its work (a cell that is the planted model, a curve point that is not the run it
    names), a matrix or curve table that is not the cells' numbers, a BadCLIP patch that is not used, and a cache
    that retrains (or fails to retrain after a change of settings)."""
    out = tmp_path / "bench"
    args = ["--smoke", "--out", str(out), "--attacks", "badnet_rs", "badclip", "--defences", *dm.DEFENCES,
            "--curves", "tau", "lr"]
    assert dm.main(args) == 0
    printed = capsys.readouterr().out
    matrix = json.loads((out / "matrix.json").read_text())
    assert list(matrix["cells"]) == list(dm.DEFENCES)
    for d, row in matrix["cells"].items():
        assert set(row) == {"badnet_rs", "badclip"}, d
        for cell in row.values():
            assert 0 <= cell["clean_top1"] <= 100 and 0 <= cell["asr"] <= 100
    for a in ("badnet_rs", "badclip"):  # `none` is the planted model's own evaluation
        assert matrix["cells"]["none"][a] == {**matrix["plants"][a]["test"], "lr": None, "grid": None}
    table = (out / "matrix.md").read_text()
    assert table.strip().splitlines()[0] == "| defence | `badnet_rs` | `badclip` |" and table.strip() in printed
    par = matrix["cells"]["par"]["badnet_rs"]
    assert f"| par | {par['clean_top1']:.1f} / {par['asr']:.1f} |" in table

    # every cleaning run started from its planted model, on the holdout pairs, with its defence's objective, and moved
    # the weights away from the planted ones
    runs = out / "runs"
    for d, settings in dm.DEFENCES.items():
        if settings is None:
            continue
        for a in ("badnet_rs", "badclip"):
            cfg = yaml.safe_load((runs / f"{d}-{a}-lr0.0001" / "config.yaml").read_text())
            planted = out / "runs" / f"plant-{a}" / "model"
            assert cfg["model"] == f"local-dir:{planted}" and cfg["train_data"].endswith("holdout.csv")
            assert cfg["objective"] == settings["objective"] and cfg["lr"] == 1e-4
    before = _weights(out / "runs" / "plant-badnet_rs" / "model")
    after = _weights(runs / "par-badnet_rs-lr0.0001" / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    poisoned = yaml.safe_load((out / "runs" / "plant-badclip" / "config.yaml").read_text())["train_data"]
    manifest = json.loads((Path(poisoned).parent / "manifest.json").read_text())
    assert manifest["trigger"]["params"]["patch"] == str(out / "badclip" / "patch.png")  # optimised in stage A

    # curves: the matrix's own setting is one point of each (the same run, the same numbers); the others are new runs
    curves = json.loads((out / "curves.json").read_text())["curves"]
    tau = {p["value"]: p for p in curves["tau"]["badnet_rs"]["par"]}
    assert set(tau) == {1.0, 2.0}
    assert {k: tau[2.0][k] for k in ("clean_top1", "asr")} == {k: par[k] for k in ("clean_top1", "asr")}
    assert yaml.safe_load((runs / "par-badnet_rs-lr0.0001-tau1" / "config.yaml").read_text())["tau"] == 1.0
    assert set(curves["lr"]["badnet_rs"]) == {"clip", "clip_aug", "cleanclip", "roclip", "par"}
    for d, pts in curves["lr"]["badnet_rs"].items():
        assert [p["value"] for p in pts] == [1e-4, 3e-4]
        assert pts[0]["asr"] == matrix["cells"][d]["badnet_rs"]["asr"], d
        assert yaml.safe_load((runs / f"{d}-badnet_rs-lr0.0003" / "config.yaml").read_text())["lr"] == 3e-4
    # one run folder per distinct training: the curve points equal to matrix cells made none of their own
    cleaning = {d for d in dm.DEFENCES if dm.DEFENCES[d]}
    expected = ({f"{d}-{a}-lr0.0001" for d in cleaning for a in ("badnet_rs", "badclip")}
                | {f"{d}-badnet_rs-lr0.0003" for d in cleaning} | {"par-badnet_rs-lr0.0001-tau1"}
                | {"foundation", "plant-badnet_rs", "plant-badclip"})
    assert {r.name for r in runs.iterdir() if r.is_dir()} == expected
    read_png(out / "curves.png", coloured=0.002)  # the curves' lines and points
    read_png(out / "matrix.png", coloured=0.01)  # the bars
    assert "**tau** on `badnet_rs`" in (out / "curves.md").read_text()

    # a second run computes nothing; a changed setting recomputes exactly what depends on it
    real_training = stages.run_training
    monkeypatch.setattr(stages, "run_training", lambda cfg: pytest.fail(f"retrained {cfg.name}"))
    real_evaluation = stages.evaluate_model
    monkeypatch.setattr(stages, "evaluate_model", lambda *a, **k: pytest.fail(f"re-evaluated {a[0]}"))
    assert dm.main(args) == 0
    monkeypatch.setattr(stages, "evaluate_model", real_evaluation)
    assert json.loads((out / "matrix.json").read_text())["cells"] == matrix["cells"]
    trained = []
    monkeypatch.setattr(stages, "run_training", lambda cfg: trained.append(cfg.name) or real_training(cfg))
    monkeypatch.setitem(dm.DEFENCES, "par", dict(dm.DEFENCES["par"], tau=3.0))
    assert dm.main(args[:-3] + ["--attacks", "badnet_rs", "--defences", "par"]) == 0
    assert trained == ["par-badnet_rs-lr0.0001"]
    cell = json.loads((out / "cells" / "par__badnet_rs.json").read_text())
    assert cell["spec"]["train"][0]["tau"] == 3.0
    assert yaml.safe_load((runs / "par-badnet_rs-lr0.0001" / "config.yaml").read_text())["tau"] == 3.0


def test_defence_matrix_rejects_unknown_names(dm, tmp_path, capsys):
    with pytest.raises(SystemExit):
        dm.main(["--smoke", "--out", str(tmp_path), "--defences", "cleenclip"])
    assert "unknown defence(s) ['cleenclip']; known: none, clip, clip_aug" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dm.main(["--smoke", "--out", str(tmp_path), "--attacks", "sig", "--curve-attacks", "badnet_rs"])
    assert "--curve-attacks must be among --attacks" in capsys.readouterr().err


def test_grid_choice_is_the_lowest_validation_asr_within_the_clean_budget():
    """select_lr: the lowest val ASR among rates whose val clean top-1 is within MAX_VAL_DROP of
    min(planted, best of grid); the reference falls back to the grid's best when no rate gets near the planted model."""
    g = lambda lr, top1, asr: {"lr": lr, "val": {"clean_top1": top1, "asr": asr}}  # noqa: E731
    grid = [g(3e-5, 89.0, 60.0), g(1e-4, 87.5, 10.0), g(3e-4, 86.0, 1.0)]
    assert select_lr(grid, {"clean_top1": 89.0})["lr"] == 1e-4  # 86.0 is 3 points below 89: too costly
    assert select_lr(grid, {"clean_top1": 88.0})["lr"] == 3e-4  # 86.0 is exactly 2 below 88: allowed
    low = [g(3e-5, 80.0, 50.0), g(1e-4, 79.0, 20.0), g(3e-4, 70.0, 0.0)]  # never near the planted 89
    assert select_lr(low, {"clean_top1": 89.0})["lr"] == 1e-4  # judged against its own best (80)
    near = [g(3e-5, 88.0, 50.0), g(1e-4, 86.5, 5.0)]  # best 88 is within 2 of the planted 89, but the reference
    assert select_lr(near, {"clean_top1": 89.0})["lr"] == 1e-4  # is still the lower one, 88: 86.5 >= 86 passes
    tie = [g(3e-5, 88.0, 5.0), g(1e-4, 88.5, 5.0)]
    assert select_lr(tie, {"clean_top1": 89.0})["lr"] == 1e-4  # equal ASR: the higher clean top-1


def test_select_defender_pushes_as_hard_as_the_clean_budget_allows_and_never_reads_asr():
    """select_defender: the highest rate whose val clean top-1 is within MAX_VAL_DROP of the planted model's; none
    within: the best val clean top-1. Catches a rule that reads the ASR (the defender does not know the trigger)."""
    g = lambda lr, top1, asr: {"lr": lr, "val": {"clean_top1": top1, "asr": asr}}  # noqa: E731
    grid = [g(1e-4, 89.0, 60.0), g(3e-4, 87.0, 10.0), g(1e-3, 86.5, 1.0)]
    assert select_defender(grid, {"clean_top1": 89.0})["lr"] == 3e-4  # 87.0 is exactly 2 below: allowed, 86.5 not
    assert select_defender(grid, {"clean_top1": 88.5})["lr"] == 1e-3
    assert select_defender(grid[::-1], {"clean_top1": 89.0})["lr"] == 3e-4  # order does not matter
    asr_blind = [dict(c, val=dict(c["val"], asr=100.0 - c["val"]["asr"])) for c in grid]
    assert select_defender(asr_blind, {"clean_top1": 89.0})["lr"] == 3e-4
    # none within the budget: the least clean cost, whichever rate it is
    assert select_defender([g(1e-4, 80.0, 5.0), g(3e-4, 70.0, 0.0)], {"clean_top1": 89.0})["lr"] == 1e-4
    assert select_defender([g(1e-4, 85.0, 5.0), g(3e-4, 86.0, 0.0), g(1e-3, 84.0, 0.0)],
                           {"clean_top1": 89.0})["lr"] == 3e-4


@pytest.mark.slow
def test_par_recovery_smoke_traces_every_variant(tmp_path, capsys, one_thread, read_png):
    """Catches a traced run that logs no validation or distances, a variant whose settings do not reach its run, or
    a report that is not the runs' numbers."""
    spec = importlib.util.spec_from_file_location("par_recovery", ROOT / "benchmarks" / "par_recovery.py")
    pr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pr)
    out = tmp_path / "bench"
    assert pr.main(["--smoke", "--out", str(out), "--variants", "latch-3e-4", "clip_aug-3e-4"]) == 0
    report = json.loads((out / "recovery" / "badnet_rs.json").read_text())
    latch, aug = report["runs"]
    assert latch["label"] == "latch-3e-4" and latch["variant"]["par_latch"] is True
    cfg = yaml.safe_load((Path(latch["model"]).parent / "config.yaml").read_text())
    assert cfg["par_latch"] is True and cfg["lr"] == 3e-4 and cfg["val_trigger_param"] == "patch_size=8"
    steps = latch["trace"]["steps"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))  # every step logged
    assert all(0 <= r["dist_img"] <= 4 and r["on_img"] in (0.0, 1.0) for r in steps)
    assert latch["trace"]["val"][-1]["step"] == len(steps) and "val_asr" in latch["trace"]["val"][-1]
    assert "dist_img" not in aug["trace"]["final"]  # no frozen copy, no distance
    md = (out / "recovery" / "badnet_rs.md").read_text()
    t = latch["test"]
    assert f"| latch-3e-4 | {t['clean_top1']:.1f} / {t['asr']:.1f} |" in md and md.strip() in capsys.readouterr().out
    read_png(out / "recovery" / "badnet_rs.png", coloured=0.002)


def test_a_badclip_patch_of_another_side_has_its_own_folders(tmp_path):
    """Catches a --badclip-side run that would overwrite the protocol's 8-px patch and planted model in a shared
    cache (their folders are named by stored_name)."""
    from parclip.protocol import Settings
    from parclip.protocol.stages import stored_name
    s = Settings(out=str(tmp_path), cache=str(tmp_path))
    assert stored_name(s, "badclip") == "badclip" and stored_name(s, "badnet") == "badnet"
    s = Settings(out=str(tmp_path), cache=str(tmp_path), badclip_side=3)
    assert stored_name(s, "badclip") == "badclip-3px" and stored_name(s, "badnet") == "badnet"
    assert s.patch["patch_size"] == s.trigger_params["badclip"]["patch_size"] == 3  # one side for both


@pytest.mark.slow
def test_defence_matrix_defender_rule_trains_from_the_highest_rate_down(dm, tmp_path, one_thread):
    """Catches a defender's-rule cell that trains rates it cannot choose, that is not select_defender's choice
    over what it trained, or that is recorded under the trigger rule."""
    out = tmp_path / "bench"
    assert dm.main(["--smoke", "--out", str(out), "--attacks", "badnet_rs", "--defences", "none", "clip", "par",
                    "--defender"]) == 0
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["protocol"]["lr"]["rule"] == "defender" and matrix["protocol"]["lr"]["grid"] == [1e-4, 3e-4, 1e-3]
    planted = json.loads((out / "runs" / "plant-badnet_rs.json").read_text())["defender_val"]
    # the defender validates on clean pairs it does not train on, none of which the foundation saw
    split = json.loads((out / "data" / "defender_split.json").read_text())
    trained_on = {Path(r.split("\t")[0]).name for r in Path(split["train_csv"]).read_text().splitlines()[1:]}
    validated = {p.name for p in Path(split["val_dir"]).rglob("*.png")}
    assert len(validated) == split["n_val"] == 64 and not trained_on & validated
    holdout = {Path(r.split("\t")[0]).name for r in (out / "data/fashion-mnist/holdout.csv").read_text().splitlines()[1:]}
    assert trained_on | validated == holdout
    for d in ("clip", "par"):
        cell = matrix["cells"][d]["badnet_rs"]
        lrs = [g["lr"] for g in cell["grid"]]
        assert lrs == sorted(lrs, reverse=True) and lrs[0] == 1e-3
        within = [g["val"]["clean_top1"] >= planted["clean_top1"] - 2.0 for g in cell["grid"]]
        assert not any(within[:-1]) and (within[-1] or len(lrs) == 3)  # stops at the first rate within the budget
        assert cell["lr"] == select_defender(cell["grid"], planted)["lr"]
        trained = {p.name for p in (out / "runs").glob(f"{d}-badnet_rs-lr*")}
        assert trained == {f"{d}-badnet_rs-lr{lr:g}" for lr in lrs}
        cfg = yaml.safe_load((out / "runs" / f"{d}-badnet_rs-lr{lrs[0]:g}" / "config.yaml").read_text())
        assert cfg["train_data"] == split["train_csv"]
    # --synthetic: the same cells cleaned on generated pairs, from a generator that saw only the foundation's pairs
    synth_out = tmp_path / "synth"
    assert dm.main(["--smoke", "--out", str(synth_out), "--cache", str(out), "--attacks", "badnet_rs", "--defences",
                    "none", "clip", "par", "--defender", "--synthetic", "256"]) == 0
    record = json.loads((out / "data" / "synthetic-pca-gauss-256" / "synthetic.json").read_text())
    generator = json.loads((Path(record["generator"]) / "generator.json").read_text())
    assert Path(generator["config"]["train_table"]) == (out / "data" / "fashion-mnist" / "train.csv").absolute()
    rows = Path(record["train_csv"]).read_text().splitlines()[1:]
    assert len(rows) == 256 and not {Path(r.split("\t")[0]).name for r in rows} & holdout
    matrix = json.loads((synth_out / "matrix.json").read_text())
    assert matrix["protocol"]["clean_data"]["synthetic"] == 256
    assert "256 synthetic pairs" in (synth_out / "matrix.md").read_text()
    for d in ("clip", "par"):
        lr = matrix["cells"][d]["badnet_rs"]["lr"]
        cfg = yaml.safe_load((synth_out / "runs" / f"{d}-badnet_rs-lr{lr:g}-synth256" / "config.yaml").read_text())
        assert cfg["train_data"] == record["train_csv"]


def test_goal_table_checks_each_part_of_the_goal():
    """Catches a goal check that compares with the wrong row (the planted model for clean accuracy, the best other
    cleaning defence for ASR) or passes an attack that misses one part."""
    from parclip.protocol.report import goal_table
    c = lambda top1, asr: {"clean_top1": top1, "asr": asr}  # noqa: E731
    matrix = {"cells": {"none": {"a": c(90.0, 95.0), "b": c(90.0, 95.0), "d": c(90.0, 95.0)},
                        "clip": {"a": c(90.0, 80.0), "b": c(90.0, 6.0), "d": c(90.0, 90.0)},
                        "par": {"a": c(88.0, 5.0), "b": c(88.5, 4.0), "d": c(87.9, 1.0)}}}
    rows = {line.split(" | ")[0].strip("| `"): line for line in goal_table(matrix, ["a", "b", "d"]).splitlines()[2:]}
    assert rows["a"].endswith("| yes | yes | yes | **reached** |")  # 88.0 = 90 − 2; 5.0 ≤ 5; 5 ≤ 80 / 2
    assert rows["b"].endswith("| yes | yes | **no** | not reached |") and "clip (6.0)" in rows["b"]  # 4 > 6 / 2
    assert rows["d"].endswith("| yes | **no** | yes | not reached |")  # 87.9 < 88


@pytest.mark.slow
def test_badclip_side_optimises_a_patch_of_that_side_in_its_own_folder(dm, tmp_path, capsys, one_thread):
    out = tmp_path / "bench"
    assert dm.main(["--smoke", "--out", str(out), "--attacks", "badclip", "--stages", "A", "--badclip-side", "3"]) == 0
    from PIL import Image
    with Image.open(out / "badclip-3px" / "patch.png") as patch:
        assert patch.size == (3, 3)
    assert not (out / "badclip").exists()  # the protocol's 8-px patch would live there
    with pytest.raises(SystemExit):
        dm.main(["--smoke", "--out", str(out), "--badclip-side", "32"])
    assert "--badclip-side 32" in capsys.readouterr().err
