"""Where the demo's time goes: stage by stage, and inside one step of the foundation's pre-training.

    .venv/bin/python benchmarks/demo_profile.py [--out DIR] [--skip-demo] [--steps 8] [--json FILE]

1. The demo, stage by stage. `parclip demo` (the default attack and defences) runs in a fresh folder (--out, default a
   temporary one; an existing folder reuses its cached stages, which then take no time), with timers around the
   protocol's building blocks: the Fashion-MNIST export, each training run (foundation, plant, every cleaning run by
   name), poisoning, every zero-shot evaluation (test and validation folders), retrieval. The rest ("other") is the
   demo's own overhead: tables, the figure, reading caches.
2. One step of the foundation, part by part, on the demo's own data and recipe (`parclip-rn-tiny`, 32 px, batch 256,
   the foundation's AdamW): reading a batch of images (PNG decode, or the in-memory decoded copy where the dataset
   keeps one), the transform (resize, to tensor, normalise), the tokens, collating, then the training step's forward
   (both towers and the CLIP loss), backward and the optimiser update, timed the way the training loop runs them
   (:func:`parclip.train.accumulate_step` and the optimiser that :func:`parclip.train.make_optimizer` builds), after
   two warm-up steps; the median of --steps steps. The loader work runs in a DataLoader worker during training, on
   a core the step shares: it is printed per batch so it can be compared with the step.

Prints the CPU model (timings differ by about 1.7x between the CPU kinds we measured) and both splits; --json writes
them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo), with whether it has AVX-512."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{name} ({'with' if ' avx512f' in info else 'without'} AVX-512, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------ 1: the demo


class _Timers:
    """Wall seconds per stage label; `wrap(module, name, label)` times every call of module.name under label."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list = []

    def wrap(self, module, name: str, label) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            key = label(*args, **kwargs) if callable(label) else label
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - t0
                self.calls[key] += 1

        setattr(module, name, timed)
        self._undo.append((module, name, original))

    def restore(self) -> None:
        for module, name, original in reversed(self._undo):
            setattr(module, name, original)


def _run_label(cfg) -> str:
    name = cfg.name
    kind = "foundation" if name == "foundation" else "plant" if name.startswith("plant-") else "clean"
    return f"train: {kind} ({name})"


def _eval_label(model_dir, data_dir, triggers, s) -> str:
    return f"zero-shot eval ({Path(data_dir).name})"


def profile_demo(out: Path) -> dict:
    """Run the demo in `out` with timers on the protocol's building blocks; {stage: seconds}, total, other."""
    import parclip.attacks.poison as poison
    import parclip.demo as demo
    import parclip.protocol.run as protocol_run
    from parclip.protocol import stages

    timers = _Timers()
    timers.wrap(protocol_run, "export_data", "export Fashion-MNIST")  # the name foundation_stage calls
    timers.wrap(stages, "run_training", _run_label)
    timers.wrap(stages, "evaluate_model", _eval_label)
    timers.wrap(poison, "poison_csv", "poison the planting pairs")
    timers.wrap(demo, "_retrieval", "retrieval eval")
    t0 = time.perf_counter()
    try:
        result = demo.run_demo(out)
    finally:
        timers.restore()
    total = time.perf_counter() - t0
    stages_s = dict(sorted(timers.seconds.items(), key=lambda kv: -kv[1]))
    return {"total_s": total, "stages_s": stages_s, "calls": dict(timers.calls),
            "other_s": total - sum(stages_s.values()),
            "table": [{k: r[k] for k in ("model", "lr", "clean_top1", "asr")} for r in result["rows"]]}


# ------------------------------------------------------------------------------------------------ 2: one step


def profile_step(data_root: Path, steps: int) -> dict:
    """The foundation's step, part by part (module docstring, part 2); milliseconds per batch of 256."""
    from torch.utils.data import default_collate

    from parclip.config import make_config
    from parclip.data import CaptionDataset, fashion_mnist
    from parclip.defences import get_defence
    from parclip.defences.augment import train_transform
    from parclip.models import create_model, get_tokenizer
    from parclip.protocol.settings import FOUNDATION
    from parclip import train
    from parclip.train import _embed, accumulate_step, param_groups, precision_policy

    paths = fashion_mnist.export(data_root, n_train=4000, holdout=500, n_test=100, templates="fashion")
    cfg = make_config(**{**FOUNDATION, "train_data": paths["train_csv"], "output_dir": str(data_root / "runs")})
    torch.manual_seed(0)
    model, pp = create_model(cfg.model)
    tokenizer = get_tokenizer(cfg.model)
    transform = train_transform("none", pp)
    ds = CaptionDataset(paths["train_csv"], tokenizer=tokenizer)
    bs = cfg.batch_size
    parts: dict[str, list[float]] = defaultdict(list)

    def timed(label):
        @contextlib.contextmanager
        def block():
            t0 = time.perf_counter()
            yield
            parts[label].append(time.perf_counter() - t0)
        return block()

    for k in range(steps + 2):
        idx = range((k * bs) % (len(ds) - bs), (k * bs) % (len(ds) - bs) + bs)
        with timed("loader: read images"):
            images = [ds.load_image(i) for i in idx]
        with timed("loader: transform"):
            tensors = [transform(im) for im in images]
        with timed("loader: tokens"):
            tokens = [ds.tokens(i) for i in idx]
        with timed("loader: collate"):
            batch = default_collate(list(zip(tensors, tokens)))
        if k < 2:
            for v in parts.values():
                v.clear()
    defence = get_defence(cfg)
    prec = precision_policy("fp32", torch.device("cpu"))
    if hasattr(train, "memory_format"):  # the loop's own layout (channels-last for a ResNet on a CPU)
        model = model.to(memory_format=train.memory_format(model, torch.device("cpu")))
    if hasattr(train, "make_optimizer"):
        optimizer = train.make_optimizer(model, cfg)
    else:  # the code before make_optimizer: the loop's own AdamW
        optimizer = torch.optim.AdamW(param_groups(model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    model.train()
    x, t = batch
    micro = [(x, t, torch.full((bs,), -1))]
    step_parts: dict[str, list[float]] = defaultdict(list)
    for k in range(steps + 2):
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with prec.autocast:
            emb, scale = _embed(model, None, x, t, bs)
            loss, _ = defence.loss(emb, scale.detach(), epoch=0)
        t1 = time.perf_counter()
        prec.scaler.scale(loss).backward()
        t2 = time.perf_counter()
        prec.scaler.step(optimizer)
        prec.scaler.update()
        t3 = time.perf_counter()
        if k >= 2:
            step_parts["step: forward + loss"].append(t1 - t0)
            step_parts["step: backward"].append(t2 - t1)
            step_parts["step: optimiser"].append(t3 - t2)
    # the loop's own call, end to end, as a check on the sum of the parts
    whole = []
    for k in range(steps + 2):
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        accumulate_step(model, None, defence, micro, prec.scaler, prec.autocast, False, 0, model)
        prec.scaler.step(optimizer)
        prec.scaler.update()
        if k >= 2:
            whole.append(time.perf_counter() - t0)
    ms = {label: 1e3 * statistics.median(v) for label, v in {**parts, **step_parts}.items()}
    ms["step: whole (accumulate_step + update)"] = 1e3 * statistics.median(whole)
    return {"batch": bs, "ms_per_batch": ms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help="the demo's folder (default: a fresh temporary one)")
    p.add_argument("--skip-demo", action="store_true", help="part 2 only")
    p.add_argument("--steps", type=int, default=8, help="timed steps in part 2 (after 2 warm-up steps)")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args(argv)
    report = {"cpu": cpu_name(), "torch": torch.__version__}
    print(f"CPU: {report['cpu']}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        report["step"] = profile_step(Path(tmp) / "fm", args.steps)
        print(f"\nthe foundation's step, ms per batch of {report['step']['batch']}:")
        for label, v in report["step"]["ms_per_batch"].items():
            print(f"  {label:40s} {v:8.1f}")
        if not args.skip_demo:
            report["demo"] = d = profile_demo(Path(args.out) if args.out else Path(tmp) / "demo")
            print(f"\nthe demo, {d['total_s']:.0f} s in all:")
            for label, v in d["stages_s"].items():
                print(f"  {label:48s} {v:7.1f} s  {100 * v / d['total_s']:5.1f} %  ({d['calls'][label]} calls)")
            print(f"  {'other (tables, figure, caches)':48s} {d['other_s']:7.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
