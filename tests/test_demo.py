"""The demo is one attack of the defence × attack benchmark (parclip.protocol), plus retrieval: run on the
protocol's smoke size (the full demo runs in the README's first command)."""
import json
import sys
from pathlib import Path

import pytest
import yaml

from parclip import demo, protocol
from parclip.data.retrieval import read_retrieval
from parclip.evaluation import evaluate_retrieval
from parclip.models import create_model, get_tokenizer
from parclip.protocol import stages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run_demo(out, attack="badnet_rs", target="bag", smoke=True)


def _no_training(monkeypatch):
    monkeypatch.setattr(stages, "run_training", lambda cfg: pytest.fail(f"retrained {cfg.name}"))


@pytest.mark.slow  # shares one demo run of the protocol's smoke size (about a minute)
def test_demo_rows_are_the_protocols_stages_and_retrieval_is_the_models(smoke_demo, read_png):
    out, r = smoke_demo
    saved = json.loads((out / "results.json").read_text())
    assert [row["model"] for row in saved["rows"]] == ["foundation", "poisoned", "fine-tuning", "PAR"]
    # zero-shot numbers: the protocol's own records (the benchmark's cells), not a second evaluation
    plant = json.loads((out / "runs" / "plant-badnet_rs.json").read_text())
    cells = {d: json.loads((out / "cells" / f"{d}__badnet_rs.json").read_text()) for d in ("clip", "par")}
    expected = [plant["foundation_test"], plant["test"], cells["clip"]["test"], cells["par"]["test"]]
    for row, want in zip(saved["rows"], expected):
        assert {k: row[k] for k in want} == want, row["model"]
        assert (row["retrieval"]["n_images"], row["retrieval"]["n_captions"]) == (300, 1500)  # every test image, 5 each
    # the retrieval numbers are the PAR model's on the test images' caption table, identical captions interchangeable
    par = f"local-dir:{cells['par']['model']}"
    model, pp = create_model(par)
    trigger = protocol.make_trigger(demo.demo_settings(out, attacks=["badnet_rs"]), "badnet_rs")
    ret = evaluate_retrieval(model, pp, get_tokenizer(par), read_retrieval(out / "data" / "fashion-mnist" /
                                                                           "retrieval.csv"),
                             attacks=[trigger], target="bag", workers=0, progress=False, merge_identical=True)
    assert saved["rows"][-1]["retrieval"]["i2t_r1"] == pytest.approx(ret["clean"]["i2t"][1])
    assert saved["rows"][-1]["retrieval"]["asr_text"] == pytest.approx(ret["attacks"]["badnet_rs"]["asr_text"])
    assert saved["trigger"]["patch_size"] == protocol.TRIGGER_PARAMS["badnet_rs"]["patch_size"]
    assert r["attack"] == "badnet_rs" and saved["tau"] == protocol.DEFENCES["par"]["tau"]
    assert [row["lr"] for row in saved["rows"]] == [None, None, cells["clip"]["lr"], cells["par"]["lr"]]
    read_png(out / "results.png", coloured=0.01)  # the triggered examples and the bars


@pytest.mark.slow  # shares one demo run of the protocol's smoke size (about a minute)
def test_demo_trains_with_the_benchmarks_settings(smoke_demo):
    out, _ = smoke_demo
    runs = out / "runs"
    cfg = lambda run: yaml.safe_load((runs / run / "config.yaml").read_text())  # noqa: E731
    assert cfg("foundation")["pretrained"] is None and cfg("foundation")["objective"] == "clip"
    assert cfg("plant-badnet_rs")["model"] == f"local-dir:{runs / 'foundation' / 'model'}"  # planted by fine-tuning
    manifest = json.loads((out / "poisoned" / "badnet_rs" / "manifest.json").read_text())
    assert manifest["n_rows"] == 512 and manifest["n_poison"] == round(0.1 * 512)  # the protocol's smoke plant
    s = protocol.Settings.defender(out=str(out), cache=str(out), smoke=True)
    for defence in ("clip", "par"):
        cell = json.loads((out / "cells" / f"{defence}__badnet_rs.json").read_text())
        assert [g["lr"] for g in cell["grid"]][0] == max(demo.DEMO_LR_GRID)  # the defender's rule, from the top
        c = cfg(f"{defence}-badnet_rs-lr{cell['lr']:g}")  # the common budget from the planted model, the chosen lr
        want = {**s.clean, **protocol.DEFENCES[defence], "lr": cell["lr"]}
        assert {k: c[k] for k in want} == want
        assert c["model"] == f"local-dir:{runs / 'plant-badnet_rs' / 'model'}" and c["train_data"].endswith(
            "defender_train.csv")


@pytest.mark.slow  # shares one demo run of the protocol's smoke size (about a minute)
def test_demo_again_reuses_every_stage(smoke_demo, monkeypatch):
    out, r = smoke_demo
    _no_training(monkeypatch)
    again = demo.run_demo(out, attack="badnet_rs", target="bag", smoke=True)
    assert again["rows"] == r["rows"]


@pytest.mark.slow  # shares one demo run of the protocol's smoke size (about a minute)
def test_the_benchmark_on_the_demos_folder_reuses_it_and_agrees(smoke_demo, monkeypatch, capsys):
    """One protocol: the benchmark script pointed at the demo's folder trains nothing, and its matrix holds the
    demo's numbers; the demo's matrix mode is the same matrix."""
    out, r = smoke_demo
    _no_training(monkeypatch)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import defence_matrix
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert defence_matrix.main(["--smoke", "--out", str(out), "--attacks", "badnet_rs", "--defences", "none", "clip",
                                "par", "--defender", "--lr-grid", *map(str, demo.DEMO_LR_GRID)]) == 0
    matrix = json.loads((out / "matrix.json").read_text())
    rows = {row["model"]: row for row in r["rows"]}
    for key, label in (("none", "poisoned"), ("clip", "fine-tuning"), ("par", "PAR")):
        cell = matrix["cells"][key]["badnet_rs"]
        assert (cell["clean_top1"], cell["asr"]) == (rows[label]["clean_top1"], rows[label]["asr"])
    m = demo.run_matrix(out, attacks=["badnet_rs"], smoke=True)
    assert m["cells"] == matrix["cells"] and m["protocol"] == matrix["protocol"]
    assert "| par |" in capsys.readouterr().out


def test_demo_options_change_the_protocols_settings(tmp_path):
    assert demo.defence_keys(None) == ["clip", "par"]
    assert demo.defence_keys(["PAR", "cleanclip", "Fine-tuning + PAR aug"]) == ["clip_aug", "cleanclip", "par"]
    assert demo.defence_keys(["all"]) == ["clip", "clip_aug", "cleanclip", "roclip", "par"]
    with pytest.raises(ValueError, match="unknown demo defence.*cleenclip"):
        demo.defence_keys(["cleenclip"])
    s = demo.demo_settings(tmp_path, attacks=["badnet_rs"], tau=3.0, trigger_params={"patch_size": 4}, target="coat")
    assert s.defences["par"]["tau"] == 3.0 and protocol.DEFENCES["par"]["tau"] == 2.0  # a copy, not the constant
    assert s.trigger_params["badnet_rs"] == {"patch_size": 4} and s.target == "coat"
    assert s.eval_spec()["target"] == "coat"
    assert protocol.make_trigger(s, "badnet_rs").params()["patch_size"] == 4


def test_format_table_shows_every_metric():
    rows = [{"model": "PAR", "clean_top1": 81.94, "asr": 4.7, "lr": 3e-4,
             "retrieval": {"i2t_r1": 80.0, "t2i_r1": 100.0, "asr_text": 7.1}}]
    text = demo.format_table(rows)
    assert "PAR" in text and "81.9%" in text and "4.7%" in text and "100.0%" in text and "7.1%" in text
    assert "3e-4" in text


@pytest.mark.slow  # reuses the smoke demo's foundation and planted model; trains its cells on synthetic pairs
def test_demo_cleans_on_synthetic_pairs_when_asked(smoke_demo, capsys):
    """`parclip demo --clean-data synthetic`: the same planted model, its cells cleaned on the protocol's synthetic
    pairs (not the real held-out ones), chosen on the same real validation; the real cells stay as they were."""
    from parclip.cli import main

    out, _ = smoke_demo
    real_cells = {d: (out / "cells" / f"{d}__badnet_rs.json").read_text() for d in ("clip", "par")}
    assert main(["demo", "--smoke", "--out", str(out), "--clean-data", "synthetic"]) == 0
    assert "synthetic pairs (a generator fitted to the foundation's pairs)" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    n = saved["protocol"]["synthetic_pairs"]
    assert saved["protocol"]["clean_data"] == "synthetic" and n > 0
    table = out / "data" / f"synthetic-{protocol.SYNTH['family']}-{n}" / "pairs" / "synthetic.csv"
    for defence in ("clip", "par"):
        cell = json.loads((out / "cells" / f"{defence}__badnet_rs__synth{n}.json").read_text())
        cfg = yaml.safe_load((out / "runs" / f"{defence}-badnet_rs-lr{cell['lr']:g}-synth{n}" / "config.yaml")
                             .read_text())
        assert cfg["train_data"] == str(table)
        assert (out / "cells" / f"{defence}__badnet_rs.json").read_text() == real_cells[defence]
