"""Every `parclip train` flag that shares its name with one of open_clip_train's means what it means there; the flags
of open_clip_train that parclip does not support are refused by name, with the reason; docs/compatibility.md lists them all."""
import ast
import importlib.util
import json
import re
import struct
import sys
from pathlib import Path

import pytest
import torch

from parclip.cli import build_parser, main
from parclip.config import OPEN_CLIP_REFUSED, config_from_args, load_yaml, make_config
from parclip.data import DataError
from parclip.data.sources import open_training_data
from parclip.evaluation.retrieval_metrics import pair_ranks
from parclip.runs import RunLog
from parclip.train import train

ROOT = Path(__file__).resolve().parents[1]


def open_clip_train_flags() -> list[str]:
    """Every flag of open_clip_train's parser, read from its params.py (open_clip_torch ships it; not imported)."""
    spec = importlib.util.find_spec("open_clip_train")
    assert spec is not None, "open_clip_train (part of open_clip_torch, a dependency) is not installed"
    source = Path(spec.submodule_search_locations[0], "params.py").read_text()
    flags = [a.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", "") == "add_argument"
             for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
    assert len(flags) > 80 and "--lr" in flags and "--warmup" in flags
    return flags


def train_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {s for a in sub.choices["train"]._actions if a.help != "==SUPPRESS==" for s in a.option_strings}


def test_every_open_clip_train_flag_is_a_parclip_flag_or_refused_and_the_docs_list_it():
    ours, section = train_flags(), _docs_section()
    for flag in open_clip_train_flags():
        assert f"`{flag}`" in section, f"docs/compatibility.md's 'Coming from open_clip_train' does not list {flag}"
        assert (flag in ours) != (flag in OPEN_CLIP_REFUSED), flag  # supported, or refused with a reason: not both
    for flag in OPEN_CLIP_REFUSED:
        assert flag in open_clip_train_flags() and len(OPEN_CLIP_REFUSED[flag]) > 20


def _docs_section() -> str:
    text = (ROOT / "docs" / "compatibility.md").read_text()
    start = text.index("## Coming from open_clip_train")
    end = text.find("\n## ", start + 10)
    return text[start:end if end > 0 else None]


@pytest.mark.parametrize("argv", [["--lock-image"], ["--lock-text-unlocked-layers", "2"], ["--siglip"],
                                  ["--opt", "sgd"], ["--aug-cfg", "scale=(0.9,1.0)", "color_jitter=0.4"],
                                  ["--imagenet-v2", "v2/"], ["--horovod"]])
def test_a_refused_open_clip_flag_stops_the_parse_naming_it_and_why(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--train-data", "t.csv", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {argv[0]} is not supported: {OPEN_CLIP_REFUSED[argv[0]]}" in err


def test_what_parclip_does_anyway_passes(tmp_path, capsys):
    args = build_parser().parse_args(["train", "--train-data", "t.csv", "--opt", "adamw", "--gather-with-grad",
                                      "--save-most-recent", "--precision", "amp_bfloat16", "--resume", "latest",
                                      "--warmup-steps", "40"])
    cfg = config_from_args(args)
    assert (cfg.precision, cfg.resume, cfg.warmup) == ("amp_bf16", "latest", 40)
    for argv in (["--opt", "adamw", "sgd"], ["--gather-with-grad", "x"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", *argv])
        assert f"error: {argv[0]} is not supported" in capsys.readouterr().err


def test_lr_start_is_gone_with_an_error_that_gives_the_new_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--lr-start", "3e-4", "--lr", "3e-5"])
    assert "--lr A --lr-decay-ratio B/A" in capsys.readouterr().err
    (tmp_path / "old.yaml").write_text("lr_start: 3.0e-4\nlr: 3.0e-5\n")
    with pytest.raises(ValueError, match="old.yaml: --lr-start is not supported: removed.*--lr-decay-ratio"):
        load_yaml(tmp_path / "old.yaml")
    assert main(["train", "--config", str(tmp_path / "old.yaml")]) == 2
    (tmp_path / "frac.yaml").write_text("warmup: 0.05\n")  # the old fraction meaning of --warmup
    assert main(["train", "--config", str(tmp_path / "frac.yaml")]) == 2
    assert "--warmup-fraction 0.05" in capsys.readouterr().err


def test_an_explicit_warmup_beats_the_recipes_fraction_and_the_other_way_round(tmp_path):
    """Catches the recipe's warm-up (plain CLIP: 5 % of the run; CleanCLIP: 50 steps) winning over the other spelling
    given explicitly, from the flags or a YAML file."""
    assert (make_config(objective="clip").warmup, make_config(objective="clip").warmup_fraction) == (None, 0.05)
    assert make_config(objective="clip", warmup=100).warmup == 100
    cc = make_config(objective="cleanclip", warmup_fraction=0.1)
    assert (cc.warmup, cc.warmup_fraction) == (None, 0.1)
    (tmp_path / "c.yaml").write_text("objective: cleanclip\nwarmup_fraction: 0.2\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml")])
    assert (config_from_args(args).warmup, config_from_args(args).warmup_fraction) == (None, 0.2)
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--warmup", "7"])
    assert config_from_args(args).warmup == 7
    assert make_config(preset="clip-cleanclip-recipe", warmup_fraction=0.3).warmup is None


def test_train_num_samples_is_for_shards_and_train_rows_for_tables(fmnist_small, shards):
    kw = dict(transform=lambda im: torch.zeros(1), tokenizer=lambda c: torch.zeros(len(c), 1), batch_size=4)
    with pytest.raises(DataError, match="--train-num-samples 8: open_clip_train's samples per epoch.*--train-rows 8"):
        open_training_data(str(fmnist_small["train_csv"]), num_samples=8, **kw)
    assert len(open_training_data(str(fmnist_small["train_csv"]), rows=8, **kw)) == 8
    with pytest.raises(DataError, match="--train-rows"):
        open_training_data(str(shards[0]), rows=8, **kw)
    assert len(open_training_data(str(shards[0]), num_samples=300, **kw)) == 300


def test_pair_ranks_are_open_clips_validation_metrics():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.05]])
    txt = torch.tensor([[0.8, 0.6], [0.9, 1.0], [0.1, 0.2]])
    # scores s(i, j) = img_i·txt_j: image 0 ranks its caption 2nd (caption 1 scores .9 > .8), image 1 first, image 2
    # last (.11 < .83 < .95); caption 0 ranks its image 2nd (.83 > .8), caption 1 first, caption 2 2nd (.2 > .11)
    r = pair_ranks(img, txt, ks=(1, 2))
    assert (r["image_to_text_R@1"], r["image_to_text_R@2"]) == pytest.approx((1 / 3, 2 / 3))
    assert (r["image_to_text_mean_rank"], r["image_to_text_median_rank"]) == pytest.approx((2.0, 2.0))
    assert (r["text_to_image_R@1"], r["text_to_image_R@2"]) == pytest.approx((1 / 3, 1.0))
    assert (r["text_to_image_mean_rank"], r["text_to_image_median_rank"]) == pytest.approx((1 + 2 / 3, 2.0))
    with pytest.raises(ValueError, match="one each"):
        pair_ranks(img, txt[:2])


def _tiny(tmp_path, micro_model_dir, fmnist_small, **kw):
    return dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]), objective="clip",
                train_rows=16, batch_size=8, workers=0, output_dir=str(tmp_path), progress=False, log_every=1, **kw)


def _rows(run, key):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.slow
def test_val_data_is_open_clips_pair_validation_at_its_frequencies(tmp_path, micro_model_dir, fmnist_small):
    """Catches --val-data validating anything but the pairs (loss and retrieval, as open_clip's evaluate), at other
    epochs than --val-frequency's, and --imagenet-val's zero-shot ignoring --zeroshot-frequency."""
    from parclip.models import create_model, eval_transform, get_tokenizer
    from parclip.objectives import clip_loss

    pairs = str(fmnist_small["holdout_csv"])
    run = train(make_config(name="v", epochs=3, val_data=pairs, val_frequency=2, val_num_samples=20,
                            imagenet_val=str(fmnist_small["test_dir"]), zeroshot_frequency=2,
                            **_tiny(tmp_path, micro_model_dir, fmnist_small)))
    val, zs = _rows(run, "clip_val_loss"), _rows(run, "val_clean_top1")
    assert [r["step"] for r in val] == [4, 6] and [r["step"] for r in zs] == [4, 6]  # epochs 2 and 3 (the last)
    assert val[-1]["val_num_samples"] == 20 and set(val[-1]) >= {
        f"{d}_{m}" for d in ("image_to_text", "text_to_image") for m in ("R@1", "R@5", "R@10", "mean_rank",
                                                                          "median_rank")}
    # the last row is the final model's, and one batch of all 20 pairs gives the plain CLIP loss of the 20
    model, pp = create_model(f"local-dir:{run / 'model'}")
    tok, tf = get_tokenizer(f"local-dir:{run / 'model'}"), eval_transform(pp)
    from parclip.data import CaptionDataset
    table = CaptionDataset(pairs, num_samples=20)
    with torch.no_grad():
        f = model.encode_image(torch.stack([tf(table.load_image(i)) for i in range(20)]), normalize=True)
        g = model.encode_text(tok(table.captions), normalize=True)
        scale = model.logit_scale.exp()
    ranks = pair_ranks(f, g)
    assert {k: val[-1][k] for k in ranks} == pytest.approx(ranks)
    from parclip.evaluation.retrieval import validate_pairs
    from parclip.data.sources import validation_pairs
    one = validate_pairs(model, validation_pairs(pairs, img_key="filepath", caption_key="title", limit=20),
                         transform=tf, tokenizer=tok, batch_size=20, device=torch.device("cpu"))
    assert one["clip_val_loss"] == pytest.approx(clip_loss(f, g, scale).item(), rel=1e-5)
    batched = validate_pairs(model, validation_pairs(pairs, img_key="filepath", caption_key="title", limit=20),
                             transform=tf, tokenizer=tok, batch_size=8, device=torch.device("cpu"))
    assert batched["clip_val_loss"] == pytest.approx(val[-1]["clip_val_loss"], rel=1e-5)
    never = train(make_config(name="n", epochs=1, val_data=pairs, val_frequency=0,
                              **_tiny(tmp_path, micro_model_dir, fmnist_small)))
    assert _rows(never, "clip_val_loss") == []


def test_an_old_style_val_data_folder_is_an_error_naming_imagenet_val(tmp_path, micro_model_dir, fmnist_small):
    with pytest.raises(ValueError, match="--val-data .* is a folder.*--imagenet-val"):
        train(make_config(name="old", epochs=1, val_data=str(fmnist_small["test_dir"]),
                          **_tiny(tmp_path, micro_model_dir, fmnist_small)))


@pytest.mark.slow
def test_resume_latest_is_the_runs_latest_checkpoint_and_an_error_without_one(tmp_path, micro_model_dir,
                                                                               fmnist_small, caplog):
    with pytest.raises(FileNotFoundError, match="--resume latest: run .* has no checkpoint"):
        train(make_config(name="fresh", epochs=1, resume="latest", **_tiny(tmp_path, micro_model_dir, fmnist_small)))
    train(make_config(name="r", epochs=1, **_tiny(tmp_path, micro_model_dir, fmnist_small)))
    caplog.clear()
    train(make_config(name="r", epochs=1, resume="latest", **_tiny(tmp_path, micro_model_dir, fmnist_small)))
    assert "resumed from" in caplog.text and "latest.pt at step 2/2" in caplog.text


def _wandb_history(wandb_dir: Path) -> list[dict]:
    """The history rows of the offline wandb run under `wandb_dir` (its .wandb file: a LevelDB-style log of
    protobuf records, 32 KiB blocks, 7-byte record headers, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunk, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            chunk = b""
        if n == 0 and kind == 0:
            break
    return rows


@pytest.mark.slow
def test_report_to_wandb_logs_the_runs_metrics_offline(tmp_path, micro_model_dir, fmnist_small, monkeypatch):
    import wandb  # noqa: F401  (the test extra installs it: pip install parclip[test])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(make_config(name="wb", epochs=1, report_to="tensorboard,wandb", wandb_project_name="parclip-test",
                            val_data=str(fmnist_small["holdout_csv"]), val_num_samples=8,
                            **_tiny(tmp_path, micro_model_dir, fmnist_small)))
    history = _wandb_history(tmp_path / "wb")
    logged = {(h["_step"], k): v for h in history for k, v in h.items() if not k.startswith("_")}
    for row in _rows(run, "loss"):
        assert logged[(row["step"], "train/loss")] == pytest.approx(row["loss"])
        assert logged[(row["step"], "train/lr")] == pytest.approx(row["lr"])
    (val,) = _rows(run, "clip_val_loss")
    assert logged[(val["step"], "val/clip_val_loss")] == pytest.approx(val["clip_val_loss"])
    assert logged[(val["step"], "val/image_to_text_R@1")] == pytest.approx(val["image_to_text_R@1"])
    assert (run / "tensorboard").is_dir()


def test_report_to_wandb_without_wandb_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    with pytest.raises(RuntimeError, match=re.escape("pip install 'parclip[wandb]'")):
        RunLog(tmp_path, "wandb")
    assert make_config(report_to="wandb,tensorboard").report_to == "tensorboard,wandb"


def test_val_data_reads_pairs_from_a_table_or_shards_in_order(fmnist_small, shards):
    """Catches --val-data shards yielding other pairs (or another order) than the table they were made from."""
    from parclip.data.sources import validation_pairs

    keys = dict(img_key="filepath", caption_key="title")
    table = list(validation_pairs(str(fmnist_small["train_csv"]), limit=12, **keys))
    stream = list(validation_pairs(f"{shards[0]}/{{00000..00005}}.tar", limit=12, **keys))
    assert len(table) == len(stream) == 12
    assert [c for _, c in stream] == [c for _, c in table]
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(table, stream))
