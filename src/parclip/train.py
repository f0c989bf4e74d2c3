"""The training loop: one function, read top to bottom. Objectives `par` (clean a model) and `clip` (fine-tune, or
plant a backdoor by training on poisoned pairs).

Single process, multi-GPU and multi-node take the same path: launch with `torchrun` (or `srun`) and every rank runs
`train(cfg)`; embeddings are gathered with gradient and the model is wrapped in DistributedDataParallel, so the update
equals a single-process step on the whole global batch (the reference bypassed DDP, par.md §3.4).

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

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from parclip.attacks.poison import manifest_beside, poisoned_overlap, poisoning_warnings, trained_on
from parclip.config import TrainConfig
from parclip.data import CaptionDataset, DataError
from parclip.data.shards import ShardStream, expand_urls, is_shard_spec, shard_sizes
from parclip.defences import Defence, Embeddings, get_defence
from parclip.defences.augment import train_transform
from parclip.defences.schedule import lr_at
from parclip.models import create_model, get_tokenizer, image_size, save_model
from parclip.models.checkpoints import CheckpointError, verify_zip
from parclip.runs import RunLock, RunLog, write_run_info
from parclip.utils import distributed as pdist
from parclip.utils.files import atomic_write, write_text

__all__ = ["train", "param_groups", "NonFiniteError"]

log = logging.getLogger("parclip")


def train(cfg: TrainConfig) -> Path:
    """Train according to `cfg`; returns the run directory (the final model is in `<run>/model`). The run directory
    is locked for the duration (one writer per run; a second `parclip train` on it is refused)."""
    info = pdist.init_distributed(cfg.device)
    _check(cfg)
    run_dir, lock = _run_dir(cfg, info)
    try:
        return _train(cfg, info, run_dir)
    finally:
        lock.release()


def _train(cfg: TrainConfig, info: pdist.DistInfo, run_dir: Path) -> Path:
    """The run, top to bottom: models, data, optimiser, resume, the loop, the export."""
    _setup_logging(run_dir, info.is_main)
    runlog = RunLog(run_dir, cfg.report_to, enabled=info.is_main)  # metrics.jsonl (+ TensorBoard)
    torch.manual_seed(cfg.seed)  # same initialisation on every rank (DDP also broadcasts rank 0's weights)

    # ---- models: θ is trained, θ0 is a frozen copy of the starting (possibly poisoned) model ----
    model, preprocess = create_model(cfg.model, cfg.pretrained, device=info.device,
                                     force_quick_gelu=cfg.force_quick_gelu, allow_unsafe_load=cfg.allow_unsafe_load,
                                     cache_dir=cfg.cache_dir)
    defence = get_defence(cfg)
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if defence.frozen_copy() else None
    learn_scale = (cfg.logit_scale if cfg.logit_scale != "auto" else defence.logit_scale) == "learned"
    model.logit_scale.requires_grad_(learn_scale)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)  # recompute activations in backward: less memory, about 1/3 more compute
    tokenizer = get_tokenizer(cfg.model)

    # ---- data: the plain view (with the defence's augmentation) and the defence's extra views ----
    augment = cfg.augment if cfg.augment != "auto" else defence.augment
    plain = train_transform(augment, preprocess, noise=cfg.noise, noise_sigma=cfg.noise_sigma)
    extra = defence.image_views(preprocess)
    data = _training_data(cfg, info, defence, tokenizer, _Views(plain, *extra) if extra else plain)
    if info.is_main:
        _warn_about_poisoned_data(cfg, image_size(preprocess))
    defence.check_data_size(len(data))
    global_batch = cfg.batch_size * info.world_size * cfg.accum_freq  # images per optimiser step
    steps_per_epoch = len(data) // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.train_data} has {len(data)} usable samples, fewer than one global batch of "
                        f"{global_batch} ({cfg.batch_size} × {info.world_size} processes × --accum-freq "
                        f"{cfg.accum_freq}); lower --batch-size or --accum-freq")
    total_steps = steps_per_epoch * cfg.epochs

    # ---- optimiser, precision ----
    optimizer = torch.optim.AdamW(param_groups(model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    precision = cfg.precision if cfg.precision != "auto" else ("amp" if info.device.type == "cuda" else "fp32")
    autocast = (torch.autocast(info.device.type, dtype=torch.float16 if precision == "amp" else torch.bfloat16)
                if precision in ("amp", "amp_bf16") else nullcontext())
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "amp")

    # ---- resume ----
    step = 0
    ckpt_path = _resume_path(cfg, run_dir)
    if ckpt_path is not None:
        state = _training_state(ckpt_path, info.device)
        try:
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt_path} does not fit this run's model or optimiser ({str(e).splitlines()[0]}); "
                                  f"resume it with the configuration that wrote it, or use a new --name") from e
        defence.load_state_dict(state.get("defence", {}))
        step = state["step"]
        if state.get("total_steps", total_steps) != total_steps:
            raise ValueError(f"{ckpt_path} was written for {state['total_steps']} steps but this configuration has "
                             f"{total_steps}; use a new --name or --resume none")
        log.info("resumed from %s at step %d/%d", ckpt_path, step, total_steps)
    ddp = DistributedDataParallel(model) if info.distributed else model
    forward = torch.compile(ddp) if cfg.torch_compile else ddp  # state dicts are still read from `model`

    if info.is_main:
        log.info("%s: %d rows, %d steps of %d images (%d per device × %d%s), %s, %s", cfg.objective, len(data),
                 total_steps, global_batch, cfg.batch_size, info.world_size,
                 f" × {cfg.accum_freq} accumulated" if cfg.accum_freq > 1 else "", precision, info.device)
    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and info.is_main), desc=cfg.objective,
               dynamic_ncols=True, unit="step")
    seen, bad = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    bad_examples: list[int] = []
    t0, step0 = time.time(), step
    skipped = 0  # steps whose update was skipped for non-finite numbers (--skip-nonfinite)
    validator = _Validator(cfg, preprocess, tokenizer, info.device) if cfg.val_data else None

    # ---- the loop ----
    while step < total_steps:
        epoch, first_batch = divmod(step, steps_per_epoch)
        loader = _loader(data, cfg, info, epoch, first_batch, steps_per_epoch)
        _train_mode(model, cfg, defence)
        for micro in _groups(loader, cfg.accum_freq):
            lr = lr_at(step, schedule=cfg.schedule, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, lr=cfg.lr,
                       lr_start=cfg.lr_start, lr_end=cfg.lr_end, warmup=cfg.warmup, warmup_steps=cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [(_stacked(i).to(info.device, non_blocking=True), _stacked(t).to(info.device, non_blocking=True),
                      f) for i, t, f in micro]  # per micro-batch: views stacked after the plain one
            optimizer.zero_grad(set_to_none=True)
            loss, parts = _accumulate(forward, frozen, defence, micro, scaler, autocast, learn_scale, epoch, ddp)
            if not _finite_step(loss, model, scaler):  # NaN/Inf loss, or gradients (GradScaler handles fp16's own)
                skipped += 1
                if not cfg.skip_nonfinite:
                    last = run_dir / "checkpoints" / "latest.pt"
                    raise NonFiniteError(f"non-finite {'loss' if not torch.isfinite(loss) else 'gradients'} at step "
                                         f"{step + 1} (loss {loss.item()}); nothing of this step was applied or saved. "
                                         f"Last good checkpoint: {last if last.is_file() else 'none yet'}. Lower "
                                         f"--lr, check the data, or pass --skip-nonfinite to skip such steps")
                log.warning("step %d: non-finite loss or gradients, update skipped (%d so far)", step + 1, skipped)
                optimizer.zero_grad(set_to_none=True)
            else:
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            if learn_scale:
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
            step += 1

            # bookkeeping: corrupt images, metrics, progress, checkpoints
            failed = torch.cat([f for _, _, f in micro])
            seen += failed.shape[0]
            failed = failed[failed >= 0]
            bad += failed.numel()
            bad_examples += failed.tolist()[: max(0, 5 - len(bad_examples))]
            if step % cfg.log_every == 0 or step == total_steps:
                _check_bad_rows(data, cfg, seen, bad, bad_examples)
                metrics = {"step": step, "epoch": epoch, "lr": lr, "loss": loss.item(),
                           "logit_scale": model.logit_scale.detach().exp().item(), "images_per_s":
                           (step - step0) * global_batch / max(time.time() - t0, 1e-9)}
                metrics.update(parts)
                if skipped:
                    metrics["skipped_nonfinite"] = skipped
                runlog.write(metrics)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}",
                            img_s=f"{(step - step0) * global_batch / max(time.time() - t0, 1e-9):.0f}", refresh=False)
            bar.update()
            if validator and (step % (cfg.val_every or steps_per_epoch) == 0 or step == total_steps):
                validator(model, step, epoch, runlog, info)
                _train_mode(model, cfg, defence)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                _save_checkpoint(run_dir, model, optimizer, scaler, step, total_steps, cfg, info, defence)
        _save_checkpoint(run_dir, model, optimizer, scaler, step, total_steps, cfg, info, defence)
        if cfg.save_frequency and info.is_main and (step // steps_per_epoch) % cfg.save_frequency == 0:
            done = step // steps_per_epoch  # open_clip's epoch_N.pt: a copy kept for every N-th finished epoch
            atomic_write(run_dir / "checkpoints" / f"epoch_{done}.pt",
                         lambda tmp: shutil.copyfile(run_dir / "checkpoints" / "latest.pt", tmp))
    bar.close()
    runlog.close()

    _check_bad_rows(data, cfg, seen, bad, bad_examples, final=True)
    if info.is_main:
        _check_finite_model(model, "export")
        save_model(model, run_dir / "model", model_name=cfg.model, preprocess_cfg=preprocess,
                   force_quick_gelu=cfg.force_quick_gelu)
        log.info("finished %d steps; model saved to %s", total_steps, run_dir / "model")
    pdist.barrier()
    return run_dir


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on ≥2-D weights only; biases, norm affines, class embedding and logit scale get none."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not any(k in name for k in ("bias", "ln", "bn")) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------- helpers


class _Views:
    """PIL image -> (plain view, extra views...): the defence's image views of one sample, each its own transform."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, img):
        return tuple(t(img) for t in self.transforms)


def _groups(loader, k: int):
    """Lists of k consecutive batches (the micro-batches of one optimiser step); an incomplete last group is dropped."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []


def _embed(forward, frozen, images, texts, n: int) -> tuple[Embeddings, torch.Tensor]:
    """The global batch's embeddings of one micro-batch (every view, gathered across processes with gradient), the
    frozen copy's of the plain view when there is one, and exp(logit_scale)."""
    img, txt, scale = forward(images, texts)  # L2-normalised embeddings of every view
    batch = Embeddings(img=[pdist.gather_with_grad(v) for v in img.split(n)],
                       txt=[pdist.gather_with_grad(v) for v in txt.split(n)])
    if frozen is not None:
        with torch.no_grad():
            img0, txt0, _ = frozen(images[:n], texts[:n])
        batch.img0, batch.txt0 = pdist.gather_with_grad(img0), pdist.gather_with_grad(txt0)
    return batch, scale


def _joined(parts: list[Embeddings]) -> Embeddings:
    """Micro-batch embeddings concatenated into those of the accumulated batch (view by view)."""
    cat = lambda xs: torch.cat(xs) if xs[0] is not None else None  # noqa: E731
    return Embeddings(img=[torch.cat(v) for v in zip(*(p.img for p in parts))],
                      txt=[torch.cat(v) for v in zip(*(p.txt for p in parts))],
                      img0=cat([p.img0 for p in parts]), txt0=cat([p.txt0 for p in parts]))


def _accumulate(forward, frozen, defence, micro, scaler, autocast, learn_scale: bool, epoch: int, ddp):
    """Backward of the defence's loss on the accumulated batch of the micro-batches `micro` [(images, texts, failed)].

    One micro-batch: the plain step. Several (open_clip's --accum-freq): embeddings of every micro-batch are first
    computed without gradient and cached; then for each micro-batch j its embeddings are recomputed with gradient and
    put in place of the cached ones, and the loss over the *whole* accumulated batch is back-propagated. Each backward
    yields the gradient through micro-batch j only, so the sum is the gradient of the loss of one large batch (exact,
    not an average of small-batch losses); the shared logit scale gets its gradient from the last pass only. A
    stateful defence (RoCLIP's pool) sees the state before the step in every pass and is updated once, by the last.
    Returns (loss, metrics) of the accumulated batch.
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


def _stacked(x) -> torch.Tensor:
    """A batch of one view [B, ...], or of several (a tuple of [B, ...]), as one tensor [V·B, ...], plain view first."""
    return torch.cat(list(x)) if isinstance(x, (tuple, list)) else x


class _SeededItems(Dataset):
    """Seeds the RNG per (seed, epoch, index) before each item, so augmentation is identical whatever the number
    of workers or ranks, and a resumed run sees the same augmented images as an uninterrupted one."""

    def __init__(self, data, seed: int, epoch: int):
        self.data, self.seed, self.epoch = data, seed, epoch

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        torch.random.default_generator.manual_seed(hash((self.seed, self.epoch, i)) % (2**63))
        return self.data[i]


def _training_data(cfg: TrainConfig, info: pdist.DistInfo, defence, tokenizer, transform):
    """The training pairs: a caption table (CaptionDataset) or webdataset shards (ShardStream), with the defence's
    caption views; `len()` is the number of samples of an epoch."""
    shards = cfg.dataset_type == "webdataset" or (cfg.dataset_type == "auto" and is_shard_spec(cfg.train_data))
    if not shards:
        data = CaptionDataset(cfg.train_data, img_key=cfg.csv_img_key, caption_key=cfg.csv_caption_key,
                              sep=cfg.csv_separator, root=cfg.data_root, tokenizer=tokenizer, transform=transform,
                              max_bad_fraction=cfg.max_bad_fraction, num_samples=cfg.train_num_samples)
        data.captions, data.caption_views = defence.prepare_captions(data.captions)
        return data
    n = cfg.train_num_samples or shard_sizes(expand_urls(cfg.train_data))
    if not n:
        raise DataError(f"{cfg.train_data}: the shards do not say how many samples they hold (no sizes.json or "
                        f"img2dataset *_stats.json beside them); pass --train-num-samples N (samples per epoch)")

    def views(caption: str, key: str):
        captions, extra_views = defence.prepare_captions([caption], keys=[key])
        return captions[0], [v[0] for v in extra_views]

    return ShardStream(cfg.train_data, transform=transform, tokenize=lambda c: tokenizer([c])[0],
                       batch_size=cfg.batch_size, num_samples=n, world_size=info.world_size, rank=info.rank,
                       seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                       captions=views if type(defence).prepare_captions is not Defence.prepare_captions else None)


def _loader(data, cfg: TrainConfig, info: pdist.DistInfo, epoch: int, first_batch: int,
            steps_per_epoch: int) -> DataLoader:
    """The epoch's shuffled share of this rank, skipping the optimiser steps a resumed run already did (`first_batch`
    steps of `accum_freq` micro-batches each): DistributedSampler over a table, or the shard stream's own order."""
    if isinstance(data, ShardStream):
        data.set_epoch(epoch, first_batch * cfg.accum_freq, steps_per_epoch * cfg.accum_freq)
        return DataLoader(data, batch_size=None, num_workers=cfg.workers,
                          pin_memory=info.device.type == "cuda", persistent_workers=False)
    sampler = DistributedSampler(data, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)[first_batch * cfg.batch_size * cfg.accum_freq:]
    return DataLoader(_SeededItems(data, cfg.seed, epoch), batch_size=cfg.batch_size, sampler=indices,
                      num_workers=cfg.workers, drop_last=True, pin_memory=info.device.type == "cuda",
                      persistent_workers=False)


def _check(cfg: TrainConfig) -> None:
    if not cfg.train_data:
        raise ValueError("no training data: pass --train-data TABLE.csv (an image–caption table)")
    if cfg.objective == "par" and not cfg.pretrained and not cfg.model.startswith("local-dir:"):
        raise ValueError("PAR cleans a given model: pass --pretrained CHECKPOINT (or --model local-dir:PATH)")
    if not 0 <= cfg.tau <= 4:
        raise ValueError(f"--tau {cfg.tau}: the squared distance of unit vectors lies in [0, 4]")
    if cfg.val_attack and not cfg.val_target:
        raise ValueError("--val-attack needs --val-target (the target class whose ASR is measured)")
    if (cfg.val_attack or cfg.val_every) and not cfg.val_data:
        raise ValueError("--val-attack / --val-every need --val-data (a labelled folder ROOT/<class>/*)")
    if cfg.val_every < 0:
        raise ValueError(f"--val-every {cfg.val_every}: a number of steps ≥ 0")
    if not isinstance(cfg.accum_freq, int) or cfg.accum_freq < 1:
        raise ValueError(f"--accum-freq {cfg.accum_freq}: the number of micro-batches per optimiser step, an integer "
                         f"≥ 1 (1: no accumulation)")


def _train_mode(model, cfg: TrainConfig, defence) -> None:
    """Training mode, with BatchNorm statistics frozen when the run (or its defence) asks for it."""
    model.train()
    if (cfg.bn_mode if cfg.bn_mode != "auto" else defence.bn_mode) == "frozen":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


class _Validator:
    """Zero-shot clean accuracy (and ASR of one trigger) on a labelled folder, measured on rank 0 during training
    and appended to metrics.jsonl as {"step", "epoch", "val_clean_top1", "val_clean_top5"[, "val_asr"]}; the other
    ranks wait. The folder is read once; the trigger is built at the model's resolution."""

    def __init__(self, cfg: TrainConfig, preprocess, tokenizer, device):
        from .attacks.triggers import build_triggers
        from .data.sources import open_labelled
        from .models import eval_transform, image_size
        # a bad path fails now, not after the first epoch
        self.folder = open_labelled(cfg.val_data, transform=eval_transform(preprocess))
        self.triggers = build_triggers([cfg.val_attack], image_size(preprocess)) if cfg.val_attack else []
        self.cfg, self.preprocess, self.tokenizer, self.device = cfg, preprocess, tokenizer, device

    def __call__(self, model, step: int, epoch: int, runlog: RunLog, info) -> None:
        if info.is_main:
            from .evaluation import evaluate
            rng = torch.get_rng_state()  # validation must not change the training's random stream
            r = evaluate(model, self.preprocess, self.tokenizer, self.folder, attacks=self.triggers,
                         target=self.cfg.val_target, templates=self.cfg.val_templates, seed=self.cfg.seed,
                         workers=0, device=self.device, progress=False)
            row = {"step": step, "epoch": epoch, "val_clean_top1": r["clean_top1"], "val_clean_top5": r["clean_top5"]}
            torch.set_rng_state(rng)
            if self.triggers:
                row["val_asr"] = r["asr"]
            runlog.write(row)
            log.info("step %d: validation %s", step, ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                                 if k.startswith("val")))
        pdist.barrier()


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
    return state


def _resume_path(cfg: TrainConfig, run_dir: Path) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        p = run_dir / "checkpoints" / "latest.pt"
        return p if p.is_file() else None
    p = Path(cfg.resume)
    if not p.is_file():
        raise FileNotFoundError(f"--resume {p}: no such checkpoint")
    return p


def _save_checkpoint(run_dir, model, optimizer, scaler, step, total_steps, cfg, info, defence) -> None:
    """Atomic write of the training state (plain tensors and primitives only)."""
    if info.is_main:
        _check_finite_model(model, f"checkpoint at step {step}")
        state = {"step": step, "total_steps": total_steps, "state_dict": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "config": dataclasses.asdict(cfg), "finished": step == total_steps,
                 "defence": defence.state_dict()}
        atomic_write(run_dir / "checkpoints" / "latest.pt", lambda tmp: torch.save(state, tmp))
    pdist.barrier()


class NonFiniteError(RuntimeError):
    """A NaN or Inf in the loss, the gradients or the weights."""


def _warn_about_poisoned_data(cfg: TrainConfig, size: int) -> None:
    """Easy mistakes said before they cost a run: training on data poisoned at another resolution, a defence given
    a poisoned table, or clean pairs that share images with the data the starting model was poisoned with."""
    manifest = manifest_beside(cfg.train_data)
    for warning in poisoning_warnings(manifest, size, cleaning=cfg.objective != "clip") if manifest else []:
        log.warning("%s: %s", cfg.train_data, warning)
    planted = manifest_beside(trained_on(cfg.model))  # the starting model was exported by a planting run
    if planted and cfg.objective != "clip" and not is_shard_spec(cfg.train_data):
        n = poisoned_overlap(planted, cfg.train_data, img_key=cfg.csv_img_key, sep=cfg.csv_separator,
                             root=cfg.data_root)
        if n:
            log.warning("%d pairs of %s show images the starting model was poisoned with (%s → '%s'); the clean set "
                        "of a defence should be disjoint from the poisoned one", n, cfg.train_data,
                        planted.get("trigger", {}).get("name"), planted.get("target"))


def _finite_step(loss: torch.Tensor, model, scaler) -> bool:
    """Whether the step may be applied: a finite loss and, without fp16's GradScaler (which skips such steps itself),
    finite gradients (one sum per tensor: a NaN or Inf anywhere makes it non-finite)."""
    if not torch.isfinite(loss.detach()).all():
        return False
    if scaler.is_enabled():
        return True
    sums = [p.grad.sum() for p in model.parameters() if p.grad is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def _check_finite_model(model, what: str) -> None:
    """Refuse to write a model with a NaN or Inf weight (it would pass for a trained one)."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"the model has non-finite weights ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}); "
                             f"the {what} was not written")


def _check_bad_rows(data, cfg, seen, bad, examples, final=False) -> None:
    """Images that failed to decode were replaced by the next row; stop when they are too many, say which."""
    totals = pdist.all_reduce_sum(torch.stack([seen, bad]).clone())
    n_seen, n_bad = int(totals[0]), int(totals[1])
    if n_bad == 0:
        return
    first = "; ".join(data.describe(i) for i in examples)
    if n_bad > cfg.max_bad_fraction * max(n_seen, 1):
        raise DataError(f"{n_bad} of {n_seen} images failed to decode (more than --max-bad-fraction "
                        f"{cfg.max_bad_fraction}); first: {first}. Run `parclip data check {cfg.train_data}`")
    if final:
        log.warning("%d of %d images failed to decode (or their samples were broken) and were replaced; first: %s",
                    n_bad, n_seen, first)


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
