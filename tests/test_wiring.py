"""Wiring checks: each test pins one piece of the training loop, objectives or schedules that a one-line slip would
silently change (θ0 frozen and distinct, the scheduled lr reaching the optimizer, the cosine warm-up, PAR's frozen
logit scale, the PAR weight, safe resume, the bad-image limit). Micro models, a handful of images, 1-6 steps."""
import copy
import csv
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from parclip.config import make_config
from parclip.data import DataError
from parclip.defences.schedule import cosine_lr, lr_at
from parclip.models import create_model, eval_transform, get_tokenizer
from parclip.models.checkpoints import CheckpointError
from parclip.objectives import clip_loss, par_loss
from parclip.train import train


def weights(run: Path) -> dict:
    return load_file(run / "model" / "open_clip_model.safetensors")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def first_rows(table, n, preprocess, tokenizer):
    """The first n rows of a caption table as (images, tokens), read here with PIL and the model's eval transform."""
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    tf = eval_transform(preprocess)
    images = torch.stack([tf(Image.open(Path(table).parent / r["image"]).convert("RGB")) for r in rows])
    return images, tokenizer([r["caption"] for r in rows])


def hand_steps(model_dir, images, texts, lrs, *, objective, eps, tau=4.0, weight=0.5):
    """The weights after one AdamW step per entry of `lrs` on the same batch, computed directly from the objectives:
    PAR against a separate frozen copy θ0 of the starting model, the logit scale frozen, no weight decay."""
    model, _ = create_model(f"local-dir:{model_dir}")
    frozen = copy.deepcopy(model).requires_grad_(False)
    model.logit_scale.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lrs[0], betas=(0.9, 0.98),
                            eps=eps, weight_decay=0.0)
    model.train()
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        img, txt, scale = model(images, texts)
        if objective == "par":
            with torch.no_grad():
                img0, txt0, _ = frozen(images, texts)
            loss = par_loss(img, txt, img0, txt0, scale.detach(), tau=tau, weight=weight).total
        else:
            loss = clip_loss(img, txt, scale.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_par_steps_equal_a_hand_computation_against_a_frozen_copy(tmp_path, fmnist_small, micro_model_dir):
    """Catches θ0 aliasing the live model (PAR = plain fine-tuning), a learned logit scale in PAR, the lr schedule
    or --par-weight not reaching the update: two real steps must equal two steps computed here from par_loss."""
    table = str(fmnist_small["train_csv"])
    # One 8-image batch per epoch, two epochs: step 1 moves θ away from θ0, so step 2's perturbation term is non-zero.
    # With a huge ε, AdamW's update is lr·m̂/ε (SGD with momentum, step lr/ε): no sign-like amplification of
    # near-zero gradients, so two correct computations agree to float precision.
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=table, train_num_samples=8, batch_size=8,
                  epochs=2, augment="none", schedule="reference", lr_start=100.0, lr=50.0,
                  eps=1e4, lr_end=0.0, warmup=0.5, wd=0.0, workers=0, output_dir=str(tmp_path), progress=False,
                  log_every=1)
    par_run = train(make_config(objective="par", tau=4.0, par_weight=1.5, name="par", **common))
    ft_run = train(make_config(objective="clip", logit_scale="frozen", name="ft", **common))

    lrs = [lr_at(s, schedule="reference", steps_per_epoch=1, epochs=2, lr=50.0, lr_start=100.0, lr_end=0.0,
                 warmup=0.5) for s in range(2)]
    assert lrs == [100.0, 50.0]  # the schedule matters for this check
    model, pp = create_model(f"local-dir:{micro_model_dir}")
    images, texts = first_rows(table, 8, pp, get_tokenizer(f"local-dir:{micro_model_dir}"))
    by_hand_par = hand_steps(micro_model_dir, images, texts, lrs, objective="par", eps=1e4, tau=4.0, weight=1.5)
    by_hand_ft = hand_steps(micro_model_dir, images, texts, lrs, objective="clip", eps=1e4)

    par, ft = weights(par_run), weights(ft_run)
    gap = max_diff(by_hand_par, by_hand_ft)  # how far PAR's two steps land from plain fine-tuning's
    assert gap > 1e-4
    assert max_diff(par, by_hand_par) < 1e-2 * gap
    assert max_diff(ft, by_hand_ft) < 1e-2 * gap
    assert max_diff(par, ft) > 0.5 * gap  # the PAR run is not a plain fine-tuning run
    # PAR keeps the starting model's logit scale
    assert torch.equal(par["logit_scale"], model.logit_scale.detach())
    # step 2 measured a real distance to θ0 (zero if θ0 were the live model)
    assert [m["step"] for m in metrics(par_run)] == [1, 2] and metrics(par_run)[1]["dist_img"] > 1e-3


def test_logit_scale_is_frozen_by_par_and_learned_by_clip(tmp_path, fmnist_small, micro_model_dir):
    """Catches PAR learning the logit scale (its default is frozen, as the reference) or CLIP no longer learning it."""
    start = create_model(f"local-dir:{micro_model_dir}")[0].logit_scale.detach()
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]),
                  train_num_samples=8, batch_size=8, epochs=1, lr=1e-2, lr_start=1e-2, warmup=0.0, workers=0,
                  output_dir=str(tmp_path), progress=False, log_every=1)
    par = train(make_config(objective="par", name="par", **common))
    clip = train(make_config(objective="clip", name="clip", **common))
    assert torch.equal(weights(par)["logit_scale"], start)
    assert (weights(clip)["logit_scale"] - start).abs().item() > 1e-3


def test_optimizer_uses_the_scheduled_lr_at_every_step(tmp_path, fmnist_small, micro_model_dir, monkeypatch):
    """Catches a loop that logs the schedule but steps with another lr (e.g. the peak rate throughout)."""
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    # 2 steps per epoch × 3 epochs, cosine with half of training as warm-up: 3 rising steps, then the decay
    cfg = make_config(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]),
                      objective="clip", train_num_samples=8, batch_size=4, epochs=3, schedule="cosine", lr=1e-3,
                      lr_end=0.0, warmup=0.5, workers=0, output_dir=str(tmp_path), progress=False, log_every=1,
                      name="lr")
    run = train(cfg)
    expected = [lr_at(s, schedule="cosine", steps_per_epoch=2, epochs=3, lr=1e-3, lr_start=cfg.lr_start, lr_end=0.0,
                      warmup=0.5) for s in range(6)]
    assert len(set(expected)) > 3
    assert seen == [[lr, lr] for lr in expected]  # both parameter groups, every step
    logged = metrics(run)
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    assert [m["lr"] for m in logged] == pytest.approx(expected, rel=1e-12)  # the line for step s logs step s-1's lr


def test_cosine_schedule_warms_up_linearly_from_zero():
    """Catches the cosine schedule (cosine_lr, or lr_at's dispatch to it) dropping its warm-up."""
    peak, total, warm = 0.4, 20, 5
    lrs = [cosine_lr(s, total_steps=total, lr_peak=peak, warmup_steps=warm) for s in range(total)]
    assert lrs[:warm] == pytest.approx([peak * (s + 1) / warm for s in range(warm)], rel=1e-12)
    assert lrs[warm:] == pytest.approx([0.5 * peak * (1 + math.cos(math.pi * k / (total - warm)))
                                        for k in range(total - warm)], rel=1e-12)
    # lr_at's cosine: warm-up = int(warmup fraction × all steps) = 5 of 2 epochs × 10 steps
    via = [lr_at(s, schedule="cosine", steps_per_epoch=10, epochs=2, lr=peak, lr_start=1.0, lr_end=0.0, warmup=0.25)
           for s in range(total)]
    assert via == pytest.approx(lrs, rel=1e-12)


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_par_loss_weight_scales_the_perturbation_term(weight):
    """Catches par_loss ignoring `weight`: L = L_CLIP − w·(D_img + D_txt) below τ, written out here."""
    img0, txt0, img, txt = unit(8, 16, 0), unit(8, 16, 1), unit(8, 16, 2), unit(8, 16, 3)
    d_img = ((img - img0) ** 2).sum(dim=1).mean()
    d_txt = ((txt - txt0) ** 2).sum(dim=1).mean()
    logits = 10.0 * img @ txt.t()
    labels = torch.arange(8)
    lc = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    out = par_loss(img, txt, img0, txt0, 10.0, tau=4.0, weight=weight)
    assert out.perturb.item() == pytest.approx(weight * (d_img + d_txt).item(), rel=1e-5, abs=1e-7)
    assert out.total.item() == pytest.approx((lc - weight * (d_img + d_txt)).item(), rel=1e-5)
    assert out.clip.item() == pytest.approx(lc.item(), rel=1e-5)


_UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class Payload:
    """An arbitrary pickled object: unpickling it calls _record_unpickling (a stand-in for an attacker's code)."""

    def __reduce__(self):
        return (_record_unpickling, ("payload ran",))


def test_resume_refuses_a_checkpoint_with_arbitrary_pickled_objects(tmp_path, fmnist_small, micro_model_dir):
    """Catches the resume path loading checkpoints with weights_only=False (which would run pickled code)."""
    cfg = make_config(model=f"local-dir:{micro_model_dir}", train_data=str(fmnist_small["train_csv"]),
                      objective="par", train_num_samples=8, batch_size=8, epochs=1, workers=0,
                      output_dir=str(tmp_path), progress=False, name="run")
    run = train(cfg)
    ckpt = run / "checkpoints" / "latest.pt"
    state = torch.load(ckpt, weights_only=True)
    state["note"] = Payload()
    torch.save(state, ckpt)
    _UNPICKLED.clear()
    with pytest.raises(CheckpointError, match="refused, never run") as ei:
        train(cfg)  # same name: resumes from latest.pt
    assert isinstance(ei.value.__cause__, pickle.UnpicklingError)
    assert _UNPICKLED == []


def test_bad_image_limit_is_exact(tmp_path, fmnist_small, micro_model_dir):
    """Catches a loosened (or tightened) --max-bad-fraction check: 1 undecodable image of 32 seen stops a run whose
    limit is below 1/32 and passes one whose limit is exactly 1/32."""
    lines = Path(fmnist_small["train_csv"]).read_text().splitlines()[:33]
    root = Path(fmnist_small["train_csv"]).parent
    bad = tmp_path / "bad.png"
    bad.write_bytes((root / lines[1].split(",")[0]).read_bytes()[:40])  # truncated PNG: exists, fails to decode
    rows = [lines[0]] + [f"{root / l.split(',')[0]},{l.split(',', 1)[1]}" for l in lines[1:]]
    rows[1] = f"{bad},{lines[1].split(',', 1)[1]}"
    table = tmp_path / "t.csv"
    table.write_text("\n".join(rows) + "\n")
    # one step over all 32 rows, so the check sees exactly 1 bad of 32
    common = dict(model=f"local-dir:{micro_model_dir}", train_data=str(table), objective="clip", epochs=1,
                  batch_size=32, workers=0, output_dir=str(tmp_path), progress=False, log_every=100)
    with pytest.raises(DataError, match="bad.png"):
        train(make_config(name="below", max_bad_fraction=0.9 / 32, **common))
    run = train(make_config(name="at", max_bad_fraction=1 / 32, **common))
    assert (run / "model" / "open_clip_model.safetensors").is_file()
