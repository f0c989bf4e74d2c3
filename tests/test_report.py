"""parclip report over several result files, and clip_benchmark's layout read back."""
import csv
import json

import pytest

from parclip.cli import main
from parclip.data import DataError
from parclip.evaluation.clip_benchmark import to_clip_benchmark
from parclip.evaluation.report import report_rows


def _results(tmp_path):
    zs = {"model": "ViT-B-32-quickgelu", "checkpoint": "/ckpt/par.pt", "data": "/imagenet/val", "clean_top1": 61.25,
          "clean_top5": 85.0, "attacks": {"badnet_rs": {"asr": 2.5, "asr_all": 2.6}, "sig": {"asr": 10.0}}}
    rt = {"model": "local-dir:runs/x/model", "checkpoint": None, "source": "coco_karpathy_test.json",
          "clean": {"i2t": {"1": 40.0, "5": 70.0}, "t2i": {"1": 30.0, "5": 60.0}},
          "attacks": {"badnet_rs": {"asr_text": 88.0, "asr_text_strict": 87.0}}}
    (tmp_path / "zs.json").write_text(json.dumps(zs))
    (tmp_path / "rt.json").write_text(json.dumps(rt))
    return [tmp_path / "zs.json", tmp_path / "rt.json"]


def test_report_gathers_zero_shot_and_retrieval_results(tmp_path, capsys, read_png):
    files = _results(tmp_path)
    rows = report_rows(files)
    assert [(r["label"], r["task"], r["clean"]) for r in rows] == [
        ("ViT-B-32-quickgelu (par.pt)", "zero-shot", 61.25), ("local-dir:runs/x/model", "retrieval", 40.0)]
    assert rows[0]["asr"] == {"badnet_rs": 2.5, "sig": 10.0} and rows[1]["asr"] == {"badnet_rs": 88.0}
    out = tmp_path / "t"
    assert main(["report", *map(str, files), "--out", f"{out}.md", "--csv", f"{out}.csv", "--plot", f"{out}.png"]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "| ViT-B-32-quickgelu (par.pt) | zero-shot | 61.2 (top-1) | 2.5 | 10.0 |" in md
    assert "| local-dir:runs/x/model | retrieval | 40.0 (i2t R@1) | 88.0 | – |" in md
    assert md.strip() in capsys.readouterr().out
    table = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert table[0]["asr_sig"] == "10.0000" and table[1]["asr_sig"] == "" and table[1]["clean_metric"] == "i2t R@1"
    read_png(tmp_path / "t.png", coloured=0.01)  # the bars
    (tmp_path / "bad.json").write_text('{"loss": 1}')
    with pytest.raises(DataError, match="not a parclip eval"):
        report_rows([tmp_path / "bad.json"])
    assert main(["report", str(tmp_path / "missing.json")]) == 2


def test_clip_benchmark_layout(micro_model_dir, fmnist_small, tmp_path):
    """Our zero-shot result in clip_benchmark's record: fractions, its key names, its task name."""
    out, cb = tmp_path / "r.json", tmp_path / "cb.json"
    assert main(["eval", "--model", f"local-dir:{micro_model_dir}", "--data", str(fmnist_small["test_dir"]),
                 "--templates", "fashion", "--workers", "0", "--out", str(out), "--clip-benchmark-out", str(cb),
                 "--dataset-name", "fashion_mnist"]) == 0
    ours, theirs = json.loads(out.read_text()), json.loads(cb.read_text())
    assert set(theirs) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert theirs["dataset"] == "fashion_mnist" and theirs["task"] == "zeroshot_classification"
    assert theirs["pretrained"] == "" and theirs["model"] == f"local-dir:{micro_model_dir}"  # a string, never null
    assert theirs["metrics"]["acc1"] == pytest.approx(ours["clean_top1"] / 100)
    assert theirs["metrics"]["acc5"] == pytest.approx(ours["clean_top5"] / 100)
    recall = list(ours["per_class_recall"].values())
    assert theirs["metrics"]["mean_per_class_recall"] == pytest.approx(sum(recall) / len(recall) / 100)
    with pytest.raises(ValueError, match="not a parclip zero-shot or retrieval result"):
        to_clip_benchmark({"clean": {}}, "coco")
