"""``cvae``: a small convolutional conditional VAE (class embedding into encoder and decoder), trained in minutes on
a CPU.

Encoder q(z | x, c): two stride-2 convolutions (S → S/2 → S/4), then with the class embedding e_c a linear layer
to (μ, log σ²) of a latent z ∈ R^L. Decoder p(x | z, c): [z, e_c] → linear → two stride-2 transposed convolutions →
sigmoid pixel probabilities. Training minimises the negative ELBO per image,

    L(x, c) = BCE(x̂(z, c), x) + β · KL(N(μ, σ²) ‖ N(0, I)),   z = μ + σ ⊙ ε,  KL = ½ Σ (μ² + σ² − log σ² − 1),

BCE summed over pixels (x in [0, 1]). A sample of class c is the decoder's mean image x̂(t · z, c), z ~ N(0, I_L),
``t`` the sampling temperature. Use :func:`train_cvae`; load a stored one with ``load_generator("cvae:FOLDER")``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import register_generator
from .classcond import TrainedClassGenerator

__all__ = ["CVAE", "CVAEGenerator", "train_cvae", "vae_loss"]

logger = logging.getLogger("parclip")


class CVAE(nn.Module):
    """The network (module docstring); ``width`` channels after the first convolution, 2·width after the second."""

    def __init__(self, n_classes: int, image_size: int = 28, latent: int = 16, width: int = 32, embed: int = 16):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"cvae: image_size {image_size} must be a multiple of 4")
        self.s4, self.w2 = image_size // 4, 2 * width
        flat = self.w2 * self.s4 * self.s4
        self.embed = nn.Embedding(n_classes, embed)
        self.enc = nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, self.w2, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten())
        self.enc_fc = nn.Sequential(nn.Linear(flat + embed, 256), nn.LeakyReLU(0.2), nn.Linear(256, 2 * latent))
        self.dec_fc = nn.Sequential(nn.Linear(latent + embed, 256), nn.LeakyReLU(0.2), nn.Linear(256, flat),
                                    nn.LeakyReLU(0.2))
        self.dec = nn.Sequential(nn.ConvTranspose2d(self.w2, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.ConvTranspose2d(width, 1, 4, 2, 1))

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z | x, c); x [B, 1, S, S] in [0, 1], c [B] class indices."""
        mu, logvar = self.enc_fc(torch.cat([self.enc(x), self.embed(c)], dim=1)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Pixel logits [B, 1, S, S] of p(x | z, c)."""
        h = self.dec_fc(torch.cat([z, self.embed(c)], dim=1))
        return self.dec(h.view(-1, self.w2, self.s4, self.s4))


def vae_loss(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float = 1.0) -> torch.Tensor:
    """Mean over the batch of BCE(sigmoid(logits), x) summed over pixels + β · ½ Σ (μ² + σ² − log σ² − 1)."""
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    return (bce + beta * kl).mean()


def _arch(config: dict) -> dict:
    return dict(n_classes=len(config["classnames"]), image_size=int(config["image_size"]),
                latent=int(config["latent"]), width=int(config["width"]), embed=int(config["embed"]))


@register_generator
class CVAEGenerator(TrainedClassGenerator):
    """Samples the decoder's mean image of class c at latent t · z (module docstring)."""

    kind = "cvae"

    @classmethod
    def expected_tensors(cls, config: dict) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in CVAE(**_arch(config)).state_dict().items()}

    def _setup(self) -> None:
        self.net = CVAE(**_arch(self.config))
        self.net.load_state_dict(self.tensors, strict=True)
        self.net.eval()

    def _sample(self, label: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(1, int(self.config["latent"]), generator=generator) * float(self.config["temperature"])
        return torch.sigmoid(self.net.decode(z, torch.tensor([label])))[0, 0]


def train_cvae(images: np.ndarray, labels: np.ndarray, classnames: Sequence[str], *, seed: int = 0,
               epochs: int = 8, batch_size: int = 128, lr: float = 2e-3, latent: int = 16, width: int = 32,
               embed: int = 16, beta: float = 1.0, temperature: float = 1.0, max_seconds: float | None = None
               ) -> CVAEGenerator:
    """Train the CVAE on uint8 images [N, S, S] with labels (Adam, cosine-decayed lr, shuffling and noise from
    ``seed``); ``max_seconds`` stops early (recorded in the config). Reproducible on one machine for one seed."""
    n, size, _ = images.shape
    torch.manual_seed(seed)  # the initial weights
    net = CVAE(len(classnames), size, latent, width, embed)
    x_all = torch.from_numpy(images).float().div_(255).unsqueeze(1)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    g = torch.Generator().manual_seed(seed)
    steps = epochs * max(1, n // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0, step, stopped, loss = time.perf_counter(), 0, False, torch.tensor(float("nan"))
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = order[i:i + batch_size]
            x, c = x_all[idx], y_all[idx]
            mu, logvar = net.encode(x, c)
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g)
            loss = vae_loss(net.decode(z, c), x, mu, logvar, beta)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                stopped = True
                break
        logger.info("cvae epoch %d: loss %.2f (%.0f s)", epoch + 1, loss.item(), time.perf_counter() - t0)
        if stopped:
            break
    config = {"classnames": list(classnames), "image_size": size, "latent": latent, "width": width, "embed": embed,
              "beta": beta, "temperature": temperature, "epochs": epochs, "steps": step, "batch_size": batch_size,
              "lr": lr, "seed": seed, "n_train": int(n), "stopped_early": stopped, "final_loss": float(loss.item())}
    return CVAEGenerator({k: v.detach().clone() for k, v in net.state_dict().items()}, config)
