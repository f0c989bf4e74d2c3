"""Hostile inputs against parclip's real entry points: does each one end in a clear error, a counted skip or a correct
reading, never in a bare traceback, executed code or a silently changed result?

    .venv/bin/python benchmarks/hostile_inputs.py [--out docs/hostile_inputs.md] [--only GROUP ...] [--no-write]

Groups (one function each): caption tables, images, labelled image folders whose links loop, checkpoints (model
weights, training resume, trigger pattern files, ``local-dir:`` folders, malicious pickles, NaN/Inf weights through
every command that loads a model), YAML configs and trigger parameters, prompt templates, webdataset shards. Every case
runs in a fresh temporary directory (also the working directory), with stdout/stderr, warnings and log records
captured, and its outcome is classified:

* ``clear error``: parclip raised DataError/CheckpointError/ValueError/FileNotFoundError/RuntimeError with a message
  (the CLI: exit status 2 and ``error:`` on stderr, no traceback). An error that parclip let through from a library
  unchanged is marked ``[from <library>]`` in front of its message.
* ``counted skip``: the bad part was left out and counted / named (``bad_rows``, ``n_bad_images``, a warning), the
  rest worked.
* ``accepted``: read correctly, checked against a clean reference (rows, captions, pixels, tensors).
* ``FAIL (traceback)``: any other exception escaped (KeyError, UnicodeDecodeError, UnpicklingError, yaml errors, ...),
  or the case did not finish within CASE_TIMEOUT_S.
* ``FAIL (code executed)``: a payload (pickle, YAML tag) created its marker file.
* ``FAIL (silently changed)``: accepted, but the result differs from the clean reference (or an invalid value was
  taken as if valid).

The Markdown table is printed and written to docs/hostile_inputs.md; the exit status is 1 when any row FAILs (so CI
can run it), 2 when the harness itself broke on a case, else 0. Paths in messages are shown relative to the case's
temporary directory (``TMP``) or the shared fixtures (``FIX``).
"""
from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import csv
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import parclip.cli
from parclip.attacks.triggers import build_triggers, parse_trigger_params
from parclip.config import make_config
from parclip.data import CaptionDataset, LabelledFolder, fashion_mnist, get_templates, open_rgb, write_table
from parclip.attacks.poison import poison_csv
from parclip.data.shards import ShardStream, folder_to_shards, shards_to_table, table_to_shards
from parclip.evaluation import evaluate
from parclip.models import create_model, eval_transform, get_tokenizer, save_model
from parclip.train import train

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "hostile_inputs.md"
SRC = ROOT / "src" / "parclip"
MODEL = "parclip-micro"  # parclip's tiny built-in architecture (28 px)
SIZE = 28
CASE_TIMEOUT_S = 30  # a safety net only: every case takes about a second

CLEAR, SKIP, ACCEPTED = "clear error", "counted skip", "accepted"
FAIL_TB, FAIL_CODE, FAIL_CHANGED = "FAIL (traceback)", "FAIL (code executed)", "FAIL (silently changed)"
OUTCOMES = (CLEAR, SKIP, ACCEPTED, FAIL_TB, FAIL_CODE, FAIL_CHANGED)
# exception types that count as a clear error (with a message); these subclasses of them do not
CLEAR_TYPES = (ValueError, FileNotFoundError, RuntimeError)
NOT_CLEAR = (UnicodeError, RecursionError, NotImplementedError)

LEGEND = f"""| outcome | meaning |
|---|---|
| `{CLEAR}` | parclip stopped with its own error or a ValueError / FileNotFoundError / RuntimeError and a message; the \
CLI returned 2 and printed `error:` without a traceback. `[from torch]` etc.: the message is the library's, \
passed through unchanged |
| `{SKIP}` | the bad part was left out and counted / named (`bad_rows`, `n_bad_images`, a warning); the rest worked |
| `{ACCEPTED}` | read correctly: the result was compared with a clean reference (rows, captions, pixels, tensors) |
| `{FAIL_TB}` | another exception type escaped (a traceback for the user) |
| `{FAIL_CODE}` | a payload (pickle, YAML tag) created its marker file: code from the input ran |
| `{FAIL_CHANGED}` | accepted without a word, but the result is not the clean reference's (or an invalid value was \
used as if valid) |"""


# ====================================================================================================================
# the harness: one attempt per case, classified
# ====================================================================================================================
@dataclass
class Row:
    group: str
    input: str
    entry: str
    outcome: str
    said: str
    detail: str = ""  # the traceback of a FAIL (traceback), for the report


@dataclass
class Fixtures:
    """Built once and shared read-only: a Fashion-MNIST export, the micro model and its weights, a training
    checkpoint, an exported model folder, clean shards."""
    root: Path
    train_csv: Path = None
    test_dir: Path = None  # the export's labelled test folder (10 classes)
    sd: dict = None  # reference state dict of a parclip-micro
    model: Any = None
    preprocess: dict = None
    tokenizer: Any = None
    context_length: int = 0
    export_dir: Path = None  # save_model output: open_clip_config.json + safetensors
    checkpoint: Path = None  # a training checkpoint at step 1 of 2 of train_settings()
    resumed_sd: dict = None  # the weights a run resumed from `checkpoint` ends with
    table16: Path = None  # 16 rows of the export as a caption table
    shards: Path = None  # table16 as 2 shards of 8


def train_settings(tmp: Path, **over) -> dict:
    """Tiny training settings: parclip-micro from scratch, plain CLIP loss, 2 steps of 8 images."""
    return {"model": MODEL, "objective": "clip", "epochs": 1, "batch_size": 8, "train_rows": 16, "workers": 0,
            "progress": False, "output_dir": str(tmp / "runs"), **over}


class _Alarm(Exception):
    pass


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


LOG = _Records()


@contextlib.contextmanager
def isolated(tmp: Path, timeout: int = CASE_TIMEOUT_S):
    """cwd = tmp, stdout/stderr/warnings captured, log records collected, an alarm as a safety net."""
    old_cwd = os.getcwd()
    LOG.records.clear()
    out, err = io.StringIO(), io.StringIO()

    def ring(*_):
        raise _Alarm(f"no answer within {timeout} s")

    old_handler = signal.signal(signal.SIGALRM, ring)
    signal.alarm(timeout)
    try:
        os.chdir(tmp)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield {"out": out, "err": err, "warnings": caught}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        os.chdir(old_cwd)


def _library(frames: traceback.StackSummary) -> str | None:
    """The library an exception was raised in (None: parclip itself or this script)."""
    if not frames:
        return None
    fname = frames[-1].filename
    if fname.startswith(str(SRC)) or fname == __file__:
        return None
    m = re.search(r"site-packages/([A-Za-z_0-9]+)", fname)
    return m.group(1) if m else Path(fname).stem


def classify(e: BaseException) -> tuple[str, str, str]:
    """(outcome, message, traceback text) of an exception that escaped the entry point."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    first = lines[0].strip() if lines else repr(e)
    said = f"{type(e).__name__}: {first}"
    frames = traceback.extract_tb(e.__traceback__)
    if isinstance(e, _Alarm):
        return FAIL_TB, f"TimeoutError: {first}", ""
    if isinstance(e, CLEAR_TYPES) and not isinstance(e, NOT_CLEAR) and first:
        lib = _library(frames)
        return CLEAR, (f"[from {lib}] " if lib else "") + said, ""
    return FAIL_TB, said, "".join(traceback.format_exception(type(e), e, e.__traceback__))


def cli(*argv) -> tuple[int, str, str]:
    """parclip.cli.main(argv) -> (exit status, stdout, stderr); an argparse exit is an exit status too. Exceptions
    escape (they are tracebacks for a CLI user)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = parclip.cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def cli_error(result) -> tuple[str, str] | None:
    """The classification of a CLI call that did not succeed (None when it returned 0)."""
    code, _, err = result
    if code == 0:
        return None
    lines = err.strip().splitlines()
    said = next((ln.strip() for ln in lines if "error:" in ln), lines[-1] if lines else "")
    if code == 2 and "error:" in err and "Traceback" not in err:
        return CLEAR, said
    return FAIL_TB, f"exit status {code}: {said}"


class Sweep:
    """The rows gathered so far, and the cases that broke the harness itself (reported apart, never as rows)."""

    def __init__(self, fx: Fixtures):
        self.fx = fx
        self.rows: list[Row] = []
        self.harness_errors: list[str] = []

    def attempt(self, group: str, what: str, entry: str, case: Callable[[Path], tuple[Callable, Callable]]) -> None:
        """Run one case: ``case(tmp)`` prepares the input and returns ``(call, check)``; ``call()`` is parclip's
        entry point (its exceptions are classified), ``check(result)`` classifies a result it returned."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="hostile-") as d:
            tmp = Path(d)
            marker = tmp / "MARKER"
            detail = ""
            try:
                with isolated(tmp) as cap:
                    try:
                        call, check = case(tmp)
                    except Exception:  # noqa: BLE001 - a broken case is reported, the sweep goes on
                        self.harness_errors.append(f"{group} / {what} / {entry}: setup failed\n"
                                                   f"{traceback.format_exc()}")
                        return
                    try:
                        result = call()
                    except KeyboardInterrupt:
                        raise
                    except BaseException as e:  # noqa: BLE001 - SystemExit too: nothing may stop the sweep
                        outcome, said, detail = classify(e)
                    else:
                        outcome, said = check(result)
                        if outcome == ACCEPTED and cap["warnings"]:
                            said += f" (warned: {cap['warnings'][0].message})"
            except Exception:  # noqa: BLE001 - as above
                self.harness_errors.append(f"{group} / {what} / {entry}: check failed\n{traceback.format_exc()}")
                return
            if marker.exists():
                outcome, said = FAIL_CODE, f"the payload ran (marker file created); parclip then said: {said}"
            self.rows.append(Row(group, what, entry, outcome, self._clean(said, tmp), detail))
        print(f"  {time.perf_counter() - t0:5.1f}s  {outcome:24s} {group} | {what} | {entry}", file=sys.stderr)

    def _clean(self, text: str, tmp: Path) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))  # terminal colours in torch's messages
        for path, name in ((tmp, "TMP"), (self.fx.root, "FIX"), (ROOT, ".")):
            for p in {str(path), os.path.realpath(path)}:
                text = text.replace(p, name)
        return " ".join(str(text).split())


# ====================================================================================================================
# fixtures
# ====================================================================================================================
def build_fixtures(root: Path) -> Fixtures:
    fx = Fixtures(root)
    with contextlib.redirect_stderr(io.StringIO()):
        paths = fashion_mnist.export(root / "fmnist", n_train=200, holdout=50, n_test=50, seed=0)
        fx.train_csv = paths["train_csv"]
        fx.test_dir = paths["test_dir"]
        fx.model, fx.preprocess = create_model(MODEL)
        fx.sd = {k: v.detach().clone() for k, v in fx.model.state_dict().items()}
        fx.tokenizer = get_tokenizer(MODEL)
        fx.context_length = int(fx.tokenizer(["x"]).shape[-1])
        fx.export_dir = save_model(fx.model, root / "export", model_name=MODEL, preprocess_cfg=fx.preprocess)
        run = train(make_config(**train_settings(root, train_data=str(fx.train_csv), resume="none", name="ref")))
        state = torch.load(run / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
        state.update(step=1, finished=False)  # a run interrupted after step 1: resuming it trains step 2
        fx.checkpoint = root / "step1.pt"
        torch.save(state, fx.checkpoint)
        resumed = train(make_config(**train_settings(root, train_data=str(fx.train_csv), resume=str(fx.checkpoint),
                                                     name="resumed")))
        fx.resumed_sd = load_file(str(resumed / "model" / "open_clip_model.safetensors"))
        _, rows = _read_rows(fx.train_csv)
        fx.table16 = root / "fmnist" / "table16.csv"
        write_table(fx.table16, ["filepath", "title"],
                    [{"filepath": r["filepath"], "title": r["title"]} for r in rows[:16]])
        fx.shards = root / "shards"
        table_to_shards(fx.table16, fx.shards, maxcount=8)
    return fx


def _read_rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")  # the default table layout (open_clip_train's)
        return list(reader.fieldnames), list(reader)


# ====================================================================================================================
# caption tables
# ====================================================================================================================
CAPTIONS = ["a photo of a shirt.", "a photo of a bag.", "a photo of a coat.", "a photo of a sandal."]


def _four_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(4):
        p = folder / f"img{i}.png"
        Image.new("RGB", (8, 8), (40 * i, 200 - 40 * i, 90)).save(p)
        paths.append(p)
    return paths


def _csv_line(*cells: str) -> str:
    """One row of a table in the default layout (tab-separated, open_clip_train's)."""
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", lineterminator="\n").writerow(cells)
    return buf.getvalue()


def table_cases() -> dict[str, Callable[[Path], tuple[Path, list[tuple[str, str]], int]]]:
    """name -> writer(tmp) -> (table path, expected (absolute image path, caption) rows, expected skipped rows)."""

    def standard(tmp, *, header="filepath\ttitle\n", sep="\n", encoding="utf-8", prefix=b"", captions=CAPTIONS,
                 names=None):
        imgs = _four_images(tmp)
        names = names or [p.name for p in imgs]
        body = header + "".join(_csv_line(n, c) for n, c in zip(names, captions))
        data = prefix + body.replace("\n", sep).encode(encoding)
        table = tmp / "table.csv"
        table.write_bytes(data)
        return table, [(str(p), c) for p, c in zip(imgs, captions)], 0

    def quoted(tmp):
        return standard(tmp, captions=["a shirt, with buttons", "a bag,\tleather", 'a "coat", long', "sandal,\nsummer"])

    def latin1(tmp):
        return standard(tmp, encoding="latin-1", captions=["un café noir"] + CAPTIONS[1:])

    def empty_lines(tmp):
        imgs = _four_images(tmp)
        body = "filepath\ttitle\n\n" + "".join(_csv_line(p.name, c) + "\n" for p, c in zip(imgs, CAPTIONS)) + "\n\n"
        (tmp / "table.csv").write_text(body)
        return tmp / "table.csv", [(str(p), c) for p, c in zip(imgs, CAPTIONS)], 0

    def long_caption(tmp):
        words = " ".join(random.Random(0).choice(["red", "shirt", "bag", "long", "photo"]) for _ in range(10_000))
        return standard(tmp, captions=[words] + CAPTIONS[1:])

    def duplicate_header(tmp):
        imgs = _four_images(tmp)
        body = "filepath\ttitle\ttitle\n" + "".join(_csv_line(p.name, c, "SECOND " + c) for p, c in zip(imgs, CAPTIONS))
        (tmp / "table.csv").write_text(body)
        # the first column of a name is the reading pandas and spreadsheets give; anything else must be said
        return tmp / "table.csv", [(str(p), c) for p, c in zip(imgs, CAPTIONS)], 0

    def absolute(tmp):
        imgs = _four_images(tmp / "elsewhere")
        (tmp / "tables").mkdir()
        body = "filepath\ttitle\n" + "".join(_csv_line(str(p), c) for p, c in zip(imgs, CAPTIONS))
        (tmp / "tables" / "table.csv").write_text(body)
        return tmp / "tables" / "table.csv", [(str(p), c) for p, c in zip(imgs, CAPTIONS)], 0

    def dotdot(tmp):
        imgs = _four_images(tmp)
        (tmp / "tables").mkdir()
        body = "filepath\ttitle\n" + "".join(_csv_line("../" + p.name, c) for p, c in zip(imgs, CAPTIONS))
        (tmp / "tables" / "table.csv").write_text(body)
        return tmp / "tables" / "table.csv", [(str(p), c) for p, c in zip(imgs, CAPTIONS)], 0

    def missing(tmp):
        imgs = _four_images(tmp)
        body = "filepath\ttitle\n" + "".join(_csv_line(p.name, c) for p, c in zip(imgs, CAPTIONS))
        body += _csv_line("no_such_image.png", "a photo of a ghost.")
        (tmp / "table.csv").write_text(body)
        return tmp / "table.csv", [(str(p), c) for p, c in zip(imgs, CAPTIONS)], 1

    return {
        "clean table (control)": standard,
        "UTF-8 BOM at the start": lambda tmp: standard(tmp, prefix=b"\xef\xbb\xbf"),
        "CRLF line ends": lambda tmp: standard(tmp, sep="\r\n"),
        "quoted separators / quotes / newline in captions": quoted,
        "non-UTF-8 bytes (latin-1 é)": latin1,
        "empty lines": empty_lines,
        "10 000-word caption": long_caption,
        "duplicate header names (caption twice)": duplicate_header,
        "absolute image paths": absolute,
        "'..' paths escaping the table's folder": dotdot,
        "missing image file (1 of 5 rows)": missing,
    }


def group_tables(sw: Sweep) -> None:
    group = "caption table"
    fx = sw.fx
    notes = {"'..' paths escaping the table's folder": "; NB: files outside the table's folder are read"}
    for name, write in table_cases().items():

        def dataset(tmp, write=write, name=name):
            table, expected, n_skip = write(tmp)

            def call():
                ds = CaptionDataset(table, tokenizer=fx.tokenizer, max_bad_fraction=0.5)
                items = [ds[i] for i in range(len(ds))]
                return ds, items

            def check(result):
                ds, items = result
                got = list(zip(ds.paths, ds.captions))
                tokens_ok = all(tuple(t.shape) == (fx.context_length,) and not b >= 0 for _, t, b in items)
                if got != expected or not tokens_ok:
                    return FAIL_CHANGED, _difference(got, expected) if got != expected else "tokens of the wrong shape"
                if ds.bad_rows.total != n_skip:
                    return FAIL_CHANGED, f"bad_rows={ds.bad_rows.total}, expected {n_skip}: {ds.bad_rows}"
                if n_skip:
                    return SKIP, str(ds.bad_rows)
                return ACCEPTED, f"{len(got)} rows, paths and captions as the reference" + notes.get(name, "")

            return call, check

        def data_check(tmp, write=write, name=name):
            table, expected, n_skip = write(tmp)

            def check(result):
                err = cli_error(result)
                if err:
                    return err
                out = result[1]
                m = re.search(r": (\d+) usable rows", out)
                n = int(m.group(1)) if m else -1
                if n != len(expected):
                    return FAIL_CHANGED, f"reported {n} usable rows, expected {len(expected)}: {out.strip()}"
                if n_skip:
                    ok = f"{n_skip} of {len(expected) + n_skip} rows" in out
                    return (SKIP if ok else FAIL_CHANGED), out.strip().splitlines()[-1]
                return ACCEPTED, f"{out.strip().splitlines()[0]} (counts only)" + notes.get(name, "")

            return lambda: cli("data", "check", table, "--max-bad-fraction", "0.5"), check

        sw.attempt(group, name, "CaptionDataset", dataset)
        sw.attempt(group, name, "parclip data check", data_check)


def _difference(got: list[tuple[str, str]], expected: list[tuple[str, str]]) -> str:
    """The first way the rows read differ from the clean reference's."""
    if len(got) != len(expected):
        return f"read {len(got)} rows, the reference has {len(expected)}"
    i, ((gp, gc), (ep, ec)) = next((i, (g, e)) for i, (g, e) in enumerate(zip(got, expected)) if g != e)
    if gp != ep:
        return f"row {i + 1}: image {gp!r} instead of {ep!r}"
    return f"row {i + 1}: caption {_short(gc)} instead of {_short(ec)}, without a warning"


def _short(x, n: int = 30) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n] + "…"


# ====================================================================================================================
# images
# ====================================================================================================================
def _quadrants(w: int = 16, h: int = 16) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (200, 30, 60)
    a[: h // 2, w // 2:] = (20, 180, 40)
    a[h // 2:, : w // 2] = (30, 40, 210)
    a[h // 2:, w // 2:] = (230, 220, 20)
    return Image.fromarray(a)


def _close(img: Image.Image, ref: np.ndarray, tol: float) -> bool:
    a = np.asarray(img, dtype=np.float32)
    return a.shape == ref.shape and float(np.abs(a - ref).mean()) <= tol


def _png_bomb(path: Path, side: int = 30_000) -> None:
    """A small valid PNG whose IHDR then claims side x side pixels (CRC recomputed): Pillow's bomb check fires."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", side, side)
    # the chunk's CRC follows its 13 data bytes and covers the type and the data
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 4 + 13])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


@dataclass
class ImageCase:
    filename: str
    write: Callable[[Path], None]
    expect: Callable[[Image.Image], tuple[bool, str]] | None  # None: the file must not be accepted


def image_cases() -> dict[str, ImageCase]:
    q = np.asarray(_quadrants(), dtype=np.float32)

    def cmyk(p):
        _quadrants().convert("CMYK").save(p, "JPEG", quality=95)

    def sixteen(p):
        a = np.full((16, 16), 1000, np.uint16)
        a[:, 8:] = 40000
        Image.fromarray(a).save(p)  # mode I;16

    def sixteen_expect(img):
        want = np.zeros((16, 16, 3), np.float32)
        want[:, :8], want[:, 8:] = 1000 / 257, 40000 / 257  # the 8-bit value of each 16-bit one
        got = np.asarray(img, dtype=np.float32)
        ok = got.shape == want.shape and float(np.abs(got - want).max()) <= 1.5
        return ok, (f"16-bit 1000 / 40000 became {got[0, 0].astype(int).tolist()} / "
                    f"{got[0, -1].astype(int).tolist()} (8-bit equivalents {round(1000 / 257)} / {round(40000 / 257)})")

    def palette(p):
        im = Image.new("P", (16, 16), 0)
        im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        im.paste(1, (8, 0, 16, 16))
        im.save(p, transparency=0)  # left half: transparent red, right half: opaque blue

    def palette_expect(img):
        a = np.asarray(img)
        ok = a.shape == (16, 16, 3) and (a[:, 8:] == (0, 0, 255)).all()
        return ok, (f"opaque pixels right; transparent ones became {a[0, 0].tolist()} (their palette colour, alpha "
                    f"dropped)")

    def rgba(p):
        a = np.zeros((16, 16, 4), np.uint8)
        a[:, :8] = (10, 200, 10, 0)
        a[:, 8:] = (200, 10, 10, 255)
        Image.fromarray(a, "RGBA").save(p)

    def rgba_expect(img):
        a = np.asarray(img)
        ok = a.shape == (16, 16, 3) and (a[:, 8:] == (200, 10, 10)).all()
        return ok, (f"opaque pixels right; fully transparent ones became {a[0, 0].tolist()} (hidden colour, alpha "
                    f"dropped)")

    grey_src = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))

    def grey(p):
        Image.fromarray(grey_src, "L").save(p)

    def grey_expect(img):
        a = np.asarray(img)
        return a.shape == (16, 16, 3) and all((a[..., c] == grey_src).all() for c in range(3)), "R = G = B = L"

    def exif(p):
        ex = Image.Exif()
        ex[0x0112] = 6  # orientation: rotate 90° clockwise to display
        _quadrants(32, 16).save(p, "JPEG", quality=95, exif=ex.tobytes())

    def exif_expect(img):
        stored = np.asarray(_quadrants(32, 16), dtype=np.float32)
        shown = np.asarray(_quadrants(32, 16).transpose(Image.Transpose.ROTATE_270), dtype=np.float32)
        if _close(img, stored, 6):
            return True, "EXIF orientation 6 NOT applied: the stored 32x16 pixels are returned"
        if _close(img, shown, 6):
            return True, "EXIF orientation 6 applied: returned rotated to 16x32"
        return False, f"neither the stored nor the rotated pixels (size {img.size})"

    def one(p):
        Image.new("RGB", (1, 1), (12, 34, 56)).save(p)

    def cmyk_expect(img):
        return _close(img, q, 8), "RGB within JPEG error of the source"

    return {
        "CMYK JPEG": ImageCase("cmyk.jpg", cmyk, cmyk_expect),
        "16-bit greyscale PNG (I;16)": ImageCase("deep.png", sixteen, sixteen_expect),
        "palette PNG with transparency": ImageCase("palette.png", palette, palette_expect),
        "RGBA PNG": ImageCase("rgba.png", rgba, rgba_expect),
        "greyscale PNG (L)": ImageCase("grey.png", grey, grey_expect),
        "EXIF-rotated JPEG (orientation 6)": ImageCase("exif.jpg", exif, exif_expect),
        "1x1 image": ImageCase("one.png", one, lambda img: (np.asarray(img).tolist() == [[[12, 34, 56]]], "1x1 RGB")),
        "decompression bomb (IHDR says 30000x30000)": ImageCase("bomb.png", _png_bomb, None),
        "text file named .jpg": ImageCase("text.jpg", lambda p: p.write_text("this is not an image\n"), None),
        "zero-byte .png": ImageCase("empty.png", lambda p: p.write_bytes(b""), None),
    }


def group_images(sw: Sweep) -> None:
    group = "image"
    fx = sw.fx

    def judge(case: ImageCase, img: Image.Image) -> tuple[str, str]:
        if case.expect is None:
            return FAIL_CHANGED, f"an invalid file was decoded as a {img.size} image"
        ok, note = case.expect(img)
        return (ACCEPTED if ok else FAIL_CHANGED), note

    for name, case in image_cases().items():
        def direct(tmp, case=case):
            path = tmp / case.filename
            case.write(path)
            return (lambda: open_rgb(path)), (lambda img: judge(case, img))

        def one_row(tmp, case=case):
            path = tmp / case.filename
            case.write(path)
            (tmp / "table.csv").write_text("filepath\ttitle\n" + _csv_line(case.filename, "a photo of a thing."))
            return (lambda: CaptionDataset(tmp / "table.csv")[0]), (lambda item: judge(case, item[0]))

        def evaluation(tmp, case=case):
            root = tmp / "eval"
            for k, cls in enumerate(("bag", "shirt")):
                (root / cls).mkdir(parents=True)
                for j in range(2):
                    Image.new("RGB", (SIZE, SIZE), (60 * k + 30 * j, 100, 150)).save(root / cls / f"good{j}.png")
            case.write(root / "bag" / case.filename)

            def call():
                folder = LabelledFolder(root, transform=eval_transform(fx.preprocess), max_bad_fraction=0.5)
                result = evaluate(fx.model, fx.preprocess, fx.tokenizer, folder, templates=["a photo of a {}."],
                                  workers=0, progress=False, max_bad_fraction=0.5, batch_size=8)
                idx = [i for i, (p, _) in enumerate(folder.samples) if Path(p).name == case.filename]
                img = None
                if idx:
                    with contextlib.suppress(Exception):
                        img = folder.load_image(idx[0])
                return folder, result, img

            def check(res):
                folder, result, img = res
                n_bad = folder.bad_rows.total + result["n_bad_images"]
                if n_bad == 1 and result["n_images"] == 4:
                    said = next(iter(LOG.warnings()), str(folder.bad_rows))
                    return SKIP, (f"n_bad_images={result['n_bad_images']}, "
                                  f"folder.bad_rows={folder.bad_rows.total}: {said}")
                if n_bad == 0 and result["n_images"] == 5 and img is not None:
                    return judge(case, img)
                return FAIL_CHANGED, (f"n_images={result['n_images']}, n_bad_images={result['n_bad_images']}, "
                                      f"folder.bad_rows={folder.bad_rows.total}")

            return call, check

        sw.attempt(group, name, "open_rgb", direct)
        sw.attempt(group, name, "CaptionDataset (1 row) [0]", one_row)
        sw.attempt(group, name, "evaluate(LabelledFolder)", evaluation)


# ====================================================================================================================
# labelled image folders whose links loop
# ====================================================================================================================
def folder_cases() -> dict[str, tuple[list[tuple[str, str]], int]]:
    """name -> (links to add to the layout of `_labelled_layout`: (link path, target), the images a correct walk
    lists). ELSEWHERE in a target is a folder of 2 images outside the data set."""
    return {
        "plain folder (control)": ([], 4),
        "class folder links back to the root (bag/loop -> ..)": ([("bag/loop", "..")], 4),
        "link to a folder above the data set (bag/sub/up -> ../../..)": ([("bag/sub/up", "../../..")], 4),
        "folder links to itself (shirt/self -> .), two loops at once": ([("shirt/self", "."), ("bag/loop", "..")], 4),
        "links to a file and a folder outside (control)": ([("shirt/linked.png", "ELSEWHERE/img0.png"),
                                                            ("shirt/more", "ELSEWHERE")], 7),
    }


def _labelled_layout(tmp: Path, links: list[tuple[str, str]]) -> Path:
    """tmp/data: bag/ (2 images), bag/sub/ (1), shirt/ (1), plus `links`; tmp/elsewhere: 2 more images."""
    root = tmp / "data"
    for folder, n in (("bag", 2), ("bag/sub", 1), ("shirt", 1), ("../elsewhere", 2)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            colour = (30 * i, 90, 200 if "shirt" in folder else 20)
            Image.new("RGB", (SIZE, SIZE), colour).save(root / folder / f"img{i}.png")
    for link, target in links:
        os.symlink(target.replace("ELSEWHERE", str(tmp / "elsewhere")), root / link)
    return root


def group_folders(sw: Sweep) -> None:
    group = "image folder"
    fx = sw.fx
    for name, (links, n_images) in folder_cases().items():
        def counted(n, what):
            ok = n == n_images
            return (ACCEPTED, f"{n} images, each once ({what})") if ok else \
                (FAIL_CHANGED, f"{n} images listed, the folder holds {n_images} ({what})")

        def labelled(tmp, links=links):
            root = _labelled_layout(tmp, links)
            return (lambda: LabelledFolder(root)), (lambda ds: counted(len(ds.samples), f"labels {ds.targets}"))

        def shards(tmp, links=links):
            root = _labelled_layout(tmp, links)
            return (lambda: folder_to_shards(root, tmp / "wds")), (lambda r: counted(r["n_samples"], "n_samples"))

        def eval_cli(tmp, links=links):
            root = _labelled_layout(tmp, links)

            def check(result):
                err = cli_error(result)
                if err:
                    return err
                m = re.search(r"\((\d+) images\)", result[1])
                return counted(int(m.group(1)) if m else -1, "the count parclip eval printed")

            return (lambda: cli("eval", "--model", f"local-dir:{fx.export_dir}", "--data", root, "--templates",
                                "fashion", "--workers", "0")), check

        sw.attempt(group, name, "LabelledFolder", labelled)
        sw.attempt(group, name, "folder_to_shards", shards)
        sw.attempt(group, name, "parclip eval --data", eval_cli)


# ====================================================================================================================
# checkpoints and pattern files
# ====================================================================================================================
class Payload:
    """An object whose unpickling calls ``func(*args)``: what a malicious checkpoint hides."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _unicode(s: str) -> bytes:  # pickle BINUNICODE (an opcode torch's weights-only unpickler reads)
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def disguised_pickle(marker: Path) -> bytes:
    """A hand-written pickle that pushes 'posix' 'system', then 'collections' 'OrderedDict' (popped again) and calls
    STACK_GLOBAL: a scanner that reads the last strings sees collections.OrderedDict, the unpickler imports
    posix.system and calls it."""
    return (b"\x80\x04" + b"}" + _unicode("state_dict") + _unicode("posix") + _unicode("system")
            + _unicode("collections") + _unicode("OrderedDict") + b"00" + b"\x93"
            + _unicode(f"touch {marker}") + b"\x85R" + b"s.")


def payloads(marker: Path) -> dict[str, Callable[[], Any]]:
    """name -> the object to pickle (each would create `marker` when unpickled); None marks the hand-written one."""
    return {
        "os.system": lambda: {"state_dict": {"x": Payload(os.system, f"touch {marker}")}},
        "builtins.eval": lambda: {"state_dict": {"x": Payload(eval, f"open({str(marker)!r}, 'w').close()")}},
        "subprocess.call": lambda: {"state_dict": {"x": Payload(subprocess.call, ["touch", str(marker)])}},
        "nested in dict/list": lambda: {"state_dict": {"x": [1, {"deep": Payload(os.system, f"touch {marker}")}]}},
        "OrderedDict-looking posix.system": None,
    }


class _DryRun(pickle.Unpickler):
    """Records the globals a pickle imports, returning harmless stand-ins (nothing of the pickle runs)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.seen: list[str] = []

    def find_class(self, module, name):
        # as pickle's own find_class does for protocol < 3: Python 2 names (__builtin__, commands) mapped
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        self.seen.append(f"{module}.{name}")
        return lambda *a, **k: None

    def persistent_load(self, pid):
        return None


def _live_globals(data: bytes) -> list[str]:
    u = _DryRun(data)
    with contextlib.suppress(Exception):
        u.load()
    return u.seen


DANGEROUS = {"posix.system", "nt.system", "builtins.eval", "subprocess.call"}


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_with_pickle(pkl: bytes) -> bytes:
    """A torch.save zip whose data.pkl is replaced by `pkl`."""
    src, out = io.BytesIO(_torch_bytes({"x": torch.zeros(1)})), io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else zin.read(info))
    return out.getvalue()


def _safetensors_bytes(tensors: dict) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{d}/x.safetensors")
        return Path(f"{d}/x.safetensors").read_bytes()


@dataclass
class Hostile:
    """One hostile file: its kind ('torch' or 'safetensors', which decides the file name) and its bytes, made from
    the entry point's valid object, its tensors and the case's marker path."""
    kind: str
    make: Callable[[Any, dict, Path], bytes]
    expect_valid: bool = False  # a correct reading gives the entry point's valid object back


def hostile_files() -> dict[str, Hostile]:
    def truncated(obj, flat, marker):
        b = _torch_bytes(obj)
        return b[: len(b) // 2]

    def corrupt(obj, flat, marker):
        b = bytearray(_torch_bytes(obj))
        mid = len(b) // 2
        for i in range(mid, mid + 64):
            b[i] ^= 0xFF
        return bytes(b)

    def extra_entry(obj, flat, marker, name="archive/notes.txt", text="not a tensor\n"):
        out = io.BytesIO(_torch_bytes(obj))
        with zipfile.ZipFile(out, "a") as z:
            z.writestr(name, text)
        return out.getvalue()

    def code_entry(obj, flat, marker):
        return extra_entry(obj, flat, marker, "archive/code/run.py", f"open({str(marker)!r}, 'w').close()\n")

    def escaping_entry(obj, flat, marker):
        out = io.BytesIO(_torch_bytes(obj))
        with zipfile.ZipFile(out, "a") as z:
            z.writestr("../../escaped.sh", f"touch {marker}\n")
        return out.getvalue()

    def unrelated_zip(obj, flat, marker):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("readme.txt", "not a checkpoint")
            z.writestr("data.csv", "a,b\n1,2\n")
        return out.getvalue()

    def wrong_dtype(obj, flat, marker):
        return _safetensors_bytes({k: (v * 1000).to(torch.int64) for k, v in flat.items()})

    def wrong_shape(obj, flat, marker):
        key = next(k for k, v in flat.items() if v.ndim and v.shape[-1] > 1)
        return _safetensors_bytes({**flat, key: flat[key][..., :-1]})

    def header_past_end(obj, flat, marker):
        b = bytearray(_safetensors_bytes(flat))
        b[:8] = struct.pack("<Q", len(b) + 1000)
        return bytes(b)

    def header_not_json(obj, flat, marker):
        b = bytearray(_safetensors_bytes(flat))
        (n,) = struct.unpack("<Q", b[:8])
        b[8: 8 + n] = (b"{not json" + b" " * n)[:n]
        return bytes(b)

    def nonfinite(value: float, kind: str):
        """The valid object with its first floating-point tensor's last value set to `value` (NaN, Inf)."""
        def make(obj, flat, marker):
            t = next(v for v in flat.values() if v.is_floating_point() and v.numel())
            old = t.clone()
            t[(-1,) * t.ndim] = value
            try:
                return _torch_bytes(obj) if kind == "torch" else _safetensors_bytes(flat)
            finally:
                t.copy_(old)
        return make

    files = {
        "valid file (control)": Hostile("torch", lambda obj, flat, m: _torch_bytes(obj), expect_valid=True),
        "NaN in one value (torch.save)": Hostile("torch", nonfinite(float("nan"), "torch")),
        "Inf in one value (safetensors)": Hostile("safetensors", nonfinite(float("inf"), "safetensors")),
        "random bytes": Hostile("torch", lambda obj, flat, m: random.Random(0).randbytes(4096)),
        "truncated zip (torch.save cut in half)": Hostile("torch", truncated),
        "corrupt zip (64 bytes flipped mid-file)": Hostile("torch", corrupt, expect_valid=True),
        "torch zip + a foreign entry (archive/notes.txt)": Hostile("torch", extra_entry, expect_valid=True),
        "torch zip + a foreign entry (archive/code/run.py)": Hostile("torch", code_entry, expect_valid=True),
        "torch zip + an entry named '../../escaped.sh'": Hostile("torch", escaping_entry, expect_valid=True),
        "bare tensors (torch.save of the weights only)": Hostile("torch", lambda obj, flat, m: _torch_bytes(flat),
                                                                expect_valid=True),
        "zip of unrelated files": Hostile("torch", unrelated_zip),
        "safetensors, wrong dtype (int64)": Hostile("safetensors", wrong_dtype, expect_valid=True),
        "safetensors, wrong shape": Hostile("safetensors", wrong_shape, expect_valid=True),
        "safetensors, header length past the end": Hostile("safetensors", header_past_end),
        "safetensors, header not JSON": Hostile("safetensors", header_not_json),
    }
    for name in payloads(Path("MARKER")):
        def raw(obj, flat, marker, name=name):
            made = payloads(marker)[name]
            return disguised_pickle(marker) if made is None else pickle.dumps(made(), protocol=2)

        def zipped(obj, flat, marker, name=name):
            made = payloads(marker)[name]
            return _zip_with_pickle(disguised_pickle(marker)) if made is None else _torch_bytes(made())

        files[f"pickle: {name} (raw pickle)"] = Hostile("torch", raw)
        files[f"pickle: {name} (torch.save zip)"] = Hostile("torch", zipped)
    return files


@dataclass
class CkptEntry:
    """An entry point that reads a file: its valid object, the tensors of that object, where the file goes and how
    parclip is called (returning the tensors it read, to compare with the valid ones)."""
    name: str
    valid: Callable[[Fixtures], Any]
    flat: Callable[[Any], dict]
    place: Callable[[Path, str], tuple[Path, Path]]  # (tmp, kind) -> (file to write, argument to pass)
    load: Callable[[Fixtures, Path, Path], dict]  # (fx, argument, tmp) -> tensors read
    control: Callable[[Any, dict], bytes] | None = None  # the valid file, when not torch.save(valid)
    expected: Callable[[dict], dict] | None = None  # flat -> what a correct reading returns (default: flat)
    read_ok: str = "read exactly the reference tensors"  # what an accepted row says


def _simple_place(suffix_torch: str = ".pt"):
    def place(tmp, kind):
        p = tmp / ("weights.safetensors" if kind == "safetensors" else "weights" + suffix_torch)
        return p, p
    return place


def _local_dir_place(fx_getter):
    def place(tmp, kind):
        folder = tmp / "model"
        folder.mkdir(exist_ok=True)
        shutil.copy(fx_getter().export_dir / "open_clip_config.json", folder)
        name = "open_clip_model.safetensors" if kind == "safetensors" else "open_clip_pytorch_model.bin"
        return folder / name, folder
    return place


def ckpt_entries(fx: Fixtures) -> list[CkptEntry]:
    gen = torch.Generator().manual_seed(0)
    patch = torch.rand(3, 2, 2, generator=gen)  # the BadCLIP patch side at 28 px is 2
    mask = torch.zeros(SIZE, SIZE)
    mask[10:18, 4:24] = torch.rand(8, 20, generator=gen) * 0.9 + 0.1
    grid = torch.rand(1, SIZE, SIZE, 2, generator=gen) * 2 - 1

    def model_sd(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def resume(fx_, arg, tmp):
        cfg = make_config(**train_settings(tmp, train_data=str(fx_.train_csv), resume=str(arg), name="resumed"))
        run = train(cfg)
        return load_file(str(run / "model" / "open_clip_model.safetensors"))

    ckpt = torch.load(fx.checkpoint, map_location="cpu", weights_only=True)
    return [
        CkptEntry("create_model(pretrained=)", lambda f: f.sd, lambda obj: obj, _simple_place(),
                  lambda f, arg, tmp: model_sd(create_model(MODEL, pretrained=str(arg))[0])),
        CkptEntry("create_model('local-dir:')", lambda f: f.sd, lambda obj: obj, _local_dir_place(lambda: fx),
                  lambda f, arg, tmp: model_sd(create_model(f"local-dir:{arg}")[0]),
                  control=lambda obj, flat: _safetensors_bytes(flat)),
        CkptEntry("train(resume=)", lambda f: ckpt, lambda obj: obj["state_dict"], _simple_place(), resume,
                  expected=lambda flat: fx.resumed_sd,
                  read_ok="resumed at step 1 and ended with the reference resumed run's weights"),
        CkptEntry("badclip patch=", lambda f: patch, lambda obj: {"patch": obj}, _simple_place(),
                  lambda f, arg, tmp: {"patch": build_triggers(["badclip"], SIZE, {"patch": str(arg)})[0].pattern},
                  control=lambda obj, flat: _safetensors_bytes(flat)),
        CkptEntry("water_patt mask=", lambda f: mask, lambda obj: {"mask": obj}, _simple_place(),
                  lambda f, arg, tmp: {"mask": build_triggers(["water_patt"], SIZE, {"mask": str(arg)})[0].pattern[0]}),
        CkptEntry("warped grid_file=", lambda f: grid, lambda obj: {"grid": obj}, _simple_place(),
                  lambda f, arg, tmp: {"grid": build_triggers(["warped"], SIZE, {"grid_file": str(arg)})[0].field}),
    ]


def _same_tensors(got: dict, want: dict) -> tuple[bool, str]:
    if set(got) != set(want):
        return False, f"keys differ ({len(got)} vs {len(want)})"
    for k, w in want.items():
        g = got[k]
        if tuple(g.shape) != tuple(w.shape):
            return False, f"{k} has shape {list(g.shape)}, the reference {list(w.shape)}"
        differ = int((g.to(torch.float32) != w.to(torch.float32)).sum())
        if differ:
            return False, f"{differ} of {w.numel()} values of {k} differ from the reference"
    return True, ""


def group_checkpoints(sw: Sweep) -> None:
    group = "checkpoint"
    fx = sw.fx
    entries = ckpt_entries(fx)
    for name, hostile in hostile_files().items():
        for entry in entries:
            def case(tmp, entry=entry, hostile=hostile, name=name):
                valid = entry.valid(fx)
                flat = entry.flat(valid)
                marker = tmp / "MARKER"
                path, arg = entry.place(tmp, hostile.kind)
                if name.startswith("valid") and entry.control is not None:
                    path, arg = entry.place(tmp, "safetensors")
                    data = entry.control(valid, flat)
                else:
                    data = hostile.make(valid, flat, marker)
                if name.startswith("pickle:"):
                    live = set(_live_globals(data if not data.startswith(b"PK") else _zip_data_pkl(data)))
                    if not live & DANGEROUS:
                        raise AssertionError(f"payload {name} is not live: it imports {sorted(live)}")
                path.write_bytes(data)

                def check(got):
                    same, why = _same_tensors(got, entry.expected(flat) if entry.expected else flat)
                    if not hostile.expect_valid:
                        return FAIL_CHANGED, "an invalid file was loaded without an error"
                    if same:
                        return ACCEPTED, entry.read_ok
                    return FAIL_CHANGED, f"loaded without a word, but {why}"

                return (lambda: entry.load(fx, arg, tmp)), check

            sw.attempt(group, name, entry.name, case)
    group_nonfinite_commands(sw)


def group_nonfinite_commands(sw: Sweep) -> None:
    """Every command that loads a model, given weights with a NaN: a clear error naming the tensor, never a score
    computed from NaN logits (the finite weights are the control)."""
    fx = sw.fx
    commands = {
        "parclip eval --pretrained": lambda tmp, w: ["eval", "--model", MODEL, "--pretrained", w, "--data",
                                                     fx.test_dir, "--templates", "fashion", "--workers", "0"],
        "parclip eval --model local-dir:": lambda tmp, w: ["eval", "--model", f"local-dir:{_as_local_dir(tmp, w, fx)}",
                                                          "--data", fx.test_dir, "--templates", "fashion",
                                                          "--workers", "0"],
        "parclip eval-retrieval --pretrained": lambda tmp, w: ["eval-retrieval", "--model", MODEL, "--pretrained", w,
                                                               "--data", fx.table16, "--workers", "0"],
        "parclip train --pretrained": lambda tmp, w: ["train", "--model", MODEL, "--pretrained", w, "--objective",
                                                      "clip", "--train-data", fx.table16, "--epochs", "1",
                                                      "--batch-size", "8", "--workers", "0", "--no-progress",
                                                      "--output-dir", tmp / "runs"],
        "parclip attack optimize-patch --pretrained": lambda tmp, w: [
            "attack", "optimize-patch", "--model", MODEL, "--pretrained", w, "--data", fx.table16, "--target", "bag",
            "--out", tmp / "patch.png", "--steps", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu"],
    }
    key = next(iter(fx.sd))
    for name, spoil in {"finite weights (control)": None, "NaN in one weight": float("nan")}.items():
        for entry, argv in commands.items():
            def case(tmp, spoil=spoil, argv=argv):
                weights = {k: v.clone().contiguous() for k, v in fx.sd.items()}
                if spoil is not None:
                    weights[key].view(-1)[-1] = spoil
                save_file(weights, tmp / "weights.safetensors")

                def check(result):
                    err = cli_error(result)
                    if err:
                        named = err[0] != CLEAR or spoil is None or key in err[1]
                        return err if named else (FAIL_CHANGED, f"refused without naming {key}: {err[1]}")
                    said = (result[1].strip().splitlines() or [""])[0]
                    if spoil is None:
                        return ACCEPTED, f"ran with the finite weights: {said}"
                    return FAIL_CHANGED, f"ran on NaN weights and reported: {said}"

                return (lambda: cli(*argv(tmp, tmp / "weights.safetensors"))), check

            sw.attempt("checkpoint", name, entry, case)


def _as_local_dir(tmp: Path, weights: Path, fx: Fixtures) -> Path:
    """An exported model folder: the fixtures' open_clip_config.json beside `weights`."""
    folder = tmp / "model"
    folder.mkdir(exist_ok=True)
    shutil.copy(weights, folder / "open_clip_model.safetensors")
    shutil.copy(fx.export_dir / "open_clip_config.json", folder)
    return folder


def _zip_data_pkl(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))


# ====================================================================================================================
# YAML configs and trigger parameters
# ====================================================================================================================
def group_configs(sw: Sweep) -> None:
    group = "config"
    fx = sw.fx
    cases = {
        "valid config (control)": {},
        "unknown key (learning_rate)": {"learning_rate": 0.1},
        "wrong type: lr: \"fast\"": {"lr": "fast"},
        "wrong type: epochs: [1, 2]": {"epochs": [1, 2]},
        "wrong type: batch_size: \"8\"": {"batch_size": "8"},
        "Python tag !!python/object/apply:os.system": "PYTHON_TAG",
        "malformed YAML (unclosed bracket)": "lr: [0.1, 0.2\n",
        "not a mapping (a list)": "- lr: 0.1\n",
    }
    for name, hostile in cases.items():
        def case(tmp, hostile=hostile, name=name):
            base = train_settings(tmp, train_data=str(fx.train_csv), name="cfg")
            if isinstance(hostile, dict):
                text = yaml.safe_dump({**base, **hostile})
            elif hostile == "PYTHON_TAG":
                text = yaml.safe_dump(base) + f"lr: !!python/object/apply:os.system [\"touch {tmp / 'MARKER'}\"]\n"
            else:
                text = hostile if hostile.startswith("-") else yaml.safe_dump(base) + hostile
            (tmp / "cfg.yaml").write_text(text)

            def check(result):
                err = cli_error(result)
                if err:
                    return err
                runs = list((tmp / "runs").glob("*/config.yaml"))
                written = yaml.safe_load(runs[0].read_text()) if runs else {}
                if name.startswith("valid") and written.get("epochs") == 1 and written.get("batch_size") == 8:
                    return ACCEPTED, "trained 2 steps with the file's settings (config.yaml matches)"
                if isinstance(hostile, dict) and all(isinstance(v, str) and written.get(k) == int(v)
                                                     for k, v in hostile.items() if v.strip().isdigit()) \
                        and all(v.strip().isdigit() for v in hostile.values() if isinstance(v, str)):
                    # a number written as a string ("8": YAML quoting) is read as that number, on purpose
                    kept = {k: written.get(k) for k in hostile}
                    return ACCEPTED, f"read as the number it spells; config.yaml has {kept}"
                changed = {k: written.get(k) for k in (hostile if isinstance(hostile, dict) else {})}
                return FAIL_CHANGED, f"trained anyway; the run's config.yaml has {changed}"

            return (lambda: cli("train", "--config", tmp / "cfg.yaml")), check

        sw.attempt(group, name, "parclip train --config", case)

    params = {
        "valid patch_size=3 (control)": ("badnet", ["patch_size=3"], {"patch_size": 3}),
        "patch_size=-3": ("badnet", ["patch_size=-3"], None),
        "patch_size=1000 (> image)": ("badnet", ["patch_size=1000"], None),
        "patch_size=abc": ("badnet", ["patch_size=abc"], None),
        "alpha=7": ("blended", ["alpha=7"], None),
        "alpha=-0.5": ("blended", ["alpha=-0.5"], None),
        "alpha=.nan": ("blended", ["alpha=.nan"], None),
        "k=0 (warped)": ("warped", ["k=0"], None),
        "uint8_mode=bogus": ("blended", ["uint8_mode=bogus"], None),
        "unknown parameter foo=1": ("badnet", ["foo=1"], None),
        "malformed value alpha=[0.5": ("blended", ["alpha=[0.5"], None),
        "Python tag in a value": ("blended", None, None),
    }
    for name, (attack, pairs, expected) in params.items():
        def tag_pairs(tmp, pairs=pairs):
            return pairs or [f"alpha=!!python/object/apply:os.system [\"touch {tmp / 'MARKER'}\"]"]

        def direct(tmp, attack=attack, pairs=pairs, expected=expected):
            kv = tag_pairs(tmp, pairs)

            def call():
                return build_triggers([attack], SIZE, parse_trigger_params(kv))[0]

            def check(trigger):
                got = trigger.params()
                if expected and all(got.get(k) == v for k, v in expected.items()):
                    return ACCEPTED, f"{trigger.name} built with {expected}"
                return FAIL_CHANGED, f"an out-of-range / invalid value was accepted: {trigger!r}"[:200]

            return call, check

        def poison(tmp, attack=attack, pairs=pairs, expected=expected):
            kv = tag_pairs(tmp, pairs)
            argv = ["poison", fx.train_csv, tmp / "out", "--attack", attack, "--target", "bag", "--n", "2",
                    "--image-size", str(SIZE)] + [a for p in kv for a in ("--trigger-param", p)]

            def check(result):
                err = cli_error(result)
                if err:
                    return err
                got = json.loads((tmp / "out" / "manifest.json").read_text())["trigger"]["params"]
                if expected and all(got.get(k) == v for k, v in expected.items()):
                    return ACCEPTED, f"poisoned 2 rows with {attack} {expected}"
                return FAIL_CHANGED, f"poisoned with an invalid value: {got}"

            return (lambda: cli(*argv)), check

        sw.attempt("trigger param", f"{attack} {name}", "build_triggers", direct)
        sw.attempt("trigger param", f"{attack} {name}", "parclip poison --trigger-param", poison)


# ====================================================================================================================
# prompt templates
# ====================================================================================================================
# name -> a template; only the control is valid: '{}' and '{c}' are the class name, '{{' and '}}' literal braces
TEMPLATE_CASES = {
    "'{c}' and literal '{{braces}}' (control)": "a photo of a {c}, {{ {} }}.",
    "attribute access {0.__class__}": "a photo of {0.__class__}.",
    "escaped braces hide a field: {{}} {0.__class__}": "{{}} {0.__class__.__name__}",
    "globals through {c.__init__.__globals__}": "a {} {c.__init__.__globals__}",
    "positional field {0}": "a photo of a {0}.",
    "conversion {!r}": "a photo of a {!r}.",
    "format spec {:>40}": "a photo of a {:>40}.",
    "unknown field {x}": "a {} with {x}.",
    "lone brace": "a {} }",
}
TEMPLATE_CONTROL = "a photo of a bag, { bag }."  # the control filled with 'bag', written out by hand


def group_templates(sw: Sweep) -> None:
    group = "prompt template"
    fx = sw.fx
    trigger = build_triggers(["badnet"], SIZE, {})[0]
    for name, template in TEMPLATE_CASES.items():
        valid = name.endswith("(control)")

        def judged(what_ran: str, ok: Callable[[], bool] = lambda: True):
            if not valid:
                return FAIL_CHANGED, f"a template with a format field was used: {what_ran}"
            return (ACCEPTED, what_ran) if ok() else (FAIL_CHANGED, f"filled wrongly: {what_ran}")

        def template_file(tmp, template=template):
            (tmp / "templates.txt").write_text(f"a photo of a {{}}.\n{template}\n")
            return (lambda: get_templates(tmp / "templates.txt")), \
                (lambda got: judged(f"read {got}", lambda: got == ["a photo of a {}.", template]))

        def evaluation(tmp, template=template):
            folder = LabelledFolder(fx.test_dir, transform=eval_transform(fx.preprocess))
            return (lambda: evaluate(fx.model, fx.preprocess, fx.tokenizer, folder, templates=[template], workers=0,
                                     progress=False)), \
                (lambda r: judged(f"zero-shot top-1 {r['clean_top1']:.1f}% with it"))

        def eval_cli(tmp, template=template):
            (tmp / "templates.txt").write_text(template + "\n")

            def check(result):
                err = cli_error(result)
                return err or judged(result[1].strip().splitlines()[0])

            return (lambda: cli("eval", "--model", f"local-dir:{fx.export_dir}", "--data", fx.test_dir,
                                "--templates", tmp / "templates.txt", "--workers", "0")), check

        def poisoning(tmp, template=template):
            def check(manifest):
                captions = {r["new_caption"] for r in manifest["rows"]}
                return judged(f"poisoned captions {sorted(captions)}", lambda: captions == {TEMPLATE_CONTROL})

            return (lambda: poison_csv(fx.table16, tmp / "out", trigger=trigger, target="bag", n_poison=2,
                                       templates=[template])), check

        def poison_cli(tmp, template=template):
            (tmp / "templates.txt").write_text(template + "\n")

            def check(result):
                err = cli_error(result)
                if err:
                    return err
                return poisoning(tmp, template)[1](json.loads((tmp / "out" / "manifest.json").read_text()))

            return (lambda: cli("poison", fx.table16, tmp / "out", "--attack", "badnet", "--target", "bag", "--n",
                                "2", "--image-size", str(SIZE), "--templates", tmp / "templates.txt")), check

        sw.attempt(group, name, "get_templates(file)", template_file)
        sw.attempt(group, name, "evaluate(templates=[...])", evaluation)
        sw.attempt(group, name, "parclip eval --templates FILE", eval_cli)
        sw.attempt(group, name, "poison_csv(templates=[...])", poisoning)
        sw.attempt(group, name, "parclip poison --templates FILE", poison_cli)


# ====================================================================================================================
# webdataset shards
# ====================================================================================================================
def _rewrite_tar(path: Path, drop: Callable[[str], bool]) -> str:
    """Rewrite a tar without the members `drop` selects; returns the first dropped name."""
    dropped = []
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    with tarfile.open(path, "w") as dst:
        for m, data in members:
            if drop(m.name) and not dropped:
                dropped.append(m.name)
                continue
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    return dropped[0]


def group_shards(sw: Sweep) -> None:
    group = "shards"
    fx = sw.fx
    _, rows = _read_rows(fx.table16)
    captions = Counter(r["title"] for r in rows)

    def truncate(shard: Path) -> str:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2 + 100])
        return "cut in half"

    cases = {
        "clean shards (control)": None,
        "truncated tar (shard 0 cut in half)": truncate,
        "sample missing its image": lambda shard: _rewrite_tar(shard, lambda n: n.endswith(".png")),
        "sample missing its caption": lambda shard: _rewrite_tar(shard, lambda n: n.endswith(".txt")),
    }
    for name, spoil in cases.items():
        def prepare(tmp, spoil=spoil):
            shutil.copytree(fx.shards, tmp / "shards")
            if spoil:
                spoil(tmp / "shards" / "00000.tar")
            return str(tmp / "shards" / "{00000..00001}.tar")

        def stream(tmp, spoil=spoil):
            spec = prepare(tmp)

            def call():
                s = ShardStream(spec, transform=lambda img: torch.from_numpy(np.asarray(img).copy()),
                                tokenize=lambda c: c, batch_size=4, num_samples=16, shuffle_buffer=4)
                s.set_epoch(0, 0, 4)
                return list(s)

            def check(batches):
                failed = torch.cat([f for _, _, f in batches])
                texts = [t for _, ts, _ in batches for t in ts]
                shapes = {tuple(i.shape) for i, _, _ in batches}
                if shapes != {(4, SIZE, SIZE, 3)} or any(t not in captions for t in texts):
                    return FAIL_CHANGED, f"batches of shapes {shapes}, captions from elsewhere"
                n_bad = int((failed >= 0).sum())
                if spoil is None:
                    ok = n_bad == 0 and Counter(texts) == captions
                    return (ACCEPTED, "16 samples, each caption once") if ok else \
                        (FAIL_CHANGED, f"{n_bad} bad, captions {Counter(texts) - captions}")
                if n_bad:
                    return SKIP, f"{n_bad} of 16 slots counted as bad: {next(iter(LOG.warnings()), '')}"
                return FAIL_CHANGED, "the broken sample went unnoticed"

            return call, check

        def to_table(tmp, spoil=spoil):
            spec = prepare(tmp)

            def check(r):
                _, got_rows = _read_rows(r["table"])
                got = Counter(row["title"] for row in got_rows)
                if spoil is None:
                    ok = r["n_samples"] == 16 and not r["bad"] and got == captions
                    return (ACCEPTED, "16 rows, the shards' captions") if ok else (FAIL_CHANGED, f"{r['n_samples']}")
                if r["bad"] and r["n_samples"] < 16 and not (got - captions):
                    return SKIP, f"{r['n_samples']} of 16 samples kept, {len(r['bad'])} problem(s) named: {r['bad'][0]}"
                return FAIL_CHANGED, f"{r['n_samples']} rows, bad={r['bad']}"

            return (lambda: shards_to_table(spec, tmp / "table")), check

        def train_cli(tmp, spoil=spoil):
            spec = prepare(tmp)
            argv = ["train", "--model", MODEL, "--objective", "clip", "--train-data", spec, "--epochs", "1",
                    "--batch-size", "8", "--train-num-samples", "16", "--workers", "0", "--no-progress",
                    "--max-bad-fraction", "0.5", "--output-dir", tmp / "runs", "--name", "shards"]

            def check(result):
                err = cli_error(result)
                if err:
                    return err
                warned = [w for w in LOG.warnings() if "failed to decode" in w]
                if spoil is None:
                    return (ACCEPTED, "trained 2 steps, no bad sample") if not warned else (FAIL_CHANGED, warned[0])
                if warned:
                    return SKIP, warned[0]
                return FAIL_CHANGED, "trained without counting the broken sample"

            return (lambda: cli(*argv)), check

        sw.attempt(group, name, "ShardStream", stream)
        sw.attempt(group, name, "shards_to_table", to_table)
        sw.attempt(group, name, "parclip train --train-data", train_cli)


# ====================================================================================================================
# output
# ====================================================================================================================
def _cell(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def markdown(rows: list[Row], counts: Counter) -> str:
    lines = ["| group | input | entry point | outcome | what parclip said |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.group} | {_cell(r.input, 60)} | `{r.entry}` | {r.outcome} | {_cell(r.said)} |")
    lines += ["", "| outcome | rows |", "|---|---|"] + [f"| {o} | {counts.get(o, 0)} |" for o in OUTCOMES]
    return "\n".join(lines)


KEPT = "<!-- hand-written below:"  # the page from this line on is written by hand and kept when regenerating


def document(table: str, rows: list[Row], kept: str = "") -> str:
    """The page: the generated table (and the FAIL rows by cause), then `kept`, the hand-written part of the page."""
    head = __doc__.split("\n\n")[0].replace("\n", " ")
    fails = [r for r in rows if r.outcome.startswith("FAIL")]
    out = ["# Hostile inputs", "", head, "",
           "Regenerate (under a minute on 2 CPU cores, no GPU, no network):", "",
           "    .venv/bin/python benchmarks/hostile_inputs.py", "",
           f"Generated with {_versions()}.", "",
           ("Every case runs in a fresh temporary directory; `TMP` in a message is that directory, `FIX` the "
            "shared fixtures (a Fashion-MNIST export, a `parclip-micro` model, a training checkpoint, shards). "
            "Malicious pickles and YAML tags try to create a marker file; a FAIL row is parclip's to fix, not the "
            "script's."), "",
           LEGEND, "", table, ""]
    if fails:
        out += ["## FAIL rows by cause", ""]
        for cause, members in fail_causes(rows):
            out.append(f"* **{cause}** ({len(members)} row{'s' if len(members) > 1 else ''}): "
                       + "; ".join(f"{r.input} / `{r.entry}`" for r in members))
        out.append("")
    return "\n".join(out) + (f"\n{kept}" if kept else "")


def _versions() -> str:
    """The library versions the outcomes depend on (torch's loader, Pillow's decoders, ...)."""
    import PIL
    import safetensors
    import webdataset

    from parclip import __version__
    return (f"parclip {__version__}, torch {torch.__version__}, Pillow {PIL.__version__}, safetensors "
            f"{safetensors.__version__}, PyYAML {yaml.__version__}, webdataset {webdataset.__version__}, "
            f"Python {sys.version.split()[0]}")


def _origin(detail: str) -> str:
    """Where a traceback passed through parclip last: 'src/parclip/x.py:123 in f' (+ the library that raised)."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', detail)
    mine = [(f, n, fn) for f, n, fn in frames if f.startswith(str(SRC))]
    if not mine:
        return "outside parclip"
    f, n, fn = mine[-1]
    where = f"{os.path.relpath(f, ROOT)}:{n} in {fn}"
    if frames[-1] != mine[-1]:
        lib = re.search(r"site-packages/([A-Za-z_0-9]+)", frames[-1][0])
        where += f", raised in {lib.group(1) if lib else Path(frames[-1][0]).name}"
    return where


def fail_causes(rows: list[Row]) -> list[tuple[str, list[Row]]]:
    """FAIL rows grouped by cause: a traceback by its exception type and the parclip line it escaped from, the
    others by their input."""
    causes: dict[str, list[Row]] = {}
    for r in rows:
        if not r.outcome.startswith("FAIL"):
            continue
        key = f"{r.outcome}: {r.said.split(':')[0]} at {_origin(r.detail)}" if r.detail else \
            f"{r.outcome}: {r.group} / {r.input}"
        causes.setdefault(key, []).append(r)
    return list(causes.items())


GROUPS = {"tables": group_tables, "images": group_images, "folders": group_folders, "checkpoints": group_checkpoints,
          "configs": group_configs, "templates": group_templates, "shards": group_shards}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DOC), help=f"Markdown file to write (default: {DOC.relative_to(ROOT)})")
    parser.add_argument("--only", nargs="+", choices=list(GROUPS), help="run only these groups")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # keep the load light; the cases are tiny
    logging.getLogger().addHandler(LOG)  # before parclip's CLI: its basicConfig then adds no console handler
    logging.getLogger().setLevel(logging.INFO)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hostile-fixtures-") as d:
        print("building fixtures ...", file=sys.stderr)
        fx = build_fixtures(Path(d))
        sw = Sweep(fx)
        for name in args.only or GROUPS:
            print(f"{name}:", file=sys.stderr)
            GROUPS[name](sw)
    counts = Counter(r.outcome for r in sw.rows)
    table = markdown(sw.rows, counts)
    print(table)
    print(f"\n{len(sw.rows)} cases in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{o}: {counts.get(o, 0)}" for o in OUTCOMES))
    fails = [r for r in sw.rows if r.outcome.startswith("FAIL")]
    for cause, members in fail_causes(sw.rows):
        print(f"\n--- {cause}")
        for r in members:
            print(f"    {r.input} / {r.entry}: {_cell(r.said, 160)}")
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        old = Path(args.out).read_text() if Path(args.out).is_file() else ""
        Path(args.out).write_text(document(table, sw.rows, old[old.find(KEPT):] if KEPT in old else ""))
        print(f"\nwritten: {args.out}")
    for err in sw.harness_errors:
        print(f"\nHARNESS ERROR (the script, not parclip): {err}", file=sys.stderr)
    if sw.harness_errors:
        return 2
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
