"""The GPU check: one short run on one GPU that proves parclip's CUDA paths and measures PAR's cost where users run it.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget-s 260]   # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry-run [--out DIR/gpu_check.json]      # the same code on the CPU, tiny models

Sections, in the order they run. Each is recorded in the JSON with its status (ok, check failed, failed with the
error, or skipped when the time budget is spent), so one failure never hides the rest. Correctness first; the
sections before `compile` stop starting `compile_reserve_s` early, so compiling (the costliest) gets its time:

  resume       `parclip train` (PAR, AMP fp16 with its gradient scaler) killed with SIGKILL while it writes its 2nd
               checkpoint (the fault-injection point of parclip.utils.files), then run again: it must log that it
               resumed (steps 1, 2 then 2, 3, 4), move the weights, and end with the weights, optimiser state and
               scaler state of an uninterrupted run bit for bit (deterministic algorithms, no TF32, PyTorch's own
               attention kernel; the scaler's growth tracker tells a restored scaler from a fresh one).
  distributed  `parclip train` under torchrun against one plain process on the same global batch: the losses and the
               update must agree, as the gloo tests of tests/test_train.py check on the CPU. Two NCCL processes where
               there are two GPUs; on one GPU (NCCL refuses two processes on one device) one process in an NCCL
               group of one: NCCL's set-up, an all-reduce, an all-gather, and the loop's own all-reduce through the
               group, but no DDP and no gather of embeddings. `mode` and `why` say which.
  steps        training steps of fine-tuning (`clip`) and PAR in fp32, AMP fp16 and AMP bf16 on one fixed batch of
               random data: median step time, images/s, peak GPU memory, PAR ÷ fine-tuning step time. PAR's only
               extra work is the frozen copy's forward, about a third of a forward + backward at the same precision
               (ratio ≈ 1.33); less where the frozen copy is cheaper (16-bit weights, inference mode).
  pipeline     the input pipeline's images/s per worker process with PAR's augmentation at the model's resolution,
               from a caption table of JPEGs and from webdataset shards of them, and the workers one GPU needs to keep
               the fastest PAR step fed (`parclip train --workers`).
  memory       PAR with --grad-checkpointing: the peak memory saved; the big model (ViT-L-14-336 at the paper's 120
               images, AMP bf16) with and without it, measured against the estimate of docs/at_scale.md (:func:`estimate_gib`).
  compile      the `steps` configurations with torch.compile (model and frozen copy), AMP fp16 first, then bf16
               and fp32 while the budget lasts.

`--dry-run` runs every section on the CPU with tiny models and a few steps (torch.compile with the "aot_eager"
backend, which traces and differentiates the graphs but builds no kernels; AMP fp16 only), so the suite keeps this
script from rotting; its timings mean nothing. The JSON's format is documented in docs/gpu_check.md. Exit status 1
when a section or a configuration failed or a check did not hold, 0 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check; before CUDA

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import make_images, measure_steps, pipeline_rates  # noqa: E402

from parclip.config import make_config  # noqa: E402
from parclip.data.shards import table_to_shards  # noqa: E402
from parclip.models import create_model, model_config, save_model  # noqa: E402
from parclip.models.architectures import build  # noqa: E402
from parclip.protocol.traces import read_trace  # noqa: E402
from parclip.runs import git_commit  # noqa: E402
from parclip.train import frozen_copy, train  # noqa: E402
from parclip.utils.files import write_json  # noqa: E402

PRECISIONS = ("fp32", "amp", "amp_bf16")
OBJECTIVES = ("clip", "par")


@dataclass(frozen=True)
class Settings:
    """What one check runs: the GPU's sizes, or the dry run's."""

    device: str
    model: str               # steps, memory, pipeline
    batch: int               # images per step in `steps` and `memory`
    warmup: int              # untimed steps per configuration (compiling happens there)
    steps: int               # timed steps per configuration
    big_model: str
    big_batch: int
    big_precision: str
    run_model: str           # the short `parclip train` runs (resume, distributed): the CUDA paths do not depend on
    run_batch: int           # the model's size, and a smaller model writes smaller checkpoints
    workers: int             # their data-loading workers
    pipeline_images: int
    compile_backend: str
    compile_precisions: tuple  # in the order they compile
    compile_reserve_s: float  # of --budget-s, kept for `compile`: the sections before it stop starting earlier


GPU = Settings(device="cuda", model="ViT-B-32-quickgelu", batch=256, warmup=3, steps=20, big_model="ViT-L-14-336",
               big_batch=120, big_precision="amp_bf16", run_model="ViT-S-32", run_batch=32, workers=4,
               pipeline_images=512, compile_backend="inductor",
               compile_precisions=("amp", "amp_bf16", "fp32"), compile_reserve_s=90)
DRY = Settings(device="cpu", model="parclip-micro", batch=8, warmup=1, steps=2, big_model="parclip-tiny", big_batch=8,
               big_precision="amp_bf16", run_model="parclip-micro", run_batch=8, workers=1, pipeline_images=32,
               compile_backend="aot_eager", compile_precisions=("amp",), compile_reserve_s=0)


# ------------------------------------------------------------------------------------------- the memory estimate


def estimate_gib(model_name: str, n_params: int, frozen_bytes: int, batch: int, checkpointing: bool) -> dict:
    """Peak training memory of PAR for a ViT CLIP with 16-bit autocast and fused attention (no stored attention
    matrix), the rule of docs/at_scale.md ("ViT-L-14-336 PAR at 120 images"):

        fixed       = n_params · (4 weights + 4 gradients + 8 AdamW moments + 2 for the 16-bit copies of the weights
                      that autocast makes and keeps for the backward pass) + the frozen copy's bytes
        activations = Σ_towers  layers · batch · 34 · s · h                      (bytes kept for the backward pass;
                      s tokens, h width, 34·s·h per layer and sample: Korthikanti et al., arXiv 2205.05198, §4.1)
        with --grad-checkpointing: Σ_towers layers · batch · 2 · s · h (each block's input) + one vision block's
                      34 · s · h · batch (recomputed one block at a time)

    Returns {"fixed", "activations", "total"} in GiB."""
    cfg = model_config(model_name)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    grid = v["image_size"] // v["patch_size"]
    towers = [(v["layers"], grid * grid + 1, v["width"]), (t["layers"], t.get("context_length", 77), t["width"])]
    if checkpointing:
        _, s, h = towers[0]
        act = sum(n * batch * 2 * s_ * h_ for n, s_, h_ in towers) + 34 * s * h * batch
    else:
        act = sum(n * batch * 34 * s * h for n, s, h in towers)
    fixed = n_params * 18 + frozen_bytes
    return {"fixed": fixed / 2**30, "activations": act / 2**30, "total": (fixed + act) / 2**30}


def _model_bytes(model_name: str, precision: str) -> tuple[int, int]:
    """(parameters of `model_name`, bytes of PAR's frozen copy of it at `precision`), from shapes alone (built on the
    meta device: no memory, no initialisation)."""
    model = build(model_name, device="meta")
    frozen = frozen_copy(model, precision)
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() * p.element_size() for p in frozen.parameters()))


# ------------------------------------------------------------------------------------------- the sections


def check_steps(s: Settings, compile_backend: str | None, budget) -> dict:
    """`steps` (eager) or `compile`: every precision × {clip, par} on one fixed batch, PAR ÷ fine-tuning per
    precision."""
    rows = []
    for precision in s.compile_precisions if compile_backend else PRECISIONS:
        pair = {}
        for objective in OBJECTIVES:
            if budget.spent():
                rows.append({"precision": precision, "objective": objective, "skipped": "time budget"})
                continue
            r = _measured(s.model, s.batch, s.steps, objective, device=s.device, precision=precision,
                          compile_backend=compile_backend, warmup=s.warmup)
            pair[objective] = r
            rows.append({"precision": precision, "objective": objective, **r})
        if all("step_s" in pair.get(o, {}) for o in OBJECTIVES):
            rows[-1]["par_over_ft"] = pair["par"]["step_s"] / pair["clip"]["step_s"]
    return {"model": s.model, "batch": s.batch, "timed_steps": s.steps, "warmup_steps": s.warmup,
            "compile_backend": compile_backend, "rows": rows, "ok": not any("error" in r for r in rows)}


def _measured(*args, **kw) -> dict:
    """:func:`measure_steps`, or {"error": …} when the configuration fails (out of memory, a compiler error): one
    configuration's failure is a finding and the others still run."""
    try:
        return measure_steps(*args, **kw)
    except Exception as e:  # noqa: BLE001
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {e}"[:3000], "traceback": traceback.format_exc()[-3000:]}


def check_memory(s: Settings, budget) -> dict:
    """Gradient checkpointing's saving on the step model, then the big model measured against its estimate."""
    steps = max(1, s.steps // 4)
    out = {"model": s.model, "batch": s.batch, "precision": "amp", "timed_steps": steps}
    plain, ckpt = (_measured(s.model, s.batch, steps, "par", device=s.device, precision="amp", warmup=1,
                             checkpointing=c) for c in (False, True))
    out["peak_gib"], out["peak_gib_checkpointing"] = plain.get("peak_mem_gib"), ckpt.get("peak_mem_gib")
    out["step_s"], out["step_s_checkpointing"] = plain.get("step_s"), ckpt.get("step_s")
    out["errors"] = [r["error"] for r in (plain, ckpt) if "error" in r]
    if out["peak_gib"] is not None and out["peak_gib_checkpointing"] is not None:
        out["saved_gib"] = out["peak_gib"] - out["peak_gib_checkpointing"]
    out["big_model"] = _big_model(s, steps, budget)
    out["ok"] = not out["errors"] and not any("error" in row for row in out["big_model"]["rows"])
    return out


def _big_model(s: Settings, steps: int, budget) -> dict:
    """The big model's PAR step with and without checkpointing, each against :func:`estimate_gib`."""
    n_params, frozen_bytes = _model_bytes(s.big_model, s.big_precision)
    big = {"model": s.big_model, "batch": s.big_batch, "precision": s.big_precision, "parameters": n_params,
           "frozen_copy_gib": frozen_bytes / 2**30, "rows": []}
    for checkpointing in (False, True):
        est = estimate_gib(s.big_model, n_params, frozen_bytes, s.big_batch, checkpointing)
        row = {"checkpointing": checkpointing, "estimate_gib": est}
        if budget.spent():
            row["skipped"] = "time budget"
        else:
            row.update(_measured(s.big_model, s.big_batch, steps, "par", device=s.device, precision=s.big_precision,
                                 warmup=1, checkpointing=checkpointing))
            if row.get("peak_mem_gib") is not None:
                row["measured_over_estimate"] = row["peak_mem_gib"] / est["total"]
        big["rows"].append(row)
    return big


def check_pipeline(s: Settings, work: Path) -> dict:
    """Images/s of one worker process (the loading done in this process, on one thread as in a DataLoader worker)
    from a caption table and from shards; the workers the fastest PAR step needs are added when every section has
    run (:func:`feed`)."""
    table = make_images(work / "pipeline", s.pipeline_images)
    table_to_shards(table, work / "pipeline" / "shards", maxcount=64)
    batch = min(64, s.pipeline_images // 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker process
    try:
        rates = pipeline_rates(s.model, table, work / "pipeline" / "shards", s.pipeline_images, batch)
    finally:
        torch.set_num_threads(threads)
    return {"model": s.model, "images": s.pipeline_images, "source_size": [400, 320], "batch": batch,
            "per_worker_images_per_s": rates, "cpu_count": os.cpu_count()}


def feed(report: dict) -> None:
    """The pipeline section's `par_images_per_s` (the fastest PAR configuration of `steps` and `compile`) and
    `workers_needed` to keep it fed, per source: ⌈PAR images/s ÷ one worker's images/s⌉."""
    pipe = report["sections"].get("pipeline", {})
    rates = [r["images_per_s"] for _, r in _step_rows(report) if r.get("objective") == "par" and "images_per_s" in r]
    if pipe.get("status") == "ok" and rates:
        pipe["par_images_per_s"] = max(rates)
        pipe["workers_needed"] = {k: math.ceil(max(rates) / r) for k, r in pipe["per_worker_images_per_s"].items()}


START = "start"  # the model the short runs clean: `s.run_model` with random weights (seed 0), saved once


def _run_config(s: Settings, work: Path, name: str, **kw) -> dict:
    """A short PAR run of `parclip train` on generated JPEG pairs from a saved random model (both made once); `kw`
    overrides its settings."""
    table, start = work / "pairs" / "pairs.csv", work / START
    if not table.is_file():
        make_images(work / "pairs", 4 * s.run_batch)
    if not (start / "open_clip_model.safetensors").is_file():
        torch.manual_seed(0)
        model, pp = create_model(s.run_model)
        save_model(model, start, model_name=s.run_model, preprocess_cfg=pp)
    cfg = dict(model=f"local-dir:{start}", train_data=str(table), objective="par", tau=4.0, epochs=2,
               train_rows=2 * s.run_batch, batch_size=s.run_batch, workers=s.workers, output_dir=str(work / "runs"),
               name=name, progress=False, log_every=1, device=s.device, seed=0)
    return {**cfg, **kw}


@contextlib.contextmanager
def deterministic():
    """Bit-reproducible CUDA for the runs that are compared (then the previous settings again): deterministic
    algorithms (warning, not failing, where an op has none), no cuDNN autotuning, no TF32 (its 10-bit products would
    differ between batch sizes), and PyTorch's own attention kernel in place of the flash, memory-efficient and cuDNN
    ones, whose backward passes may add in any order. On the CPU these change nothing."""
    cuda = torch.backends.cuda
    kernels = [k for k in ("flash", "mem_efficient", "cudnn") if hasattr(cuda, f"enable_{k}_sdp")]
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, cuda.matmul.allow_tf32,
             {k: getattr(cuda, f"{k}_sdp_enabled")() for k in kernels})
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False
    for k in kernels:
        getattr(cuda, f"enable_{k}_sdp")(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, cuda.matmul.allow_tf32 = saved[2:5]
        for k, on in saved[5].items():
            getattr(cuda, f"enable_{k}_sdp")(on)


def _worker(argv: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`python ARGV` (this script in worker mode: `--worker CONFIG`, one deterministic `train` run; or torchrun
    launching it) in fresh processes. A run past `timeout` seconds (a hung collective) gets SIGTERM, which torchrun
    passes on to its workers (they run in sessions of their own, out of reach of a kill of torchrun alone), then
    SIGKILL 30 s later; it is returned as failed (status 124)."""
    proc = subprocess.Popen([sys.executable, *argv], env=dict(os.environ, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, 124, out, f"{err}\nstopped after {timeout:.0f} s")


def check_resume(s: Settings, work: Path) -> dict:
    """An uninterrupted AMP fp16 PAR run against one killed while writing its 2nd checkpoint and then resumed."""
    common = dict(precision="amp", save_every=1)
    cfg = _run_config(s, work, "killed", **common)
    (work / "killed.yaml").write_text(yaml.safe_dump(cfg))
    killed = _worker([__file__, "--worker", str(work / "killed.yaml")], PARCLIP_FAULT_KILL="latest.pt:2")
    run = Path(cfg["output_dir"]) / cfg["name"]
    if not (run / "checkpoints" / "latest.pt").is_file():
        raise RuntimeError(f"the run to be killed left no checkpoint (exit {killed.returncode}): "
                           f"{killed.stderr[-8000:]}")
    at_kill = torch.load(run / "checkpoints" / "latest.pt", weights_only=True, map_location="cpu")
    with deterministic():
        straight = train(make_config(**_run_config(s, work, "straight", **common)))
        train(make_config(**cfg))  # the same name: resumes from the killed run's checkpoint
    a = torch.load(straight / "checkpoints" / "latest.pt", weights_only=True, map_location="cpu")
    b = torch.load(run / "checkpoints" / "latest.pt", weights_only=True, map_location="cpu")
    diff = _max_diff(a["state_dict"], b["state_dict"])
    same = {part: _equal(a[part], b[part]) for part in ("state_dict", "optimizer", "scaler")}
    moved = _max_diff(a["state_dict"], load_file(work / START / "open_clip_model.safetensors"))
    # the killed run logged steps 1 and 2 (killed while saving step 2), the resumed one 2, 3, 4: a run that ignored
    # the checkpoint and started again would log 1, 2, 1, 2, 3, 4 and, deterministic, still end identical
    logged = [r["step"] for r in read_trace(run)["steps"]]
    resumed = logged == [1, 2, 2, 3, 4]
    return {"model": s.run_model, "precision": "amp", "steps": a["step"], "killed_signal": -killed.returncode,
            "checkpoint_step_at_kill": at_kill["step"], "steps_logged": logged, "resumed": resumed,
            "moved": moved, "weights_identical": same["state_dict"], "max_weight_diff": diff,
            "optimizer_identical": same["optimizer"], "scaler_identical": same["scaler"], "scaler": b["scaler"],
            "ok": all(same.values()) and resumed and moved > 0 and -killed.returncode == 9 and at_kill["step"] == 1}


def _max_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between the tensors of two state dicts, over `b`'s keys."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


def _equal(a, b) -> bool:
    """Deep equality of nested state dicts, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_mode(s: Settings) -> tuple[str, str]:
    """("two processes" | "group of one", why). Two processes need a GPU each: NCCL refuses two processes on one
    device ("Duplicate GPU detected"). The dry run takes the group of one, the mode a one-GPU machine runs (the
    two-process equivalence on the CPU is tests/test_train.py's gloo tests)."""
    if s.device == "cpu":
        return "group of one", "the dry run checks the mode a one-GPU machine runs"
    if torch.cuda.device_count() >= 2:
        return "two processes", f"{torch.cuda.device_count()} GPUs"
    return "group of one", "one GPU: NCCL refuses two processes on one device"


def check_distributed(s: Settings, work: Path) -> dict:
    """`parclip train` under torchrun against one plain process on the same global batch of `run_batch` images: the
    same losses and the same update. AdamW with a huge ε makes the update lr·m̂/ε, linear in the gradient, so equal
    updates mean equal gradients (a gradient scaled by the world size would show). Two processes of `run_batch/2`
    images each where there are two GPUs; otherwise one process in a process group of one, which runs NCCL's set-up,
    an all-reduce and an all-gather on the GPU, and the training loop's own all-reduce of its counters through the
    group, but neither DDP nor the gather of embeddings (identities with one process)."""
    linear = dict(lr=10.0, eps=1e4, wd=0.0, schedule="constant", epochs=1, precision="fp32")
    with deterministic():
        one = train(make_config(**_run_config(s, work, "one_process", **linear)))
    mode, why = distributed_mode(s)
    nproc = 2 if mode == "two processes" else 1
    cfg = dict(_run_config(s, work, mode.replace(" ", "_"), **linear), batch_size=s.run_batch // nproc)
    (work / f"{cfg['name']}.yaml").write_text(yaml.safe_dump(cfg))
    run = _worker(["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()),
                   __file__, "--worker", str(work / f"{cfg['name']}.yaml"), *(["--group-of-one"] if nproc == 1 else [])],
                  timeout=180)
    if run.returncode:
        raise RuntimeError(f"torchrun ({mode}) failed with status {run.returncode}: {run.stderr[-8000:]}")
    out = {"backend": "nccl" if s.device == "cuda" else "gloo", "model": s.run_model, "global_batch": s.run_batch,
           "mode": mode, "why": why}
    initial = load_file(work / START / "open_clip_model.safetensors")
    return {**out, **_compare_runs(one, Path(cfg["output_dir"]) / cfg["name"], initial)}


def _compare_runs(a: Path, b: Path, initial: dict) -> dict:
    """Losses per step and final weights of two runs; `moved`: how far the first run's weights went from `initial`."""
    wa, wb = (load_file(r / "model" / "open_clip_model.safetensors") for r in (a, b))
    diff, moved = _max_diff(wa, wb), _max_diff(wa, initial)
    la, lb = ([r["loss"] for r in read_trace(run)["steps"]] for run in (a, b))
    loss_diff = max(abs(x - y) for x, y in zip(la, lb)) if la and len(la) == len(lb) else None  # None: step counts
    return {"losses": [la, lb], "max_loss_diff": loss_diff, "max_weight_diff": diff, "moved": moved,
            "ok": loss_diff is not None and loss_diff < 1e-4 and moved > 0 and diff < 1e-3 * moved}


# ------------------------------------------------------------------------------------------- running and reporting


class Budget:
    """The check's time budget: sections and configurations that would start after it are skipped, not run."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() > self.end

    def sooner(self, seconds: float) -> Budget:
        """The same budget, spent `seconds` earlier (for the sections that leave time to the last one)."""
        budget = Budget(0)
        budget.end = self.end - seconds
        return budget


def run_section(report: dict, name: str, budget: Budget, fn, out: Path) -> dict:
    """Run one section into `report["sections"][name]` with its status and wall time, then write the JSON (so a
    check killed half-way leaves what it measured). A section never stops the others: its error is recorded."""
    t0 = time.perf_counter()
    if budget.spent():
        result = {"status": "skipped", "reason": "time budget"}
    else:
        try:
            result = fn()
            result["status"] = "ok" if result.get("ok", True) else "check failed"
        except Exception as e:  # noqa: BLE001 - any failure is a finding of the check, recorded with its traceback
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["sections"][name] = {**result, "wall_s": time.perf_counter() - t0}
    write_json(out, report)
    return report["sections"][name]


def environment(s: Settings) -> dict:
    """Versions, the GPU, and what torch.compile's inductor needs to build kernels (a C compiler, Python's headers):
    where they are missing, the `compile` rows' errors say so and this tells why."""
    include = sysconfig.get_paths().get("include") or ""
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "device": s.device, "c_compiler": shutil.which("cc") or shutil.which("gcc"),
           "python_headers": os.path.isfile(os.path.join(include, "Python.h"))}
    if s.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()
        env.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    env["commit"] = git_commit(Path(__file__).resolve().parent)  # {"commit", "dirty"}, or None outside a checkout
    return env


def table(report: dict) -> str:
    """The short Markdown summary printed at the end (the GPU table of docs/at_scale.md)."""
    env, sec = report["environment"], report["sections"]
    gib = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [f"**{env.get('gpu', 'CPU (dry run)')}**, torch {env['torch']}, CUDA {env.get('cuda', '–')}, "
             f"{report['wall_s']:.0f} s", "",
             "| section | precision | fine-tuning img/s | PAR img/s | PAR ÷ FT | FT peak GiB | PAR peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for name in ("steps", "compile"):
        rows = sec.get(name, {}).get("rows", [])
        for precision in PRECISIONS:
            ft = next((r for r in rows if r["precision"] == precision and r["objective"] == "clip"), {})
            par = next((r for r in rows if r["precision"] == precision and r["objective"] == "par"), {})
            if "images_per_s" in ft or "images_per_s" in par:
                ratio = par.get("par_over_ft")
                lines.append(f"| {name} | {precision} | {ft.get('images_per_s', 0):.0f} | "
                             f"{par.get('images_per_s', 0):.0f} | {'–' if ratio is None else f'{ratio:.2f}'} | "
                             f"{gib(ft.get('peak_mem_gib'))} | {gib(par.get('peak_mem_gib'))} |")
    rows = _step_rows(report)
    skipped = [f"{name} {r['precision']} {r['objective']}" for name, r in rows if "skipped" in r]
    failed = [f"{name} {r['precision']} {r['objective']} ({r['error'][:200]})" for name, r in rows if "error" in r]
    lines.append("")
    lines += [f"Skipped for the time budget: {', '.join(skipped)}."] if skipped else []
    lines += [f"Failed: {'; '.join(failed)}."] if failed else []
    for name in ("resume", "distributed", "memory", "pipeline"):
        lines.append(f"- {name}: {sec.get(name, {}).get('status', 'not run')}. {_summary(name, sec.get(name, {}))}")
    return "\n".join(lines)


def _step_rows(report: dict) -> list[tuple[str, dict]]:
    """(section, row) for every configuration of `steps` and `compile`."""
    return [(name, r) for name in ("steps", "compile") for r in report["sections"].get(name, {}).get("rows", [])]


def _summary(name: str, r: dict) -> str:
    """One sentence per section for the table's notes."""
    if r.get("status") in ("failed", "skipped", None):
        return r.get("error") or r.get("reason") or ""
    if name == "resume":
        return (f"killed by signal {r['killed_signal']} with the step-{r['checkpoint_step_at_kill']} checkpoint on "
                f"disk, steps logged {r['steps_logged']}; weights, optimiser and scaler identical to an uninterrupted "
                f"run: {r['weights_identical']}, {r['optimizer_identical']}, "
                f"{r['scaler_identical']} (scale {r['scaler']['scale']:g}, growth tracker "
                f"{r['scaler']['_growth_tracker']})")
    if name == "distributed":
        return (f"{r['mode']} ({r['backend']}; {r['why']}): losses within {_num(r['max_loss_diff'])}, weights "
                f"within {_num(r['max_weight_diff'])} of a {_num(r['moved'])} move")
    if name == "memory":
        big = r["big_model"]
        parts = [f"{big['model']} at {big['batch']} images ({big['precision']})"]
        for row in big["rows"]:
            got = ("skipped (time budget)" if "skipped" in row else f"failed ({row['error'][:200]})" if "error" in row
                   else gib_text(row.get("peak_mem_gib")))
            parts.append(f"{'with' if row['checkpointing'] else 'without'} checkpointing: peak {got}, "
                         f"estimate {row['estimate_gib']['total']:.1f} GiB")
        if r.get("step_s") and r.get("step_s_checkpointing"):
            parts.append(f"checkpointing saves {gib_text(r.get('saved_gib'))} on {r['model']} at {r['batch']} "
                         f"images (step time × {r['step_s_checkpointing'] / r['step_s']:.2f})")
        parts += [f"failed: {e[:200]}" for e in r.get("errors", [])]
        return "; ".join(parts)
    rates = r["per_worker_images_per_s"]
    need = r.get("workers_needed", {})
    return (f"per worker {rates['csv']:.0f} img/s from a table, {rates['webdataset']:.0f} from shards; "
            f"PAR's fastest step needs {need.get('webdataset', '–')} workers on shards")


def _num(x) -> str:
    return "–" if x is None else f"{x:.1e}"


def gib_text(x) -> str:
    return "not measured (CPU)" if x is None else f"{x:.1f} GiB"


@record  # under torchrun, a worker's traceback reaches torchrun's own error report
def worker(config: Path, group_of_one: bool) -> None:
    """`--worker CONFIG`: one deterministic `train` run, under torchrun or alone. With --group-of-one (under torchrun
    with one process) the process sets up a process group of one itself (NCCL on a GPU, gloo on the CPU), checks an
    all-reduce and an all-gather on the device, trains under that group, and takes it down."""
    import torch.distributed as dist

    if group_of_one:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
        x = torch.full((4,), 3.0, device=dev)
        dist.all_reduce(x)
        gathered = torch.empty(4 * dist.get_world_size(), device=dev)
        dist.all_gather_into_tensor(gathered, x)
        if not torch.equal(gathered.cpu(), torch.full((4,), 3.0)):
            raise RuntimeError(f"collectives in a group of one changed the data: {gathered}")
    try:
        with deterministic():
            train(make_config(**yaml.safe_load(config.read_text())))
    finally:
        if group_of_one:
            dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report (default %(default)s)")
    ap.add_argument("--budget-s", type=float, default=260.0,
                    help="seconds after which no further section or configuration starts (default %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny models")
    ap.add_argument("--work-dir", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--group-of-one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.group_of_one)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA GPU is visible here; run with --dry-run to check the script on the CPU")
    s = DRY if args.dry_run else GPU
    budget, t0 = Budget(args.budget_s), time.perf_counter()
    early = budget.sooner(s.compile_reserve_s)  # every section before `compile`
    report = {"format": 1, "dry_run": args.dry_run, "settings": asdict(s), "environment": environment(s),
              "budget_s": args.budget_s, "sections": {}}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        sections = [("resume", early, lambda: check_resume(s, work)),
                    ("distributed", early, lambda: check_distributed(s, work)),
                    ("steps", early, lambda: check_steps(s, None, early)),
                    ("pipeline", early, lambda: check_pipeline(s, work)),
                    ("memory", early, lambda: check_memory(s, early)),
                    ("compile", budget, lambda: check_steps(s, s.compile_backend, budget))]
        for name, limit, fn in sections:
            report["wall_s"] = time.perf_counter() - t0
            print(f"[{report['wall_s']:6.0f} s] {name} …", flush=True)
            r = run_section(report, name, limit, fn, args.out)
            print(f"          {r['status']} in {r['wall_s']:.0f} s", flush=True)
    report["wall_s"] = time.perf_counter() - t0
    feed(report)
    write_json(args.out, report)
    try:
        print(table(report))
    except (KeyError, TypeError, ValueError) as e:  # the JSON is the report; the table only summarises it
        print(f"(no table: {type(e).__name__}: {e}; every figure is in the JSON)")
    print(f"\nfull report: {args.out}")
    return int(any(r["status"] in ("failed", "check failed") for r in report["sections"].values()))


if __name__ == "__main__":
    sys.exit(main())
