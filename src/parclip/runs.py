"""Run directories: what a training run writes besides its checkpoints, and `parclip runs`, which lists them.

A run directory (`<output_dir>/<name>/`) holds `config.yaml` (the resolved configuration), `run.json` (how it was
started: parclip and torch versions, the git commit of the source tree when it is a checkout, the command line, the
world size, the host), `metrics.jsonl` (one JSON object per logged step, validation rows included), `tensorboard/`
with `--report-to tensorboard` (and `wandb/` with `--report-to wandb`, unless $WANDB_DIR says elsewhere),
`checkpoints/` and, when finished, `model/`.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["RunLock", "RunBusyError", "RunLog", "write_run_info", "git_commit", "list_runs", "format_runs"]


class RunBusyError(RuntimeError):
    """Another process is training in this run directory."""


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``<run>/.lock`` while the run trains. The operating
    system drops the lock when the process ends, however it ends (``kill -9`` included), so a killed run never leaves
    its directory stuck; the file itself stays and only says who held it last."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / ".lock"
        self.enabled = enabled
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import os

        if not self.enabled or self.fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunBusyError(f"run directory {self.path.parent} is being written by {holder}; wait for that run to "
                               f"end, or start this one under another --name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self.fd = fd

    def release(self) -> None:
        import fcntl
        import os

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunLog:
    """Appends metric rows to metrics.jsonl and, with "tensorboard" / "wandb" in `report_to` (comma-separated), logs
    them as scalars (every number of the row but "step", at the row's step) to `<run>/tensorboard` / a wandb run.
    A scalar's name is ``section/key`` for a row written with a section, else ``val/<key without val_>`` for a
    "val_…" key and ``train/<key>`` for the others. Only the main process writes.

    `wandb`: the run's wandb settings, {"project", "notes", "config"}; the wandb run is named and identified by the
    run directory's name (a resumed run continues it) and written under $WANDB_DIR, or the run directory. Offline
    (WANDB_MODE=offline) it needs no network."""

    def __init__(self, run_dir: Path, report_to: str = "", enabled: bool = True, wandb: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = self.wandb = None
        targets = report_to.split(",")
        if enabled and "wandb" in targets:
            self.wandb = _wandb_run(Path(run_dir), **(wandb or {}))
        if enabled and "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a dependency; a broken install says how to fix it
                raise RuntimeError(f"--report-to tensorboard needs the tensorboard package ({e}); "
                                   f"pip install tensorboard") from e
            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, row: dict, section: str | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:  # not-atomic: an append-only log, one line per row (a cut line is skipped)
            fh.write(json.dumps(row) + "\n")
        scalars = {_tag(key, section): value for key, value in row.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tag(key: str, section: str | None) -> str:
    if section:
        return f"{section}/{key}"
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def _wandb_run(run_dir: Path, project: str = "parclip", notes: str = "", config: dict | None = None):
    """A wandb run for `run_dir` (see :class:`RunLog`); a clear error when wandb is not installed."""
    import os
    import re

    try:
        import wandb
    except ImportError as e:
        raise RuntimeError(f"--report-to wandb needs the wandb package ({e}): pip install 'parclip[wandb]' (or pip "
                           f"install wandb); WANDB_MODE=offline logs without a network or an account") from e
    where = os.environ.get("WANDB_DIR") or str(run_dir)
    Path(where).mkdir(parents=True, exist_ok=True)
    run_id = re.sub(r"[^A-Za-z0-9_.-]", "-", run_dir.name)[:120]
    return wandb.init(project=project, name=run_dir.name, id=run_id, notes=notes or None, config=config or {},
                      dir=where, resume="allow")


def git_commit(path: Path | None = None) -> dict | None:
    """{"commit", "dirty"} of the git checkout holding `path` (default: this package), or None outside one."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def write_run_info(run_dir: Path, world_size: int) -> None:
    """run.json: how this run was started (appended to a list, so a resumed run keeps every start)."""
    import torch

    from parclip import __version__
    from parclip.utils.files import write_json

    path = Path(run_dir) / "run.json"
    try:
        starts = json.loads(path.read_text())["starts"] if path.is_file() else []
    except (ValueError, KeyError, TypeError):
        starts = []
    starts.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parclip": __version__, "torch": torch.__version__,
                   "python": platform.python_version(), "git": git_commit(), "argv": sys.argv,
                   "world_size": world_size, "host": platform.node()})
    write_json(path, {"starts": starts})


def _last_rows(path: Path) -> tuple[dict, dict]:
    """The last training row and the last validation row of a metrics.jsonl."""
    train, val = {}, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if any(k.startswith("val_") for k in row):
                val = {**val, **row}  # the last value of every validation metric (zero-shot and --val-data rows)
            elif "loss" in row:
                train = row
    return train, val


def _state(run: Path) -> str:
    """finished (model exported), running (its lock is held), or unfinished (resumable with the same --name)."""
    if (run / "model" / "open_clip_config.json").is_file():
        return "finished"
    if (run / ".lock").is_file():
        lock = RunLock(run)
        try:
            lock.acquire()
        except RunBusyError:
            return "running"
        lock.release()
    return "unfinished"


def list_runs(root: str | Path) -> list[dict]:
    """One dict per run directory under `root` (or `root` itself if it is one): name, objective, model, step,
    total steps, last loss, last validation numbers, whether it finished, its path. Newest first."""
    import yaml

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    dirs = [root] if (root / "config.yaml").is_file() else sorted(p for p in root.iterdir()
                                                                   if (p / "config.yaml").is_file())
    rows = []
    for d in dirs:
        try:
            cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
        train, val = _last_rows(d / "metrics.jsonl")
        rows.append({"name": d.name, "objective": cfg.get("objective"), "model": cfg.get("model"),
                     "step": train.get("step"), "epoch": train.get("epoch"), "loss": train.get("loss"),
                     "images_per_s": train.get("images_per_s"),
                     **{k: v for k, v in val.items() if k.startswith("val_")},
                     "finished": (d / "model" / "open_clip_config.json").is_file(), "path": str(d),
                     "state": _state(d),
                     "mtime": (d / "metrics.jsonl").stat().st_mtime if (d / "metrics.jsonl").is_file()
                     else (d / "config.yaml").stat().st_mtime})
    return sorted(rows, key=lambda r: -r["mtime"])


def format_runs(rows: list[dict]) -> str:
    """A fixed-width table of `list_runs` rows."""
    if not rows:
        return "no runs"
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    name_w = max(4, *(len(r["name"]) for r in rows))
    head = (f"{'name':<{name_w}}  {'objective':<9}  {'step':>6}  {'loss':>7}  {'img/s':>7}  {'val top-1':>9}  "
            f"{'val ASR':>7}  state")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<{name_w}}  {fmt(r['objective'], '<9')}  {fmt(r['step'], '>6')}  "
                     f"{fmt(r['loss'], '>7.3f')}  {fmt(r['images_per_s'], '>7.1f')}  "
                     f"{fmt(r.get('val_clean_top1'), '>9.2f')}  {fmt(r.get('val_asr'), '>7.2f')}  "
                     f"{r['state']}")
    return "\n".join(lines)
