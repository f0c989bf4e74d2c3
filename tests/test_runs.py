"""Run directories: TensorBoard scalars, run.json, epoch checkpoints, `parclip runs`, open_clip_train's flag names."""
import json

import pytest
import torch

from parclip.cli import build_parser, main
from parclip.config import config_from_args, make_config
from parclip.defences.schedule import lr_at
from parclip.runs import git_commit, list_runs
from parclip.train import train


def test_tensorboard_run_json_epoch_checkpoints_and_the_runs_listing(tmp_path, fmnist_small, micro_model_dir,
                                                                      capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(make_config(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]),
                            objective="clip", epochs=2, batch_size=8, train_rows=32, workers=0,
                            output_dir=str(tmp_path), name="tb", progress=False, log_every=1,
                            report_to="tensorboard", save_frequency=1, imagenet_val=str(fmnist_small["test_dir"]),
                            val_templates="fashion"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = [e.value for e in events.Scalars("train/loss")]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert loss == pytest.approx([m["loss"] for m in logged if "loss" in m])  # the same numbers as metrics.jsonl
    assert [e.step for e in events.Scalars("val/clean_top1")] == [4, 8]
    for epoch in (1, 2):  # open_clip's --save-frequency 1: a checkpoint kept per epoch
        assert torch.load(run / f"checkpoints/epoch_{epoch}.pt", weights_only=True)["step"] == 4 * epoch
    start = json.loads((run / "run.json").read_text())["starts"][0]
    assert start["world_size"] == 1 and start["parclip"] and start["torch"] == torch.__version__
    assert start["git"] == git_commit()  # the source checkout's commit (None outside a checkout)

    (rows,) = list_runs(tmp_path)
    assert (rows["name"], rows["step"], rows["finished"]) == ("tb", 8, True)
    assert rows["val_clean_top1"] == [m for m in logged if "val_clean_top1" in m][-1]["val_clean_top1"]
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tb" in out and "finished" in out and "clip" in out


def test_runs_marks_an_unfinished_run_and_survives_a_cut_metrics_line(tmp_path):
    run = tmp_path / "half"
    run.mkdir()
    (run / "config.yaml").write_text("objective: par\nmodel: ViT-B-32\n")
    (run / "metrics.jsonl").write_text('{"step": 10, "epoch": 0, "loss": 1.5}\n{"step": 20, "ep')  # killed mid-write
    (row,) = list_runs(tmp_path)
    assert (row["step"], row["loss"], row["finished"]) == (10, 1.5, False)
    with pytest.raises(FileNotFoundError):
        list_runs(tmp_path / "missing")


def test_open_clip_train_flag_names_are_accepted_with_their_meanings(tmp_path):
    args = build_parser().parse_args(
        ["train", "--train-data", "x.csv", "--logs", str(tmp_path), "--lr-scheduler", "const", "--warmup", "500",
         "--grad-clip-norm", "1.0", "--save-frequency", "2", "--accum-freq", "4", "--grad-checkpointing",
         "--report-to", "tensorboard", "--dataset-type", "webdataset", "--log-every-n-steps", "7",
         "--imagenet-val", "val/", "--torchcompile"])
    cfg = config_from_args(args)
    assert (cfg.output_dir, cfg.schedule, cfg.warmup, cfg.grad_clip, cfg.save_frequency, cfg.accum_freq) == \
        (str(tmp_path), "constant", 500, 1.0, 2, 4)
    assert cfg.grad_checkpointing and cfg.torch_compile and cfg.report_to == "tensorboard"
    assert (cfg.dataset_type, cfg.log_every, cfg.imagenet_val, cfg.val_data) == ("webdataset", 7, "val/", None)


def test_warmup_is_whole_steps_and_the_fraction_has_its_own_name():
    kw = dict(schedule="cosine", steps_per_epoch=100, epochs=2, lr=1.0, lr_end=0.0)
    assert lr_at(9, warmup=10, **kw) == pytest.approx(1.0)      # 10 warm-up steps, as open_clip_train counts
    assert lr_at(9, warmup_fraction=0.05, **kw) == pytest.approx(1.0)    # 5 % of 200 steps: the same
    assert lr_at(4, warmup=10, **kw) == pytest.approx(0.5)
    assert lr_at(4, warmup=10, warmup_fraction=0.5, **kw) == pytest.approx(0.5)  # steps win over a fraction
    ref = dict(kw, schedule="reference", lr=1.0, lr_decay_ratio=0.1)
    assert lr_at(50, warmup=100, **ref) == pytest.approx(1.0 + 50 * (0.1 - 1.0) / 99)  # Wu = 100 steps of linear
    for bad in (1.5, 0.5, 0.05):
        with pytest.raises(ValueError, match="--warmup-fraction"):
            make_config(warmup=bad)
    with pytest.raises(ValueError, match="--warmup must be"):
        make_config(warmup=-1)
