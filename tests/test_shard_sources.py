"""Shards from anywhere: ``pipe:`` and ``http://`` sources (through webdataset's gopen), failures of remote shards,
the split of shards between ranks and DataLoader workers (each sample read once per epoch), resampled mode and exact
resume with several workers."""
import functools
import http.server
import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from parclip import train as train_mod
from parclip.config import make_config
from parclip.data import DataError
from parclip.data import shards as shards_mod
from parclip.data.shards import LabelledShards, ShardStream, expand_urls, read_shard
from parclip.data.sources import TrainingData, open_training_data
from parclip.train import train


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; a file named in `drop` is announced whole and cut off after half its bytes."""
    drop: tuple[str, ...] = ()

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        if name in self.drop:
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def serve():
    """serve(folder, drop=()) → the base URL of a stdlib HTTP server on 127.0.0.1 (port 0) over `folder`."""
    servers = []

    def start(folder, drop=()):
        handler = type("H", (_Handler,), {"drop": tuple(drop)})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _keyed(spec, **kw):
    """A stream whose "text" is the sample's identity (shard number × 1000 + index in the shard), so every sample
    can be counted; its "image" is the image's mean."""
    urls = expand_urls(spec)

    def identity(_caption, key):
        url, index = key.rsplit("#", 1)
        return f"{urls.index(url) * 1000 + int(index)}", []

    kw.setdefault("batch_size", 10)
    return ShardStream(str(spec), transform=lambda img: torch.tensor([float(sum(img.tobytes()))]),
                       tokenize=lambda s: torch.tensor([int(s)]), captions=identity, **kw)


def _ids(batches) -> list[int]:
    return [int(x) for b in batches for x in b[1][0].flatten()]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1][0], y[1][0]) for x, y in zip(a, b))


def _loader(stream, epoch, first, n):
    data = TrainingData(stream, is_shards=True, batch_size=stream.batch_size, world_size=stream.world_size,
                        rank=stream.rank, seed=stream.seed, workers=stream.workers, pin_memory=False)
    return list(data.loader(epoch, first, n))


def test_pipe_and_http_sources_read_exactly_what_the_files_hold(shards, serve):
    out, _ = shards
    base = serve(out)
    local = _keyed(f"{out}/{{00000..00005}}.tar", num_samples=600, seed=5, shuffle_buffer=40)
    piped = _keyed(f"pipe:cat {out}/{{00000..00005}}.tar", num_samples=600, seed=5, shuffle_buffer=40)
    fetched = _keyed(f"{base}/{{00000..00002}}.tar::{base}/{{00003..00005}}.tar", seed=5, shuffle_buffer=40,
                     num_samples=600)
    assert len(piped.urls) == 6 and piped.urls[0] == f"pipe:cat {out}/00000.tar"
    assert fetched.sizes == {u: 100 for u in fetched.urls}  # sizes.json fetched from beside the shards
    assert piped.sizes == {}  # a command has no folder
    for s in (local, piped, fetched):
        s.set_epoch(0, 0, 60)
    want = list(local)
    assert sorted(_ids(want)) == [s * 1000 + i for s in range(6) for i in range(100)]
    assert _same(list(piped), want) and _same(list(fetched), want)
    # the epoch size of URL shards comes from their sizes.json, as for local ones
    data = open_training_data(f"{base}/{{00000..00005}}.tar", transform=lambda img: torch.zeros(1),
                              tokenizer=lambda c: torch.zeros(len(c), 1), batch_size=10)
    assert len(data) == 600 and data.is_shards


def test_evaluation_shards_read_through_pipe_and_http_like_local_ones(fmnist_small, serve, tmp_path):
    from parclip.data.shards import folder_to_shards

    folder_to_shards(fmnist_small["test_dir"], tmp_path / "wds", maxcount=128)
    test = tmp_path / "wds" / "test"
    local = LabelledShards(str(test))
    piped = LabelledShards(f"pipe:cat {test}/{{00000..00002}}.tar", classnames=local.classnames)
    fetched = LabelledShards(serve(tmp_path / "wds") + "/test/{00000..00002}.tar")  # classnames.txt one folder up
    assert len(local) == 300 and local.classnames == fetched.classnames
    for other in (piped, fetched):
        assert other.targets == local.targets
        assert all(other.load_image(i).tobytes() == local.load_image(i).tobytes() for i in (0, 150, 299))
    assert fetched.describe(5).startswith("http://127.0.0.1:") and fetched.describe(5).endswith("00000.tar #5")
    with pytest.raises(DataError, match="classnames.txt"):
        LabelledShards(f"pipe:cat {test}/00000.tar")  # a command has no folder to find it in


def test_a_remote_shard_that_fails_is_counted_and_named_like_a_truncated_one(shards, serve, tmp_path, caplog):
    out, _ = shards
    base = serve(out, drop=["00002.tar"])  # 00002 is cut off mid-file; 00009 does not exist (404)
    spec = f"{base}/{{00000..00002}}.tar::{base}/00009.tar::pipe:cat {out}/00004.tar::pipe:cat {tmp_path}/gone.tar"
    s = _keyed(spec, num_samples=400, seed=0)
    s.set_epoch(0, 0, 40)
    batches = list(s)  # ends: a failing command or download never hangs the stream
    assert len(batches) == 40 and all(b[0].shape[0] == 10 for b in batches)
    failed = torch.cat([b[2] for b in batches])
    named = {s.describe(i).rsplit(" #", 1)[0] for i in failed[failed >= 0].tolist()}
    assert named == {f"{base}/00002.tar", f"{base}/00009.tar", f"pipe:cat {tmp_path}/gone.tar"}
    assert "status 18" in caplog.text and "mid-file" in caplog.text  # curl: the server closed mid-file
    assert "status 22" in caplog.text and "HTTP error" in caplog.text  # curl: 404
    assert f"`cat {tmp_path}/gone.tar` exited with status 1" in caplog.text
    # the same rows in evaluation shards: counted, named, above --max-bad-fraction refused
    with pytest.raises(DataError, match="00009.tar"):
        LabelledShards(f"{base}/00000.tar::{base}/00009.tar", classnames=["a"] * 10, label_key="txt")
    errors = [x["__error__"] for x in read_shard(f"{base}/00002.tar") if "__error__" in x]
    assert len(errors) == 1 and errors[0].startswith(f"{base}/00002.tar: unreadable after")


def _opens(monkeypatch, tmp_path) -> Path:
    """Record every shard opening as "pid url" lines (DataLoader workers are forked: they inherit the patch)."""
    log = tmp_path / "opens.log"
    real = shards_mod.open_shard

    def logged(url):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {url}\n")
        return real(url)

    monkeypatch.setattr(shards_mod, "open_shard", logged)
    return log


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_sample_is_read_once_per_epoch_and_every_shard_by_one_worker(shards, monkeypatch, tmp_path, world_size):
    out, _ = shards
    log = _opens(monkeypatch, tmp_path)
    per_rank = 60 // world_size
    streams = [_keyed(out, num_samples=600, world_size=world_size, rank=r, seed=1, shuffle_buffer=30, workers=2)
               for r in range(world_size)]
    epoch = [_loader(s, 2, 0, per_rank) for s in streams]
    assert [len(e) for e in epoch] == [per_rank] * world_size  # the same batch count on every rank
    assert sorted(i for e in epoch for i in _ids(e)) == [s * 1000 + i for s in range(6) for i in range(100)]
    readers: dict[str, set[str]] = {}
    lines = log.read_text().split("\n")[:-1]
    for line in lines:
        pid, url = line.split(" ", 1)
        readers.setdefault(pid, set()).add(url)
    assert sorted(url for line in lines for url in [line.split(" ", 1)[1]]) == sorted(streams[0].urls)  # once each
    assert len(readers) == 2 * world_size and os.getpid() not in map(int, readers)  # each worker its own shards
    # the DataLoader's interleaving of its workers is the stream's own order (the calling process reads it too)
    for s, e in zip(streams, epoch):
        s.set_epoch(2, 0, per_rank)
        assert _same(list(s), e)


def test_a_resumed_epoch_with_two_workers_sees_exactly_the_rest(shards):
    out, _ = shards
    for kw in (dict(world_size=2, rank=1), dict(resampled=True)):  # 3 shards on 2 workers (2 + 1); resampled
        s = _keyed(out, num_samples=600, seed=4, shuffle_buffer=30, workers=2, **kw)
        n = 600 // 10 // s.world_size
        full = _loader(s, 1, 0, n)
        assert len(full) == n
        for first in (1, 7, n - 1):  # the second worker's batch, and one where only one worker has batches left
            assert _same(_loader(s, 1, first, n), full[first:]), (kw, first)
    uneven = _keyed(out, num_samples=600, world_size=2, rank=1, seed=4, workers=2)
    uneven.set_epoch(1, 0, 30)
    assert Counter(uneven.schedule()) == {0: 20, 1: 10} and uneven.schedule()[-10:] == [0] * 10


def test_resampled_draws_shards_with_replacement_seeded_and_cut_into_epochs(shards, fmnist_small):
    out, _ = shards
    one = f"{out}/00003.tar"
    with pytest.raises(DataError, match="--dataset-resampled"):  # 1 shard for 2 processes, not resampled
        _keyed(one, num_samples=100, world_size=2, rank=0)
    runs = {}
    for name, seed in (("a", 7), ("again", 7), ("other", 8)):
        s = _keyed(out, num_samples=250, seed=seed, workers=2, resampled=True)
        runs[name] = [_loader(s, e, 0, 25) for e in (0, 1)]
    a, again, other = runs["a"], runs["again"], runs["other"]
    assert [len(e) for e in a] == [25, 25]  # the epoch: --train-num-samples / batch size
    assert all(_same(x, y) for x, y in zip(a, again))  # same seed: the same draws
    assert not _same(a[0], other[0]) and not _same(a[0], a[1])  # another seed, another epoch: other draws
    ids = Counter(_ids(a[0]) + _ids(a[1]))
    assert max(ids.values()) > 1  # with replacement: some sample twice in two epochs of 250 from 600
    # any number of shards for any number of processes and workers
    tiny = _keyed(one, num_samples=40, seed=0, workers=2, resampled=True, world_size=4, rank=3)
    drawn = _ids(_loader(tiny, 0, 0, 4))
    assert len(drawn) == 40 and all(0 <= i < 100 for i in drawn)  # all from the one shard
    with pytest.raises(DataError, match="for webdataset shards"):
        open_training_data(str(fmnist_small["train_csv"]), transform=lambda i: i, tokenizer=lambda c: c,
                           batch_size=10, resampled=True)
    with pytest.raises(ValueError, match="--dataset-resampled is for webdataset"):
        make_config(dataset_resampled=True, dataset_type="csv")


def test_training_reads_pipe_sources_resampled(shards, tmp_path, micro_model_dir, monkeypatch):
    out, _ = shards
    real_open, opened = train_mod.open_training_data, []
    monkeypatch.setattr(train_mod, "open_training_data", lambda *a, **kw: opened.append(real_open(*a, **kw))
                        or opened[-1])
    run = train(make_config(model=f"local-dir:{micro_model_dir}", train_data=f"pipe:cat {out}/{{00000..00005}}.tar",
                            dataset_resampled=True, objective="clip", epochs=1, batch_size=25, train_num_samples=50,
                            workers=0, output_dir=str(tmp_path), progress=False, log_every=1))
    assert opened[0].is_shards and opened[0].dataset.resampled and len(opened[0]) == 50
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_fewer_shards_than_workers_leaves_workers_idle_and_says_so(shards, monkeypatch, tmp_path, caplog):
    out, _ = shards
    log = _opens(monkeypatch, tmp_path)
    s = _keyed(f"{out}/{{00000..00002}}.tar", num_samples=300, world_size=2, rank=0, seed=2, workers=2)
    assert s.lanes == 1 and "only 1 worker(s) per process read" in caplog.text and "--dataset-resampled" in caplog.text
    batches = _loader(s, 0, 0, 15)  # two DataLoader workers, one of them idle
    readers = {int(line.split(" ")[0]) for line in log.read_text().splitlines()}
    assert len(readers) == 1 and os.getpid() not in readers
    s.set_epoch(0, 0, 15)
    assert len(batches) == 15 and _same(batches, list(s))
