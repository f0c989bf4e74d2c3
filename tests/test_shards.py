"""webdataset shards: conversion both ways, training over shards (resume, workers, bad samples), evaluation.
Remote sources, the split between workers and resampled mode: test_shard_sources.py."""
import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parclip import train as train_mod
from parclip.config import make_config
from parclip.data import CaptionDataset, DataError, read_table
from parclip.data import shards as shards_mod
from parclip.data.shards import (
    ShardStream,
    decode_image,
    expand_urls,
    read_shard,
    shard_sizes,
    shards_to_table,
    table_to_shards,
)
from parclip.data.sources import open_training_data
from parclip.train import train


def test_table_to_shards_and_back_keeps_every_image_byte_and_caption(shards, fmnist_small, tmp_path):
    out, r = shards
    assert len(r["shards"]) == 6 and r["n_samples"] == 600 and not r["bad_rows"]
    assert json.loads((out / "sizes.json").read_text()) == {f"{i:05d}.tar": 100 for i in range(6)}
    assert shard_sizes(expand_urls(str(out / "{00000..00005}.tar"))) == 600
    first = next(read_shard(r["shards"][0]))
    assert set(first) >= {"__key__", "png", "txt", "json"} and json.loads(first["json"])["line"] == 2
    back = shards_to_table(str(out), tmp_path / "back")
    _, rows = read_table(back["table"])
    _, orig = read_table(fmnist_small["train_csv"])
    assert [r["title"] for r in rows] == [r["title"] for r in orig]
    root = Path(fmnist_small["root"])
    assert all((tmp_path / "back" / a["filepath"]).read_bytes() == (root / b["filepath"]).read_bytes()
               for a, b in zip(rows[::37], orig[::37]))


def test_every_table_reader_checks_rows_and_columns_alike(fmnist_small, tmp_path):
    """Shard conversion, training tables, retrieval and poisoning share one row check and one column check: a
    caption spanning two lines does not shift the reported line numbers, and a wrong column names the flag."""
    from parclip.attacks.poison import poison_csv
    from parclip.attacks.triggers import get_trigger
    from parclip.data import CaptionDataset
    from parclip.data.retrieval import read_retrieval

    _, orig = read_table(fmnist_small["train_csv"])
    root = Path(fmnist_small["root"])
    table = tmp_path / "t.csv"
    table.write_text("filepath\ttitle\n"
                     f'{root / orig[0]["filepath"]}\t"a shirt\non two lines"\n'  # lines 2-3
                     "missing.png\ta bag\n"  # line 4
                     f"{root / orig[1]['filepath']}\t\n"  # line 5: empty caption
                     + "".join(f"{root / r['filepath']}\t{r['title']}\n" for r in orig[2:40]))
    r = table_to_shards(table, tmp_path / "out", max_bad_fraction=0.1)
    ds = CaptionDataset(table, max_bad_fraction=0.1)
    for bad in (r["bad_rows"], ds.bad_rows):
        assert [(line, reason.split(":")[0]) for line, _, reason in bad.examples] == [
            (4, "missing image file"), (5, "empty caption")]
    assert r["n_samples"] == len(ds) == 39
    wrong = tmp_path / "w.csv"
    wrong.write_text("path\ttext\nx.png\ta bag\n")
    for read in (lambda: table_to_shards(wrong, tmp_path / "o2"), lambda: CaptionDataset(wrong),
                 lambda: read_retrieval(wrong),
                 lambda: poison_csv(wrong, tmp_path / "p", trigger=get_trigger("badnet_rs", image_size=28),
                                    target="bag", n_poison=1)):
        with pytest.raises(DataError, match="'filepath' \\(img_key\\) not found.*--csv-img-key"):
            read()


def test_source_patterns_say_what_is_missing(shards, tmp_path):
    out, _ = shards
    assert len(expand_urls(f"{out}/{{00000..00002}}.tar::{out}/{{00004..00005}}.tar")) == 5  # open_clip's '::'
    assert len(expand_urls(str(out))) == 6  # a folder of shards
    with pytest.raises(DataError, match="matches no file"):
        expand_urls(str(tmp_path / "{00000..00009}.tar"))
    with pytest.raises(DataError, match="2 of the 8 shards"):
        expand_urls(str(out / "{00000..00007}.tar"))


def _stream(spec, **kw):
    """A stream whose "image" is a fingerprint of the decoded pixels, so samples can be told apart."""
    import zlib

    return ShardStream(str(spec), transform=lambda img: torch.tensor([zlib.crc32(img.tobytes())]),
                       tokenize=lambda c: torch.tensor([len(c)]), batch_size=10, num_samples=600, **kw)


def test_the_stream_is_a_fixed_order_that_resumes_anywhere_and_splits_shards_between_ranks(shards):
    out, _ = shards
    s = _stream(out, seed=3, shuffle_buffer=50)
    s.set_epoch(0, 0, 60)
    full = list(s)
    assert len(full) == 60 and all(b[2].eq(-1).all() for b in full)
    s.set_epoch(0, 17, 60)  # resumed at batch 17: exactly the rest
    rest = list(s)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[17:], rest, strict=True))
    s.set_epoch(1, 0, 60)
    assert not torch.equal(torch.cat([b[0] for b in list(s)]), torch.cat([b[0] for b in full]))  # reshuffled
    # one epoch of 60 batches covers the 600 samples once (6 shards, no repeats)
    everything = _stream(out)
    everything.set_epoch(0, 0, 1)
    distinct = {everything.transform(decode_image(x)).item() for u in everything.urls for x in read_shard(u)}
    assert sorted(x.item() for b in full for x in b[0]) == sorted(
        everything.transform(decode_image(x)).item() for u in everything.urls for x in read_shard(u))
    assert len(distinct) > 590
    r0, r1 = _stream(out, seed=3, world_size=2, rank=0), _stream(out, seed=3, world_size=2, rank=1)
    for r in (r0, r1):
        r.set_epoch(0, 0, 30)
    a = {x.item() for b in r0 for x in b[0]}
    b = {x.item() for b in r1 for x in b[0]}
    assert len(a) > 290 and len(b) > 290 and len(a & b) < 5  # three shards each, disjoint


def _broken_copy(src: Path, dst: Path) -> Path:
    """The shards again (with their sizes.json), with one sample's caption removed from shard 1, shard 4 cut inside a
    member's data and shard 3 cut exactly at a member boundary (which reads as a shorter, valid tar)."""
    dst.mkdir()
    (dst / "sizes.json").write_bytes((src / "sizes.json").read_bytes())
    for p in sorted(src.glob("*.tar")):
        if p.name == "00001.tar":
            with tarfile.open(p) as tin, tarfile.open(dst / p.name, "w") as tout:
                for m in tin:
                    if m.name != "000000105.txt":
                        tout.addfile(m, tin.extractfile(m))
        elif p.name == "00004.tar":
            with tarfile.open(p) as tin:
                inside = [m.offset_data for m in tin][150] + 100  # 100 bytes into the 151st member's data
            (dst / p.name).write_bytes(p.read_bytes()[:inside])
        elif p.name == "00003.tar":
            with tarfile.open(p) as tin:
                boundary = [m.offset for m in tin][120]  # the header of the 121st member (sample 40)
            (dst / p.name).write_bytes(p.read_bytes()[:boundary])
        else:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_bad_samples_and_a_truncated_shard_are_counted_named_and_replaced(shards, tmp_path, caplog):
    out, _ = shards
    broken = _broken_copy(out, tmp_path / "broken")
    s = _stream(broken, seed=0)
    s.set_epoch(0, 0, 60)
    batches = list(s)
    failed = torch.cat([b[2] for b in batches])
    bad = failed[failed >= 0].tolist()
    names = {s.describe(i) for i in bad}
    assert any(n.endswith("00001.tar #5") for n in names)  # the sample without a caption
    assert any("00004.tar" in n for n in names)  # the rest of the cut shard: one bad slot per pass over it
    assert any(n.endswith("00003.tar #40") for n in names)  # short of its recorded size
    assert "no caption" in caplog.text and "unreadable after" in caplog.text and "size record says 100" in caplog.text
    assert all(b[0].shape[0] == 10 for b in batches)  # bad slots are filled from their batch


@pytest.mark.slow
def test_training_over_shards_resumes_mid_epoch_like_an_uninterrupted_run_with_two_workers(
        shards, tmp_path, micro_model_dir, monkeypatch):
    """Each of the two workers reads its own shards, so a run's batches depend on --workers; resumed with the same
    --workers, a killed run ends with the very weights of an uninterrupted one."""
    out, _ = shards
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=f"{out}/{{00000..00005}}.tar", objective="par",
                  epochs=2, batch_size=50, train_num_samples=200, output_dir=str(tmp_path), progress=False,
                  lr=1e-3, lr_decay_ratio=1.0, save_every=3, tau=1.0, shuffle_buffer=64, log_every=1, workers=2)
    straight = train(make_config(name="straight", **common))
    real_save = train_mod._save_checkpoint

    def save_then_die(run_dir, model, optimizer, scaler, step, *args):
        real_save(run_dir, model, optimizer, scaler, step, *args)
        if step == 3:  # mid-epoch: 4 steps per epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(name="resumed", **common))
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    resumed = train(make_config(name="resumed", **common))
    w = lambda run: load_file(run / "model" / "open_clip_model.safetensors")  # noqa: E731
    a, b = w(straight), w(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(make_config(name="resumed", **{**common, "workers": 1}))  # (a finished run: resumed at its end)
    assert "resumed with --workers 1" in (resumed / "out.log").read_text()  # another order: said, not silent
    start = load_file(micro_model_dir / "open_clip_model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4


@pytest.mark.parametrize("kind,dataset_type", [("table", "auto"), ("shards", "auto"), ("shards", "webdataset")])
def test_a_training_run_opens_its_data_once_and_asks_once_whether_it_is_shards(kind, dataset_type, shards,
                                                                               fmnist_small, tmp_path,
                                                                               micro_model_dir, monkeypatch):
    """One entry point decides table or shards for the whole trip (reader, loader, poisoning checks, messages): the
    question is asked once, or not at all when --dataset-type answers it, wherever in parclip it would be asked."""
    out, _ = shards
    source = str(fmnist_small["train_csv"]) if kind == "table" else str(out)
    real_ask, asked = shards_mod.is_shard_spec, []

    def ask(spec):
        asked.append(str(spec))
        return real_ask(spec)

    for module in [m for name, m in sys.modules.items() if name.startswith("parclip")]:
        if getattr(module, "is_shard_spec", None) is real_ask:
            monkeypatch.setattr(module, "is_shard_spec", ask)
    real_open, opened = train_mod.open_training_data, []
    monkeypatch.setattr(train_mod, "open_training_data", lambda *a, **kw: opened.append(real_open(*a, **kw))
                        or opened[-1])
    run = train(make_config(model=f"local-dir:{micro_model_dir}", train_data=source, dataset_type=dataset_type,
                            objective="clip", epochs=1, batch_size=50, workers=0,
                            **({"train_num_samples": 100} if kind == "shards" else {"train_rows": 100}),
                            output_dir=str(tmp_path), progress=False, log_every=1))
    assert asked == ([source] if dataset_type == "auto" else [])
    assert [d.is_shards for d in opened] == [kind == "shards"]
    assert isinstance(opened[0].dataset, ShardStream if kind == "shards" else CaptionDataset)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("kind", ["table", "shards"])
def test_training_data_of_either_kind_resumes_at_any_batch_and_names_its_samples(kind, shards, fmnist_small):
    out, _ = shards
    source = str(fmnist_small["train_csv"]) if kind == "table" else f"{out}/{{00000..00002}}.tar"
    data = open_training_data(source, transform=lambda img: torch.tensor(img.getpixel((14, 14)), dtype=torch.float),
                              tokenizer=lambda captions: torch.tensor([[len(c)] for c in captions]), batch_size=20,
                              seed=3, shuffle_buffer=32,
                              **({"num_samples": 200} if kind == "shards" else {"rows": 200}))
    assert data.is_shards == (kind == "shards") and len(data) == 200
    epoch = [b for b in data.loader(1, 0, 10)]
    assert len(epoch) == 10 and all(b[0].shape[0] == 20 and (b[2] == -1).all() for b in epoch)
    resumed = list(data.loader(1, 4, 10))
    assert len(resumed) == 6 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                     for a, b in zip(epoch[4:], resumed))
    other_epoch = next(iter(data.loader(2, 0, 10)))
    assert not torch.equal(other_epoch[1], epoch[0][1])  # every epoch its own order
    assert (".tar #" in data.describe(7)) if kind == "shards" else ("line" in data.describe(7))


def test_shards_without_a_size_need_train_num_samples(shards, tmp_path, micro_model_dir):
    out, _ = shards
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in out.glob("*.tar"):
        (bare / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="--train-num-samples"):
        train(make_config(model=f"local-dir:{micro_model_dir}", train_data=str(bare), objective="clip",
                          output_dir=str(tmp_path), progress=False, batch_size=8))


def test_poisoning_shards_equals_poisoning_the_same_table(shards, tmp_path):
    """The shards' poisoned samples are byte for byte what poison_csv writes for the same rows, seed and trigger."""
    from parclip.attacks.poison import poison_csv, poison_shards
    from parclip.attacks.triggers import build_triggers

    out, _ = shards
    (trigger,) = build_triggers(["badnet_rs"], 28, {"patch_size": 8})
    kw = dict(trigger=trigger, target="bag", n_poison=30, seed=1, templates="fashion")
    m = poison_shards(str(out), tmp_path / "p", maxcount=200, **kw)
    assert m["shards"] == [f"shards/{i:05d}.tar" for i in range(3)] and m["n_poison"] == 30 and m["n_rows"] == 600
    assert not (tmp_path / "p" / ".source").exists() and not (tmp_path / "p" / ".table").exists()
    table = shards_to_table(str(out), tmp_path / "t")["table"]
    ref = poison_csv(table, tmp_path / "ref", **kw)
    assert [r["index"] for r in m["rows"]] == [r["index"] for r in ref["rows"]]
    samples = [s for u in expand_urls(str(tmp_path / "p" / "shards")) for s in read_shard(u)]
    assert len(samples) == 600
    _, ref_rows = read_table(tmp_path / "ref" / "poisoned.csv")
    for r in ref["rows"][:5]:
        s = samples[r["index"]]
        assert s["txt"].decode() == r["new_caption"] and "bag" in r["new_caption"]
        assert s["png"] == (tmp_path / "ref" / ref_rows[r["index"]]["filepath"]).read_bytes()


def test_eval_reads_clip_benchmark_shards_like_the_folder(fmnist_small, micro_model_dir, tmp_path, capsys):
    from parclip.cli import main
    from parclip.data.shards import LabelledShards

    assert main(["data", "convert", str(fmnist_small["test_dir"]), str(tmp_path / "wds"), "--maxcount", "128"]) == 0
    assert (tmp_path / "wds" / "classnames.txt").is_file() and len(list((tmp_path / "wds" / "test").glob("*.tar"))) == 3
    shards_set = LabelledShards(str(tmp_path / "wds" / "test"))
    assert len(shards_set) == 300
    results = {}
    for name, data in (("folder", fmnist_small["test_dir"]), ("shards", tmp_path / "wds")):
        assert main(["eval", "--model", f"local-dir:{micro_model_dir}", "--data", str(data), "--attack", "badnet_rs",
                     "--target", "bag", "--templates", "fashion", "--workers", "0",
                     "--out", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for k in ("clean_top1", "clean_top5", "asr", "n_images", "per_class_recall"):
        assert results["folder"][k] == results["shards"][k], k


@pytest.mark.slow
def test_cli_convert_table_to_shards_and_train_on_them(fmnist_small, micro_model_dir, tmp_path, capsys):
    from parclip.cli import main

    assert main(["data", "convert", str(fmnist_small["holdout_csv"]), str(tmp_path / "s"), "--maxcount", "64"]) == 0
    assert "200 samples → 4 shards" in capsys.readouterr().out
    assert main(["train", "--model", f"local-dir:{micro_model_dir}", "--objective", "cleanclip",
                 "--train-data", str(tmp_path / "s" / "{00000..00003}.tar"), "--batch-size", "20", "--epochs", "1",
                 "--workers", "0", "--logs", str(tmp_path / "runs"), "--name", "wds", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/wds/metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 10  # 200 samples (from sizes.json) / 20
    assert main(["data", "convert", str(tmp_path / "nothing" / "{0..3}.tar"), str(tmp_path / "x")]) == 2
    assert "matches no file" in capsys.readouterr().err
