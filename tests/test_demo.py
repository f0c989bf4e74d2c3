"""The demo pipeline end to end on a small slice (the full demo runs in the README's first command)."""
import json

from parclip import demo


def test_demo_runs_end_to_end_and_reuses_finished_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DATA", dict(holdout=300, n_train=1300, n_test=300))
    monkeypatch.setattr(demo, "PRETRAIN", dict(demo.PRETRAIN, epochs=1, batch_size=100))
    monkeypatch.setattr(demo, "PAR", dict(demo.PAR, epochs=1, batch_size=100))
    r = demo.run_demo(tmp_path, attack="badnet_rs", target="bag")
    out = capsys.readouterr().out
    assert "model        | clean top-1 |     ASR" in out and "PAR-cleaned" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["model"] for row in saved["rows"]] == ["poisoned", "PAR-cleaned"]
    for row in saved["rows"]:
        assert {"model", "clean_top1", "asr", "asr_all"} <= set(row)
    assert saved["trigger"]["patch_size"] == 8 and r["attack"] == "badnet_rs"
    assert (tmp_path / "results.png").stat().st_size > 10_000
    manifest = json.loads((tmp_path / "poisoned-badnet_rs" / "manifest.json").read_text())
    assert manifest["n_poison"] == 10  # 1 % of the 1000 pre-training rows

    # a second run reuses the trained stages: same numbers, no training
    before = (tmp_path / "runs" / "poisoned-badnet_rs" / "checkpoints" / "latest.pt").stat().st_mtime_ns
    again = demo.run_demo(tmp_path, attack="badnet_rs", target="bag")
    assert again["rows"] == r["rows"]
    assert (tmp_path / "runs" / "poisoned-badnet_rs" / "checkpoints" / "latest.pt").stat().st_mtime_ns == before


def test_matrix_table_format():
    m = [{"attack": "sig", "poisoned": {"clean_top1": 88.0, "asr": 99.0}, "par": {"clean_top1": 86.0, "asr": 3.0}}]
    text = demo.format_matrix(m)
    assert "sig" in text and "99.0%" in text and "3.0%" in text
