"""`roclip`: RoCLIP (Yang, Gao, Mirzasoleiman, NeurIPS 2023, arXiv 2303.06854), a defence for pre-training from
scratch, adapted to fine-tuning (docs/reference_differences.md#roclip-fine-tuning).

Every K-th epoch (epochs counted from 1: with K = 2, epochs 2, 4, 6, …) each image is matched with the caption nearest
to it in a FIFO pool of earlier caption embeddings instead of its own caption, so a poisoned image–caption link is
never reinforced; the batch's captions then enter the pool. Other epochs use the plain CLIP loss.

    RoCLIP epochs:  L = ½ [ CE(s·F Ĝᵀ, I) + CE(s·Ĝ Fᵀ, I) ],   Ĝ_i = argmax_{p ∈ pool} ⟨f_i, p⟩  (no gradient)
    other epochs:   L = L_CLIP(F, G)

With the cross-augmentation (on by default, as in the reference) every image goes through RoCLIP's random crop, flip,
color jitter, grayscale and blur, and every caption is replaced by its EDA twin (computed once per data set).

Pool: `roclip_pool_size` rows (the reference's 21 845), initialised with seeded random unit vectors as the reference
does, or, with `roclip_prefill`, also filled with the captions of the non-RoCLIP epochs so that the first RoCLIP epoch
looks up real captions. Writing wraps around the end as the reference's queue does: a batch that does not fit before
the end is cut there and the pointer restarts at 0. The pool sees the *global* batch on every process, so it is the
same whatever the number of processes. `roclip_bidirectional` adds the arXiv v1 variant: an image pool too, and each
caption matched with its nearest pooled image, L = ½ [L_CLIP(F, Ĝ) + L_CLIP(F̂, G)].

Defaults: that fine-tuning adaptation, CleanCLIP's cleaning recipe (batch 64, lr 1e-5, 10 epochs, 50 warm-up steps,
cosine, weight decay 0.1), K = 2, pool 21 845.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..objectives import clip_loss, roclip_loss
from ..utils.checks import check_int
from .base import Defence, register
from .clip import CLEANCLIP_RECIPE

log = logging.getLogger("parclip")


class FifoPool:
    """A first-in-first-out pool of L2-normalised embeddings, [size, dim], filled by `push` and searched by `nearest`.

    Starts as seeded random unit vectors. `push(x)` writes x's rows from the pointer on; rows that would pass the end
    are dropped and the pointer restarts at 0 (the reference queue's wrap-around)."""

    def __init__(self, size: int, dim: int, *, seed: int = 0, device="cpu"):
        check_int("pool size", size, 1)
        g = torch.Generator().manual_seed(seed)
        self.bank = F.normalize(torch.randn(size, dim, generator=g), dim=-1).to(device)
        self.ptr = 0
        self.filled = 0  # rows written so far (capped at size): how much of the pool is real

    def push(self, x: torch.Tensor) -> None:
        x = x.detach().to(self.bank.device, self.bank.dtype)
        n = min(x.shape[0], self.bank.shape[0] - self.ptr)
        self.bank[self.ptr:self.ptr + n] = x[:n]
        self.ptr = (self.ptr + n) % self.bank.shape[0]
        self.filled = min(self.bank.shape[0], self.filled + n)

    @torch.no_grad()
    def nearest(self, q: torch.Tensor) -> torch.Tensor:
        """For each row of q, the pool row of largest cosine similarity (ties: the lowest index)."""
        idx = (q.detach().float() @ self.bank.float().t()).argmax(dim=1)
        return self.bank[idx].to(q.dtype)

    def state_dict(self) -> dict:
        return {"bank": self.bank.clone(), "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["bank"].shape) != tuple(self.bank.shape):
            raise ValueError(f"the checkpoint's RoCLIP pool is {tuple(state['bank'].shape)}, this run's "
                             f"{tuple(self.bank.shape)}: use the same --roclip-pool-size or a new --name")
        self.bank = state["bank"].to(self.bank.device)
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])


@register
class RoCLIP(Defence):
    name = "roclip"
    description = "every K-th epoch, each image is matched with its nearest caption from a pool, not its own"
    paper = "Yang, Gao, Mirzasoleiman: RoCLIP (NeurIPS 2023, arXiv 2303.06854), fine-tuning adaptation"
    defaults = CLEANCLIP_RECIPE
    augment = "roclip"  # its cross-augmentation; "none" with --no-roclip-cross-aug

    stateful = True  # the pool moves with every loss call

    def __init__(self, cfg):
        super().__init__(cfg)
        check_int("roclip_every", cfg.roclip_every, 1)
        check_int("roclip_pool_size", cfg.roclip_pool_size, 1)
        if not cfg.roclip_cross_aug:
            self.augment = "none"
        self.text_pool = self.image_pool = None
        self._pending: dict = {}  # pool state from a checkpoint, loaded once the first batch builds the pools

    def check_data_size(self, n_samples: int) -> None:
        if self.cfg.roclip_pool_size > n_samples:
            log.warning("RoCLIP pool (%d) is larger than the data (%d pairs): it holds repeats, and random vectors "
                        "until it has been filled once (--roclip-prefill fills it before the first RoCLIP epoch)",
                        self.cfg.roclip_pool_size, n_samples)

    def prepare_captions(self, captions, keys=None):
        if not self.cfg.roclip_cross_aug:
            return captions, []
        from .eda import eda_captions

        return eda_captions(captions, seed=self.cfg.seed, keys=keys), []  # the EDA twin replaces the caption

    def is_roclip_epoch(self, epoch: int) -> bool:
        """Epochs counted from 1, as the reference does: with K = 2, the 2nd, 4th, … (0-based epoch 1, 3, …)."""
        return (epoch + 1) % self.cfg.roclip_every == 0

    def _pools(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        if self.text_pool is None:
            kw = dict(seed=self.cfg.seed, device=txt.device)
            self.text_pool = FifoPool(self.cfg.roclip_pool_size, txt.shape[1], **kw)
            if self.cfg.roclip_bidirectional:
                self.image_pool = FifoPool(self.cfg.roclip_pool_size, img.shape[1], seed=self.cfg.seed + 1,
                                           device=img.device)
            if self._pending:
                self.load_state_dict(self._pending)

    def loss(self, batch, logit_scale, *, epoch):
        img, txt = batch.img[0], batch.txt[0]
        self._pools(img, txt)
        if not self.is_roclip_epoch(epoch):
            if self.cfg.roclip_prefill:
                self._push(img, txt)
            return clip_loss(img, txt, logit_scale), {"roclip_epoch": 0}
        nn_txt = self.text_pool.nearest(img)          # looked up before the batch's own captions enter the pool
        nn_img = self.image_pool.nearest(txt) if self.image_pool is not None else None
        self._push(img, txt)
        loss = roclip_loss(img, nn_txt, logit_scale, txt=txt, nn_img=nn_img)
        if nn_img is None:
            loss = loss + 0.0 * txt.sum()  # the text tower takes part in the graph (DDP) but gets no gradient
        return loss, {"roclip_epoch": 1}

    def _push(self, img, txt):
        self.text_pool.push(txt)
        if self.image_pool is not None:
            self.image_pool.push(img)

    def state_dict(self) -> dict:
        if self.text_pool is None:
            return dict(self._pending)
        state = {"text_pool": self.text_pool.state_dict()}
        if self.image_pool is not None:
            state["image_pool"] = self.image_pool.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.text_pool is None:  # the pools are built at the first batch (they need the embedding size)
            self._pending = dict(state)
            return
        if "text_pool" in state:
            self.text_pool.load_state_dict(state["text_pool"])
        if "image_pool" in state and self.image_pool is not None:
            self.image_pool.load_state_dict(state["image_pool"])
        self._pending = {}
