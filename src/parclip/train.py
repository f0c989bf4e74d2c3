"""The training loop, read top to bottom in :func:`_train`: models, data, optimiser and precision, resume, then per
optimiser step the loss and its update (`_step`), the bookkeeping (`_Progress`), validation and checkpoints, and at the
end the export. Objectives `par` (clean a model) and `clip` (fine-tune, or plant a backdoor by training on poisoned
pairs), and every other registered defence.

Single process, multi-GPU and multi-node take the same path: launch with `torchrun` (or `srun`) and every rank runs
`train(cfg)`; embeddings are gathered with gradient and the model is wrapped in DistributedDataParallel, so the update
equals a single-process step on the whole global batch (a loop that skips DDP and never synchronises its ranks trains
each rank on its own share instead).

Run directory (`<output_dir>/<name>/`): `config.yaml` (resolved), `out.log`, `metrics.jsonl`, `checkpoints/latest.pt`
(model, optimiser, scaler, step; plain data, loadable with weights_only=True), and at the end `model/` (safetensors +
open_clip_config.json, loadable with `open_clip.create_model("local-dir:<run>/model")`). Re-running with the same
name resumes from the latest checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from parclip.attacks.poison import manifest_beside, poisoned_overlap, poisoning_warnings, trained_on
from parclip.config import TrainConfig
from parclip.data import DataError
from parclip.data.shards import is_shard_spec
from parclip.data.sources import TrainingData, open_training_data
from parclip.defences import Defence, Embeddings, get_defence
from parclip.defences.augment import FixedThenRandom, train_transform
from parclip.defences.schedule import lr_at
from parclip.models import create_model, get_tokenizer, image_size, save_model
from parclip.models.checkpoints import CheckpointError, check_finite, nonfinite_tensors, verify_zip
from parclip.runs import RunLock, RunLog, write_run_info
from parclip.utils import distributed as pdist
from parclip.utils.files import atomic_write, write_text

__all__ = ["train", "param_groups", "make_optimizer", "memory_format", "precision_policy", "Precision", "frozen_copy",
           "accumulate_step", "NonFiniteError"]

log = logging.getLogger("parclip")


def train(cfg: TrainConfig) -> Path:
    """Train according to `cfg`; returns the run directory (the final model is in `<run>/model`). The run directory
    is locked for the duration (one writer per run; a second `parclip train` on it is refused). A process group that
    this call set up (under torchrun or srun) is taken down when the run finishes; one the caller set up is left."""
    info = pdist.init_distributed(cfg.device)
    _check(cfg)
    run_dir, lock = _run_dir(cfg, info)
    try:
        _train(cfg, info, run_dir)
    finally:
        lock.release()
    if info.owns_group:
        pdist.cleanup()
    return run_dir


def _train(cfg: TrainConfig, info: pdist.DistInfo, run_dir: Path) -> None:
    """The run, top to bottom: models, data, optimiser and precision, resume, the loop, the export."""
    _setup_logging(run_dir, info.is_main)
    runlog = RunLog(run_dir, cfg.report_to, enabled=info.is_main,  # metrics.jsonl (+ TensorBoard, wandb)
                    wandb=dict(project=cfg.wandb_project_name, notes=cfg.wandb_notes, config=dataclasses.asdict(cfg)))
    torch.manual_seed(cfg.seed)  # same initialisation on every rank (DDP also broadcasts rank 0's weights)
    prec = precision_policy(cfg.precision, info.device)
    m = _models(cfg, info.device, prec.name)
    data = _data(cfg, info, m)
    plan = _plan(len(data), cfg, info.world_size)
    optimizer = make_optimizer(m.model, cfg)
    step = _resume(cfg.resume, run_dir, info.device, m, optimizer, prec.scaler, plan.total_steps,
                   workers=cfg.workers if data.is_shards else None)
    ddp = DistributedDataParallel(m.model) if info.distributed else m.model
    forward = torch.compile(ddp) if cfg.torch_compile else ddp  # state dicts are still read from `model`
    if cfg.torch_compile and m.frozen is not None:
        m = m._replace(frozen=torch.compile(m.frozen))  # θ0 is never saved: only its forward is needed
    if info.is_main:
        _announce(cfg, info, len(data), plan, prec.name)
    progress = _Progress(step, plan, show=cfg.progress and info.is_main, desc=cfg.objective)
    checks = _validators(cfg, m, info.device, prec)

    while step < plan.total_steps:
        epoch, first = divmod(step, plan.steps_per_epoch)
        batches = data.loader(epoch, first * cfg.accum_freq, plan.steps_per_epoch * cfg.accum_freq)
        _train_mode(m.model, cfg.bn_mode, m.defence)
        for micro in _groups(batches, cfg.accum_freq):  # the micro-batches of one optimiser step
            lr = _set_lr(optimizer, step, cfg, plan.steps_per_epoch)
            loss, parts, applied = _step(forward, ddp, m, optimizer, prec, micro, epoch=epoch, step=step, cfg=cfg,
                                         run_dir=run_dir, device=info.device)
            step += 1
            progress.count(step, micro, applied)
            if step % cfg.log_every == 0 or step == plan.total_steps:
                progress.check_bad_rows(data, cfg.max_bad_fraction, cfg.train_data)
                runlog.write(progress.metrics(step, epoch, lr, loss, parts, m.model))
            progress.show(loss, lr)
            for check in [c for c in checks if c.due(step, plan, cfg)]:
                check(m.model, step, epoch, runlog, info)
                _train_mode(m.model, cfg.bn_mode, m.defence)
            if cfg.save_every and step % cfg.save_every == 0 and step < plan.total_steps:
                _save_checkpoint(run_dir, m.model, optimizer, prec.scaler, step, plan.total_steps, m.defence, cfg,
                                 info.is_main)
        _end_of_epoch(run_dir, m, optimizer, prec.scaler, step, plan, cfg, info.is_main)
    progress.close()
    runlog.close()
    progress.check_bad_rows(data, cfg.max_bad_fraction, cfg.train_data, final=True)
    _export(m, run_dir, cfg, plan.total_steps, info.is_main)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on ≥2-D weights only; biases, norm affines, class embedding and logit scale get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not any(k in name for k in ("bias", "ln", "bn")) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the run's lr, (β1, β2), ε and weight decay, using PyTorch's fused kernel
    (``fused=True``: one pass over every parameter, the same update rule up to float rounding) when every trained
    parameter is a floating-point tensor on the CPU or a CUDA device, the default implementation otherwise. On a CPU the
    fused kernel is 5-10x faster than the default per-parameter loop: for the demo's small CLIP, whose 49 408 x 128
    token embedding is most of its weights, the update was a quarter of the step (benchmarks/demo_profile.py)."""
    groups = param_groups(model, cfg.wd)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **({"fused": True} if fused else {}))


# ------------------------------------------------------------------------------------------- set-up: the phases


class _Models(NamedTuple):
    """θ (trained) and θ0 (a frozen copy of the starting, possibly poisoned, model, for a defence that keeps one: PAR),
    the defence, open_clip's preprocess config, the tokenizer, and whether the logit scale is trained."""

    model: torch.nn.Module
    frozen: torch.nn.Module | None
    defence: Defence
    preprocess: dict
    tokenizer: object
    learn_scale: bool


def _models(cfg: TrainConfig, device: torch.device, precision: str) -> _Models:
    """The model to train, the defence, the frozen copy when the defence keeps one, and the tokenizer; `precision` is
    the run's resolved --precision (the frozen copy's weights follow it)."""
    model, preprocess = create_model(cfg.model, cfg.pretrained, device=device, force_quick_gelu=cfg.force_quick_gelu,
                                     allow_unsafe_load=cfg.allow_unsafe_load, cache_dir=cfg.cache_dir)
    defence = get_defence(cfg)
    model = model.to(memory_format=memory_format(model, device))
    frozen = frozen_copy(model, precision) if defence.frozen_copy() else None
    learn_scale = (cfg.logit_scale if cfg.logit_scale != "auto" else defence.logit_scale) == "learned"
    model.logit_scale.requires_grad_(learn_scale)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)  # recompute activations in backward: less memory, about 1/3 more compute
    return _Models(model, frozen, defence, preprocess, get_tokenizer(cfg.model), learn_scale)


def memory_format(model: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """The weights' layout for training: channels-last (oneDNN's layout for convolutions) for a convolutional image
    tower (more than the one patch-embedding convolution of a ViT) on a CPU, where it made the step of the demo's
    ResNet CLIP about 10 % faster (benchmarks/demo_profile.py); PyTorch's default layout otherwise. The layout changes
    which kernels run, not what is computed (up to float rounding); saved weights are stored contiguous."""
    convs = sum(isinstance(mod, torch.nn.Conv2d) for mod in model.modules())
    return torch.channels_last if device.type == "cpu" and convs > 1 else torch.contiguous_format


def _data(cfg: TrainConfig, info: pdist.DistInfo, m: _Models) -> TrainingData:
    """The training pairs with the defence's views: the plain image view (with the run's augmentation), the defence's
    extra image views and its caption views. Easy mistakes with poisoned data are said here, before they cost a run."""
    augment = cfg.augment if cfg.augment != "auto" else m.defence.augment
    plain = train_transform(augment, m.preprocess, noise=cfg.noise, noise_sigma=cfg.noise_sigma)
    extra = m.defence.image_views(m.preprocess)
    own_captions = type(m.defence).prepare_captions is not Defence.prepare_captions
    data = open_training_data(
        cfg.train_data, dataset_type=cfg.dataset_type, transform=_Views(plain, *extra) if extra else plain,
        tokenizer=m.tokenizer, caption_views=m.defence.prepare_captions if own_captions else None,
        num_samples=cfg.train_num_samples, rows=cfg.train_rows, batch_size=cfg.batch_size,
        world_size=info.world_size, rank=info.rank,
        seed=cfg.seed, workers=cfg.workers, pin_memory=info.device.type == "cuda", shuffle_buffer=cfg.shuffle_buffer,
        resampled=cfg.dataset_resampled, img_key=cfg.csv_img_key, caption_key=cfg.csv_caption_key,
        sep=cfg.csv_separator, root=cfg.data_root, max_bad_fraction=cfg.max_bad_fraction,
        split=_split(plain) if not extra else None, memory_gib=cfg.memory_gib)
    if info.is_main:
        _warn_about_poisoned_data(cfg.train_data, shards=data.is_shards, model=cfg.model, size=image_size(m.preprocess),
                                  cleaning=cfg.objective != "clip", img_key=cfg.csv_img_key, sep=cfg.csv_separator,
                                  root=cfg.data_root)
    if data.in_memory and info.is_main:
        log.info("%s: its %d samples were transformed once, into memory (--memory-gib %g)", cfg.train_data, len(data),
                 cfg.memory_gib)
    m.defence.check_data_size(len(data))
    return data


def _split(transform) -> tuple | None:
    """The plain view's transform as (fixed part, random part or None) for a table kept in memory, when it says its
    parts (:class:`~parclip.defences.augment.FixedThenRandom`: --augment none and par); None otherwise (roclip)."""
    return (transform.fixed, transform.random) if isinstance(transform, FixedThenRandom) else None


def frozen_copy(model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
    """θ0, the frozen copy of the starting model that PAR measures its distances from, made as cheap as it can be:
    eval mode, no gradients, its forward run under ``torch.inference_mode`` (no autograd state: :func:`accumulate_step`)
    and, under AMP (`precision` "amp" or "amp_bf16"), the weights of its matrix products stored in the autocast dtype
    (fp16 or bf16; open_clip's ``convert_weights_to_lp``), and so are its token, position and class embeddings. Those
    are what autocast (or open_clip, for the embeddings) casts to that dtype at every forward anyway, so the embeddings
    are those of the fp32 copy under the same autocast up to that dtype's rounding, at about half the memory and
    without the casts; normalisations stay fp32. Its forward must then run under the same autocast, as the training
    loop's does. With fp32, an exact copy."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if precision in ("amp", "amp_bf16"):
        dtype = torch.float16 if precision == "amp" else torch.bfloat16
        open_clip.convert_weights_to_lp(frozen, dtype)
        for module in frozen.modules():  # tables open_clip casts to the tower's dtype before use: the same result
            if isinstance(module, torch.nn.Embedding):
                module.weight.data = module.weight.data.to(dtype)
            for name in ("positional_embedding", "class_embedding"):
                if isinstance(getattr(module, name, None), torch.nn.Parameter):
                    getattr(module, name).data = getattr(module, name).data.to(dtype)
    return frozen


class _Plan(NamedTuple):
    global_batch: int      # images per optimiser step, over every process and micro-batch
    steps_per_epoch: int
    total_steps: int


def _plan(n_samples: int, cfg: TrainConfig, world_size: int) -> _Plan:
    """Optimiser steps per epoch and in all; a DataError when the data holds less than one global batch."""
    global_batch = cfg.batch_size * world_size * cfg.accum_freq
    steps_per_epoch = n_samples // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.train_data} has {n_samples} usable samples, fewer than one global batch of "
                        f"{global_batch} ({cfg.batch_size} × {world_size} processes × --accum-freq "
                        f"{cfg.accum_freq}); lower --batch-size or --accum-freq")
    return _Plan(global_batch, steps_per_epoch, steps_per_epoch * cfg.epochs)


class Precision(NamedTuple):
    """A run's precision: its name, the autocast context of its forward passes and its gradient scaler."""

    name: str                                  # fp32 | amp (fp16 with a GradScaler) | amp_bf16
    autocast: object                           # the forward's autocast context, or a null one
    scaler: torch.amp.GradScaler               # enabled for fp16 only


def precision_policy(precision: str, device: torch.device) -> Precision:
    """--precision: "auto" is fp16 autocast on CUDA, fp32 elsewhere; bf16 needs no loss scaling. (TrainConfig has
    already refused open_clip's half-precision weights and spelt amp_bfloat16 as amp_bf16.)"""
    name = precision if precision != "auto" else ("amp" if device.type == "cuda" else "fp32")
    autocast = (torch.autocast(device.type, dtype=torch.float16 if name == "amp" else torch.bfloat16)
                if name in ("amp", "amp_bf16") else nullcontext())
    return Precision(name, autocast, torch.amp.GradScaler(device.type, enabled=name == "amp"))


def _resume(resume: str, run_dir: Path, device, m: _Models, optimizer, scaler, total_steps: int, *,
            workers: int | None = None) -> int:
    """Load the training state to resume from (--resume: "auto" is the run's latest checkpoint, if any) into the
    model, optimiser, scaler and defence; returns the step to continue from (0 for a fresh run). A checkpoint of
    another model, optimiser or length of run is refused, saying what to do. `workers`: --workers of a run over
    shards, whose batches depend on it (each worker reads shards of its own); another value than the checkpoint's is
    warned about."""
    path = _resume_path(resume, run_dir)
    if path is None:
        return 0
    state = _training_state(path, device)
    try:
        m.model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # names missing keys
        raise CheckpointError(f"{path} does not fit this run's model or optimiser ({detail[:500]}); resume it with "
                              f"the configuration that wrote it, or use a new --name") from e
    m.defence.load_state_dict(state.get("defence", {}))
    step = state["step"]
    if state.get("total_steps", total_steps) != total_steps:
        raise ValueError(f"{path} was written for {state['total_steps']} steps but this configuration has "
                         f"{total_steps}; use a new --name or --resume none")
    was = (state.get("config") or {}).get("workers")
    if workers is not None and was is not None and was != workers:
        log.warning("%s was written by a run with --workers %s, resumed with --workers %d: over shards each worker "
                    "reads shards of its own, so the rest of the run sees its samples in another order than the "
                    "killed run would have (resume with --workers %s for exactly the same batches)", path, was,
                    workers, was)
    log.info("resumed from %s at step %d/%d", path, step, total_steps)
    return step


def _resume_path(resume: str, run_dir: Path) -> Path | None:
    """--resume: none, auto (the run's latest checkpoint if there is one), latest (the same, an error without one, as
    open_clip_train's --resume latest), or a checkpoint path."""
    if resume == "none":
        return None
    if resume in ("auto", "latest"):
        p = run_dir / "checkpoints" / "latest.pt"
        if resume == "latest" and not p.is_file():
            raise FileNotFoundError(f"--resume latest: run {run_dir} has no checkpoint (checkpoints/latest.pt) to "
                                    f"resume from; pass the --name of an earlier run, or --resume auto to start "
                                    f"fresh when there is none")
        return p if p.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"--resume {p}: no such checkpoint")
    return p


def _training_state(path: Path, device) -> dict:
    """A parclip training checkpoint, read weights-only (a file that pickles code is refused, never run); anything
    else is a CheckpointError that says what the file is instead."""
    import zipfile

    if zipfile.is_zipfile(path):
        verify_zip(path)  # damaged entries would otherwise load silently
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, safetensors' and zip's own errors: all "not ours"
        raise CheckpointError(f"--resume {path}: not a readable parclip training checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}). Training checkpoints are "
                              f"read weights-only, so a file that pickles objects is refused, never run") from e
    needed = {"step", "total_steps", "state_dict", "optimizer", "scaler"}
    if not isinstance(state, dict) or not needed <= set(state):
        has = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"--resume {path}: not a parclip training checkpoint (it holds {has}); to start from a "
                              f"model's weights, pass them as --pretrained")
    if isinstance(state["state_dict"], dict):  # anything else is refused when it is loaded
        check_finite(state["state_dict"], source=f"--resume {path}")
    return state


# ------------------------------------------------------------------------------------------- one optimiser step


def _set_lr(optimizer, step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Set (and return) the learning rate of `step` from the run's schedule."""
    lr = lr_at(step, schedule=cfg.schedule, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, lr=cfg.lr,
               lr_decay_ratio=cfg.lr_decay_ratio, lr_end=cfg.lr_end, warmup=cfg.warmup,
               warmup_fraction=cfg.warmup_fraction)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _step(forward, ddp, m: _Models, optimizer, prec: Precision, micro: list, *, epoch: int, step: int,
          cfg: TrainConfig, run_dir: Path, device) -> tuple[torch.Tensor, dict, bool]:
    """One optimiser step on the micro-batches `micro` [(images, tokens, failed)]: the defence's loss and its gradient
    (:func:`accumulate_step`), then the update. Returns (loss, metrics, whether the update was applied).

    A step whose loss or gradients hold a NaN or Inf is never applied: it stops the run (NonFiniteError, naming the
    step and the last good checkpoint) or, with --skip-nonfinite, is dropped. (fp16's GradScaler skips its own overflow
    steps.) --grad-clip bounds the norm of the unscaled gradients; a learned logit scale is kept in [0, ln 100]."""
    micro = [(_stacked(i).to(device, non_blocking=True), _stacked(t).to(device, non_blocking=True), f)
             for i, t, f in micro]  # per micro-batch: views stacked after the plain one
    optimizer.zero_grad(set_to_none=True)
    loss, parts = accumulate_step(forward, m.frozen, m.defence, micro, prec.scaler, prec.autocast, m.learn_scale,
                                  epoch, ddp)
    applied = _finite_step(loss, m.model, prec.scaler)
    if applied:
        if cfg.grad_clip:
            prec.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(m.model.parameters(), cfg.grad_clip)
        prec.scaler.step(optimizer)
        prec.scaler.update()
    elif not cfg.skip_nonfinite:
        last = run_dir / "checkpoints" / "latest.pt"
        raise NonFiniteError(f"non-finite {'loss' if not torch.isfinite(loss) else 'gradients'} at step "
                             f"{step + 1} (loss {loss.item()}); nothing of this step was applied or saved. "
                             f"Last good checkpoint: {last if last.is_file() else 'none yet'}. Lower "
                             f"--lr, check the data, or pass --skip-nonfinite to skip such steps")
    else:
        optimizer.zero_grad(set_to_none=True)
    if m.learn_scale:
        with torch.no_grad():
            m.model.logit_scale.clamp_(0, math.log(100))
    return loss, parts, applied


def _finite_step(loss: torch.Tensor, model, scaler) -> bool:
    """Whether the step may be applied: a finite loss and, without fp16's GradScaler (which skips such steps itself),
    finite gradients (one sum per tensor: a NaN or Inf anywhere makes it non-finite)."""
    if not torch.isfinite(loss.detach()).all():
        return False
    if scaler.is_enabled():
        return True
    sums = [p.grad.sum() for p in model.parameters() if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def accumulate_step(forward, frozen, defence, micro, scaler, autocast, learn_scale: bool, epoch: int, ddp):
    """Backward of the defence's loss on the accumulated batch of the micro-batches `micro` [(images, texts, failed)]
    (tensors on the model's device, views stacked after the plain one); the optimiser step is the caller's.

    One micro-batch: the plain step. Several (open_clip's --accum-freq): embeddings of every micro-batch are first
    computed without gradient and cached; then for each micro-batch j its embeddings are recomputed with gradient and
    put in place of the cached ones, and the loss over the *whole* accumulated batch is back-propagated. Each backward
    yields the gradient through micro-batch j only, so the sum is the gradient of the loss of one large batch (exact,
    not an average of small-batch losses); the shared logit scale gets its gradient from the last pass only. A
    stateful defence (RoCLIP's pool) sees the state before the step in every pass and is updated once, by the last.
    `forward` is the (wrapped) model, `frozen` the frozen copy or None, `ddp` the DistributedDataParallel wrapper (or
    the model), whose gradient synchronisation waits for the last pass. Returns (loss, metrics) of the whole batch.
    """
    ns = [f.shape[0] for _, _, f in micro]
    if len(micro) == 1:
        (images, texts, _), = micro
        with autocast:
            batch, scale = _embed(forward, frozen, images, texts, ns[0])
            loss, parts = defence.loss(batch, scale if learn_scale else scale.detach(), epoch=epoch)
        scaler.scale(loss).backward()
        return loss, parts
    with torch.no_grad(), autocast:
        cached = [_embed(forward, frozen, i, t, n)[0] for (i, t, _), n in zip(micro, ns)]
    last = len(micro) - 1
    for j, ((images, texts, _), n) in enumerate(zip(micro, ns)):
        sync = ddp.no_sync() if j < last and isinstance(ddp, DistributedDataParallel) else nullcontext()
        with sync:
            with autocast:
                fresh, scale = _embed(forward, None, images, texts, n)
                fresh.img0, fresh.txt0 = cached[j].img0, cached[j].txt0
                d = copy.deepcopy(defence) if defence.stateful and j < last else defence
                # the logit scale is shared by every pass: its gradient is taken once, in the last
                loss, parts = d.loss(_joined(cached[:j] + [fresh] + cached[j + 1:]),
                                     scale if learn_scale and j == last else scale.detach(), epoch=epoch)
            scaler.scale(loss).backward()
    return loss, parts


def _embed(forward, frozen, images, texts, n: int) -> tuple[Embeddings, torch.Tensor]:
    """The global batch's embeddings of one micro-batch (every view, gathered across processes with gradient), the
    frozen copy's of the plain view when there is one, and exp(logit_scale)."""
    img, txt, scale = forward(images, texts)  # L2-normalised embeddings of every view
    batch = Embeddings(img=[pdist.gather_with_grad(v) for v in img.split(n)],
                       txt=[pdist.gather_with_grad(v) for v in txt.split(n)])
    if frozen is not None:
        with torch.inference_mode():  # θ0 needs no autograd state at all
            img0, txt0, _ = frozen(images[:n], texts[:n])
        # clones are ordinary tensors again, which autograd may use (inference tensors cannot be saved for backward)
        batch.img0, batch.txt0 = pdist.gather_with_grad(img0.clone()), pdist.gather_with_grad(txt0.clone())
    return batch, scale


def _joined(parts: list[Embeddings]) -> Embeddings:
    """Micro-batch embeddings concatenated into those of the accumulated batch (view by view)."""
    cat = lambda xs: torch.cat(xs) if xs[0] is not None else None  # noqa: E731
    return Embeddings(img=[torch.cat(v) for v in zip(*(p.img for p in parts))],
                      txt=[torch.cat(v) for v in zip(*(p.txt for p in parts))],
                      img0=cat([p.img0 for p in parts]), txt0=cat([p.txt0 for p in parts]))


def _stacked(x) -> torch.Tensor:
    """A batch of one view [B, ...], or of several (a tuple of [B, ...]), as one tensor [V·B, ...], plain view first."""
    return torch.cat(list(x)) if isinstance(x, (tuple, list)) else x


def _groups(loader, k: int):
    """Lists of k consecutive batches (the micro-batches of one optimiser step); an incomplete last group is dropped."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []


class _Views:
    """PIL image -> (plain view, extra views...): the defence's image views of one sample, each its own transform."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, img):
        return tuple(t(img) for t in self.transforms)


def _train_mode(model, bn_mode: str, defence) -> None:
    """Training mode, with BatchNorm statistics frozen when the run (--bn-mode) or its defence asks for it."""
    model.train()
    if (bn_mode if bn_mode != "auto" else defence.bn_mode) == "frozen":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


class NonFiniteError(RuntimeError):
    """A NaN or Inf in the loss, the gradients or the weights."""


# ------------------------------------------------------------------------------------------- bookkeeping


def _announce(cfg: TrainConfig, info: pdist.DistInfo, n_samples: int, plan: _Plan, precision: str) -> None:
    log.info("%s: %d rows, %d steps of %d images (%d per device × %d%s), %s, %s", cfg.objective, n_samples,
             plan.total_steps, plan.global_batch, cfg.batch_size, info.world_size,
             f" × {cfg.accum_freq} accumulated" if cfg.accum_freq > 1 else "", precision, info.device)


class _Progress:
    """The loop's bookkeeping: images seen and images that failed to decode (with the first few ids, to name them),
    steps skipped for non-finite numbers, images/s (measured once a step, for metrics.jsonl and the bar alike), and
    the progress bar."""

    def __init__(self, step: int, plan: _Plan, *, show: bool, desc: str):
        self.bar = tqdm(total=plan.total_steps, initial=step, disable=not show, desc=desc, dynamic_ncols=True,
                        unit="step")
        self.seen, self.bad = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
        self.bad_examples: list[int] = []
        self.skipped = 0  # steps whose update was skipped for non-finite numbers (--skip-nonfinite)
        self.t0, self.step0, self.global_batch = time.time(), step, plan.global_batch
        self.images_per_s = 0.0

    def count(self, step: int, micro: list, applied: bool) -> None:
        """Step `step` is done: count its images, those that failed, a skipped update; measure images/s."""
        if not applied:
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradients, update skipped (%d so far)", step, self.skipped)
        failed = torch.cat([f for _, _, f in micro])
        self.seen += failed.shape[0]
        failed = failed[failed >= 0]
        self.bad += failed.numel()
        self.bad_examples += failed.tolist()[: max(0, 5 - len(self.bad_examples))]
        self.images_per_s = (step - self.step0) * self.global_batch / max(time.time() - self.t0, 1e-9)

    def metrics(self, step: int, epoch: int, lr: float, loss: torch.Tensor, parts: dict, model) -> dict:
        """The row of metrics.jsonl for this step: the loss and its parts, lr, logit scale, images/s, skipped steps."""
        row = {"step": step, "epoch": epoch, "lr": lr, "loss": loss.item(),
               "logit_scale": model.logit_scale.detach().exp().item(), "images_per_s": self.images_per_s}
        row.update(parts)
        if self.skipped:
            row["skipped_nonfinite"] = self.skipped
        return row

    def show(self, loss: torch.Tensor, lr: float) -> None:
        self.bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", img_s=f"{self.images_per_s:.0f}",
                             refresh=False)
        self.bar.update()

    def check_bad_rows(self, data: TrainingData, max_bad_fraction: float, source: str, final: bool = False) -> None:
        """Images that failed to decode were replaced by the next row (every process's counted): stop when they are
        more than `max_bad_fraction` of the images seen, naming the first; at the end, warn about any."""
        totals = pdist.all_reduce_sum(torch.stack([self.seen, self.bad]).clone())
        n_seen, n_bad = int(totals[0]), int(totals[1])
        if n_bad == 0:
            return
        first = "; ".join(data.describe(i) for i in self.bad_examples)
        if n_bad > max_bad_fraction * max(n_seen, 1):
            raise DataError(f"{n_bad} of {n_seen} images failed to decode (more than --max-bad-fraction "
                            f"{max_bad_fraction}); first: {first}. Run `parclip data check {source}`")
        if final:
            log.warning("%d of %d images failed to decode (or their samples were broken) and were replaced; first: %s",
                        n_bad, n_seen, first)

    def close(self) -> None:
        self.bar.close()


def _validators(cfg: TrainConfig, m: _Models, device, prec: Precision) -> list:
    """The run's validations: zero-shot on --imagenet-val, open_clip's validation on --val-data (either, both,
    none)."""
    checks = []
    if cfg.imagenet_val:
        checks.append(_Validator(cfg, m.preprocess, m.tokenizer, device))
    if cfg.val_data:
        checks.append(_PairValidator(cfg, m.preprocess, m.tokenizer, device, prec.autocast))
    return checks


def _epoch_end_due(step: int, plan: _Plan, every_epochs: int) -> bool:
    """open_clip_train's rule: after every N-th finished epoch and after the last one; never for N = 0."""
    if not every_epochs or step % plan.steps_per_epoch:
        return False
    return (step // plan.steps_per_epoch) % every_epochs == 0 or step == plan.total_steps


class _PairValidator:
    """open_clip_train's validation on --val-data (image–caption pairs), on rank 0 every --val-frequency epochs and
    after the last: the contrastive loss and the retrieval ranks (:func:`parclip.evaluation.retrieval.validate_pairs`),
    appended to metrics.jsonl as {"step", "epoch", "clip_val_loss", "val_num_samples", "image_to_text_R@1", ...}
    (logged under val/ to TensorBoard and wandb); the other ranks wait. The table is checked when the run starts."""

    def __init__(self, cfg: TrainConfig, preprocess, tokenizer, device, autocast):
        from .data.sources import validation_pairs
        from .models import eval_transform

        kw = dict(img_key=cfg.csv_img_key, caption_key=cfg.csv_caption_key, sep=cfg.csv_separator,
                  root=cfg.data_root, limit=cfg.val_num_samples, max_bad_fraction=cfg.max_bad_fraction)
        validation_pairs(cfg.val_data, **kw)  # a bad table fails now, not after the first epoch
        self.pairs = lambda: validation_pairs(cfg.val_data, **kw)
        self.transform, self.tokenizer, self.device = eval_transform(preprocess), tokenizer, device
        self.batch_size, self.autocast, self.every = cfg.batch_size, autocast, cfg.val_frequency

    def due(self, step: int, plan: _Plan, cfg: TrainConfig) -> bool:
        return _epoch_end_due(step, plan, self.every)

    def __call__(self, model, step: int, epoch: int, runlog: RunLog, info) -> None:
        if info.is_main:
            from .evaluation.retrieval import validate_pairs

            rng = torch.get_rng_state()
            r = validate_pairs(model, self.pairs(), transform=self.transform, tokenizer=self.tokenizer,
                               batch_size=self.batch_size, device=self.device, autocast=self.autocast)
            torch.set_rng_state(rng)
            r["val_num_samples"] = r.pop("num_samples")
            runlog.write({"step": step, "epoch": epoch, **r}, section="val")
            log.info("step %d: validation on --val-data: clip_val_loss %.4f, image_to_text_R@1 %.4f, "
                     "text_to_image_R@1 %.4f", step, r["clip_val_loss"], r["image_to_text_R@1"],
                     r["text_to_image_R@1"])
        pdist.barrier()


class _Validator:
    """Zero-shot clean accuracy (and ASR of one trigger) on a labelled folder (--imagenet-val), measured on rank 0
    every --val-every steps, or every --zeroshot-frequency epochs, and at the end, and appended to metrics.jsonl as
    {"step", "epoch", "val_clean_top1", "val_clean_top5"[, "val_asr"]}; the other ranks wait. The folder is read
    once; the trigger is built at the model's resolution."""

    def __init__(self, cfg: TrainConfig, preprocess, tokenizer, device):
        from .attacks.triggers import build_triggers, parse_trigger_params
        from .data.sources import open_labelled
        from .models import eval_transform

        # a bad path fails now, not after the first epoch
        self.folder = open_labelled(cfg.imagenet_val, transform=eval_transform(preprocess))
        params = parse_trigger_params(p for p in cfg.val_trigger_param.split(",") if p.strip())
        self.triggers = build_triggers([cfg.val_attack], image_size(preprocess), params) if cfg.val_attack else []
        self.target, self.templates, self.seed = cfg.val_target, cfg.val_templates, cfg.seed
        self.preprocess, self.tokenizer, self.device = preprocess, tokenizer, device

    def due(self, step: int, plan: _Plan, cfg: TrainConfig) -> bool:
        """Every --val-every steps when it is set (and at the end), else open_clip's --zeroshot-frequency rule."""
        if cfg.val_every:
            return step % cfg.val_every == 0 or step == plan.total_steps
        return _epoch_end_due(step, plan, cfg.zeroshot_frequency)

    def __call__(self, model, step: int, epoch: int, runlog: RunLog, info) -> None:
        if info.is_main:
            from .evaluation import evaluate
            rng = torch.get_rng_state()  # validation must not change the training's random stream
            r = evaluate(model, self.preprocess, self.tokenizer, self.folder, attacks=self.triggers,
                         target=self.target, templates=self.templates, seed=self.seed,
                         workers=0, device=self.device, progress=False)
            row = {"step": step, "epoch": epoch, "val_clean_top1": r["clean_top1"], "val_clean_top5": r["clean_top5"]}
            torch.set_rng_state(rng)
            if self.triggers:
                row["val_asr"] = r["asr"]
            runlog.write(row)
            log.info("step %d: validation %s", step, ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                                 if k.startswith("val")))
        pdist.barrier()


# ------------------------------------------------------------------------------------------- checkpoints, export


def _end_of_epoch(run_dir: Path, m: _Models, optimizer, scaler, step: int, plan: _Plan, cfg: TrainConfig,
                  is_main: bool) -> None:
    """The checkpoint of a finished epoch (latest.pt) and, with --save-frequency N, a copy epoch_<k>.pt kept for
    every N-th finished epoch (open_clip's convention)."""
    _save_checkpoint(run_dir, m.model, optimizer, scaler, step, plan.total_steps, m.defence, cfg, is_main)
    done = step // plan.steps_per_epoch
    if cfg.save_frequency and is_main and done % cfg.save_frequency == 0:
        atomic_write(run_dir / "checkpoints" / f"epoch_{done}.pt",
                     lambda tmp: shutil.copyfile(run_dir / "checkpoints" / "latest.pt", tmp))


def _save_checkpoint(run_dir: Path, model, optimizer, scaler, step: int, total_steps: int, defence,
                     cfg: TrainConfig, is_main: bool) -> None:
    """Atomic write of the training state (plain tensors and primitives only)."""
    if is_main:
        _check_finite_model(model, f"checkpoint at step {step}")
        state = {"step": step, "total_steps": total_steps, "state_dict": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "config": dataclasses.asdict(cfg), "finished": step == total_steps,
                 "defence": defence.state_dict()}
        atomic_write(run_dir / "checkpoints" / "latest.pt", lambda tmp: torch.save(state, tmp))
    pdist.barrier()


def _export(m: _Models, run_dir: Path, cfg: TrainConfig, total_steps: int, is_main: bool) -> None:
    """The trained model as `<run>/model` (open_clip's local-dir layout), never with a non-finite weight."""
    if is_main:
        _check_finite_model(m.model, "export")
        save_model(m.model, run_dir / "model", model_name=cfg.model, preprocess_cfg=m.preprocess,
                   force_quick_gelu=cfg.force_quick_gelu)
        log.info("finished %d steps; model saved to %s", total_steps, run_dir / "model")
    pdist.barrier()


def _check_finite_model(model, what: str) -> None:
    """Refuse to write a model with a NaN or Inf weight (it would pass for a trained one)."""
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise NonFiniteError(f"the model has non-finite weights ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}); "
                             f"the {what} was not written")


# ------------------------------------------------------------------------------------------- the run's set-up


def _check(cfg: TrainConfig) -> None:
    """What a valid TrainConfig (which checks every value's domain when it is made) still needs to be a run: data,
    and for PAR a model to clean."""
    if not cfg.train_data:
        raise ValueError("no training data: pass --train-data TABLE.csv (an image–caption table)")
    if cfg.val_data and Path(cfg.val_data).is_dir() and not is_shard_spec(cfg.val_data):
        raise ValueError(f"--val-data {cfg.val_data} is a folder: --val-data is now open_clip_train's image–caption "
                         f"pairs to validate on (a table or shards); for zero-shot accuracy on a labelled folder "
                         f"ROOT/<class>/* (what --val-data was), pass --imagenet-val {cfg.val_data}")
    if cfg.objective == "par" and not cfg.pretrained and not cfg.model.startswith("local-dir:"):
        raise ValueError("PAR cleans a given model: pass --pretrained CHECKPOINT (or --model local-dir:PATH)")


def _run_dir(cfg: TrainConfig, info: pdist.DistInfo) -> tuple[Path, RunLock]:
    """Decide the run folder on rank 0 and share it, so that every rank writes and resumes the same run; rank 0 locks
    it before writing anything into it."""
    name = cfg.name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.objective}-{cfg.model.replace('/', '-')}"
    if info.distributed:
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    run_dir = Path(cfg.output_dir) / name
    lock = RunLock(run_dir, enabled=info.is_main)
    if info.is_main:
        lock.acquire()
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        write_run_info(run_dir, info.world_size)
    pdist.barrier()
    return run_dir, lock


def _setup_logging(run_dir: Path, is_main: bool) -> None:
    for old in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
        log.removeHandler(old)
        old.close()
    if not is_main:
        return
    handler = logging.FileHandler(run_dir / "out.log")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _warn_about_poisoned_data(source: str, *, shards: bool, model: str, size: int, cleaning: bool, img_key: str,
                              sep: str | None, root: str | None) -> None:
    """Easy mistakes said before they cost a run: training on data poisoned at another resolution, a defence
    (`cleaning`) given a poisoned set, or clean pairs that share images with the data the starting model was
    poisoned with (checked for a caption table)."""
    manifest = manifest_beside(source, shards=shards)
    for warning in poisoning_warnings(manifest, size, cleaning=cleaning) if manifest else []:
        log.warning("%s: %s", source, warning)
    planted = manifest_beside(trained_on(model))  # the starting model was exported by a planting run
    if planted and cleaning and not shards:
        n = poisoned_overlap(planted, source, img_key=img_key, sep=sep, root=root)
        if n:
            log.warning("%d pairs of %s show images the starting model was poisoned with (%s → '%s'); the clean set "
                        "of a defence should be disjoint from the poisoned one", n, source,
                        planted.get("trigger", {}).get("name"), planted.get("target"))
