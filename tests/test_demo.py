"""The demo pipeline end to end on a small slice (the full demo runs in the README's first command)."""
import json

import pytest
import yaml

from parclip import demo
from parclip.attacks.triggers import get_trigger
from parclip.evaluation import evaluate
from parclip.models import create_model, get_tokenizer


def _tiny(monkeypatch, *, holdout, n_train, n_test, plant_rows, batch):
    """The demo's stages at a size that runs in seconds (same code, fewer images and one epoch each)."""
    monkeypatch.setattr(demo, "DATA", dict(holdout=holdout, n_train=n_train, n_test=n_test))
    monkeypatch.setattr(demo, "PLANT_ROWS", plant_rows)
    for stage in ("FOUNDATION", "PLANT", "CLEAN"):
        monkeypatch.setattr(demo, stage, dict(getattr(demo, stage), epochs=1, batch_size=batch, workers=0))


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_finished_stages(tmp_path, monkeypatch, capsys, read_png):
    _tiny(monkeypatch, holdout=300, n_train=1300, n_test=300, plant_rows=500, batch=100)
    r = demo.run_demo(tmp_path, attack="badnet_rs", target="bag")
    out = capsys.readouterr().out
    assert "model        | clean top-1 |         ASR |     i2t R@1 |     t2i R@1 |   retr. ASR" in out
    assert "fine-tuning" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["model"] for row in saved["rows"]] == ["foundation", "poisoned", "fine-tuning", "PAR"]
    for row in saved["rows"]:
        assert {"model", "clean_top1", "asr", "asr_all"} <= set(row)
        assert (row["retrieval"]["n_images"], row["retrieval"]["n_captions"]) == (300, 1500)  # every test image, 5 each
    # the retrieval row is the PAR model's on the test images' caption table, identical captions interchangeable
    from parclip.data.retrieval import read_retrieval
    from parclip.evaluation import evaluate_retrieval
    from parclip.models import create_model, get_tokenizer
    par = f"local-dir:{tmp_path / 'runs' / 'par-badnet_rs' / 'model'}"
    model, pp = create_model(par)
    trig = demo._demo_triggers(["badnet_rs"], None)["badnet_rs"]
    ret = evaluate_retrieval(model, pp, get_tokenizer(par), read_retrieval(tmp_path / "fashion-mnist" / "retrieval.csv"),
                             attacks=[trig], target="bag", workers=0, progress=False, merge_identical=True)
    assert saved["rows"][-1]["retrieval"]["i2t_r1"] == pytest.approx(ret["clean"]["i2t"][1])
    assert saved["rows"][-1]["retrieval"]["asr_text"] == pytest.approx(ret["attacks"]["badnet_rs"]["asr_text"])
    assert saved["trigger"]["patch_size"] == 8 and r["attack"] == "badnet_rs"
    read_png(tmp_path / "results.png", coloured=0.01)  # example images and bars
    manifest = json.loads((tmp_path / "poisoned-badnet_rs" / "manifest.json").read_text())
    assert manifest["n_poison"] == 50 and manifest["n_rows"] == 500  # 10 % of the planting rows
    runs = tmp_path / "runs"
    cfg = lambda run: yaml.safe_load((runs / run / "config.yaml").read_text())  # noqa: E731
    assert cfg("foundation")["pretrained"] is None and cfg("foundation")["objective"] == "clip"
    assert cfg("poisoned-badnet_rs")["model"] == f"local-dir:{runs / 'foundation' / 'model'}"  # planted by fine-tuning
    for run, objective in (("fine-tuning-badnet_rs", "clip"), ("par-badnet_rs", "par")):
        c = cfg(run)  # every defence: the same clean pairs, budget and schedule, from the poisoned model
        assert c["objective"] == objective and c["model"] == f"local-dir:{runs / 'poisoned-badnet_rs' / 'model'}"
        assert c["train_data"].endswith("holdout.csv") and (c["lr"], c["epochs"]) == (demo.CLEAN["lr"], 1)

    # a second run reuses the trained stages: same numbers, no training; also when a run's config.yaml predates an
    # option (a key it lacks counts as that option's default)
    saved = yaml.safe_load((runs / "poisoned-badnet_rs" / "config.yaml").read_text())
    del saved["skip_nonfinite"]
    (runs / "poisoned-badnet_rs" / "config.yaml").write_text(yaml.safe_dump(saved))
    before = (tmp_path / "runs" / "poisoned-badnet_rs" / "checkpoints" / "latest.pt").stat().st_mtime_ns
    again = demo.run_demo(tmp_path, attack="badnet_rs", target="bag")
    assert again["rows"] == r["rows"]
    assert (tmp_path / "runs" / "poisoned-badnet_rs" / "checkpoints" / "latest.pt").stat().st_mtime_ns == before


def test_matrix_table_format():
    m = [{"attack": "sig", "poisoned": {"clean_top1": 88.0, "asr": 99.0}, "par": {"clean_top1": 86.0, "asr": 3.0}}]
    text = demo.format_matrix(m)
    assert "sig" in text and "99.0%" in text and "3.0%" in text


@pytest.mark.slow
def test_run_matrix_reports_real_evaluations_and_skips_attacks_without_a_patch(tmp_path, monkeypatch, capsys,
                                                                             read_png):
    """Catches run_matrix writing numbers that are not the evaluation of the models it trained (or of the wrong
    model), losing the skipped attack, or not printing the table: the smallest real run, re-evaluated here."""
    _tiny(monkeypatch, holdout=100, n_train=300, n_test=100, plant_rows=150, batch=50)
    r = demo.run_matrix(tmp_path, attacks=["badnet_rs", "badclip"], target="bag")  # badclip needs a patch file
    out = capsys.readouterr().out

    saved = json.loads((tmp_path / "matrix.json").read_text())
    assert saved == json.loads(json.dumps(r))
    assert list(saved["skipped"]) == ["badclip"] and "patch" in saved["skipped"]["badclip"]
    assert saved["complete"] is True and saved["target"] == "bag" and saved["model"] == demo.MODEL
    assert saved["tau"] == demo.DEFENCES["PAR"]["tau"] and saved["poison_rate"] == demo.POISON_RATE
    (entry,) = saved["matrix"]
    assert entry["attack"] == "badnet_rs" and entry["trigger"]["patch_size"] == 8  # the demo's own trigger size

    runs = tmp_path / "runs"
    par_cfg = yaml.safe_load((runs / "par-badnet_rs" / "config.yaml").read_text())
    assert par_cfg["objective"] == "par" and par_cfg["model"] == f"local-dir:{runs / 'poisoned-badnet_rs' / 'model'}"
    assert yaml.safe_load((runs / "poisoned-badnet_rs" / "config.yaml").read_text())["train_data"].endswith(
        "poisoned-badnet_rs/poisoned.csv")
    trigger = get_trigger("badnet_rs", **entry["trigger"])
    test_dir = tmp_path / "fashion-mnist" / "test"
    for stage, run in (("poisoned", "poisoned-badnet_rs"), ("par", "par-badnet_rs")):
        model, pp = create_model(f"local-dir:{runs / run / 'model'}")
        again = evaluate(model, pp, get_tokenizer(f"local-dir:{runs / run / 'model'}"), test_dir, attacks=[trigger],
                         target="bag", templates=demo.TEMPLATES, seed=0, workers=0, progress=False)
        assert again["n_images"] == 100
        assert entry[stage] == {m: again[m] for m in ("clean_top1", "asr", "asr_all")}, stage

    assert "skipping badclip" in out and demo.format_matrix(saved["matrix"]) in out
    row = next(line for line in out.splitlines() if line.startswith("badnet_rs "))
    for value in (entry["poisoned"]["clean_top1"], entry["poisoned"]["asr"], entry["par"]["clean_top1"],
                  entry["par"]["asr"]):
        assert f"{value:.1f}%" in row
    read_png(tmp_path / "matrix.png", coloured=0.01)  # the bars
