"""Pictures of what a backdoor does to the embedding space, and of the clean-accuracy / ASR trade-off.

* :func:`embedding_map`: a 2-D t-SNE (scikit-learn) of clean and triggered image embeddings of one model on a
  labelled folder. Clean images are coloured by class; triggered images are black crosses. A backdoored model pulls
  the crosses into one cluster beside the target class, and a cleaned one scatters them back among their classes, as
  the reference's t-SNE scripts show. :func:`plot_embeddings` draws one panel per model (e.g. before and after
  cleaning), on the same images.
* :func:`plot_tradeoff`: clean accuracy against ASR, one point per (result file, attack), from `parclip eval` results.

Images are drawn per class, `per_class` of each, with a seeded generator, so two models see the same images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from parclip.attacks.triggers import Trigger
from parclip.data import DataError, LabelledFolder
from parclip.models import eval_transform, image_size
from parclip.utils.files import save_figure

from .encode import Tolerant, encode_images, usable
from .zero_shot import TriggeredImages

__all__ = ["sample_per_class", "image_embeddings", "tsne_2d", "embedding_map", "plot_embeddings", "plot_tradeoff",
           "save_map"]


def sample_per_class(labels: list[int], per_class: int, seed: int = 0) -> list[int]:
    """Indices of up to `per_class` images of each class, drawn with a seeded generator, in ascending order."""
    g = torch.Generator().manual_seed(seed)
    labels_t = torch.tensor(labels)
    out: list[int] = []
    for c in sorted(set(labels)):
        idx = (labels_t == c).nonzero().flatten()
        out += idx[torch.randperm(len(idx), generator=g)[:per_class]].tolist()
    return sorted(out)


def image_embeddings(model, preprocess_cfg: dict, folder: LabelledFolder, indices: list[int],
                     trigger: Trigger | None = None, seed: int = 0, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised image embeddings [len(indices), d], triggered (seeded per image, as in evaluation) or not.
    A bad image is a DataError naming it: a map silently missing points would mislead."""
    model.eval()
    images = Subset(TriggeredImages(folder, trigger, eval_transform(preprocess_cfg), seed=seed), indices)
    feats, errors = encode_images(model, Tolerant(images, image_size(preprocess_cfg)), batch_size=batch_size,
                                  workers=0, device=next(model.parameters()).device, desc="embeddings",
                                  progress=False)
    usable(errors, [str(folder.samples[i][0]) for i in indices], str(folder.root), 0.0)
    return feats


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE of the rows of x to 2-D (cosine metric, PCA initialisation, perplexity min(30, (n - 1) / 3))."""
    from sklearn.manifold import TSNE
    n = x.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {n}")
    return TSNE(2, perplexity=min(30.0, (n - 1) / 3), metric="cosine", init="pca", random_state=seed).fit_transform(x)


def embedding_map(model, preprocess_cfg, folder: LabelledFolder, trigger: Trigger, *, per_class: int = 30,
                  seed: int = 0) -> dict:
    """{"xy_clean", "xy_triggered", "labels", "indices"}: one joint t-SNE of the clean and triggered embeddings."""
    indices = sample_per_class(folder.targets, per_class, seed)
    clean = image_embeddings(model, preprocess_cfg, folder, indices, seed=seed)
    triggered = image_embeddings(model, preprocess_cfg, folder, indices, trigger, seed=seed)
    xy = tsne_2d(torch.cat([clean, triggered]).numpy(), seed)
    return {"xy_clean": xy[:len(indices)], "xy_triggered": xy[len(indices):],
            "labels": np.array([folder.targets[i] for i in indices]), "indices": indices}


def plot_embeddings(path, maps: dict[str, dict], classnames: list[str], target: str | None = None) -> Path:
    """One panel per model: clean points coloured by class (the target class outlined in black), triggered points
    as black crosses."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(maps), figsize=(5.5 * len(maps), 5), squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("tab20" if len(classnames) > 10 else "tab10")
    t = [c.lower() for c in classnames].index(target.lower()) if target else None
    for ax, (label, m) in zip(axes[0], maps.items()):
        for c in sorted(set(m["labels"].tolist())):
            pts = m["xy_clean"][m["labels"] == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=14, color=cmap(c % cmap.N), label=classnames[c],
                       edgecolors="black" if c == t else "none", linewidths=0.8)
        ax.scatter(m["xy_triggered"][:, 0], m["xy_triggered"][:, 1], s=18, marker="x", color="black",
                   linewidths=0.8, label="triggered")
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
                       title=f"target: {classnames[t]}" if t is not None else None)
    path = Path(path)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(path, results: list[str | Path]) -> Path:
    """Clean accuracy (y) against ASR (x), one point per (zero-shot result file, attack), labelled by model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import report_rows
    rows = [r for r in report_rows(results) if r["task"] == "zero-shot"]
    if not rows:
        raise DataError("no zero-shot result among the files (the trade-off plot uses clean top-1 and ASR)")
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    markers = "os^Dv<>pP*"
    attacks = sorted({a for r in rows for a in r["asr"]})
    for row in rows:
        for a, asr in row["asr"].items():
            ax.scatter(asr, row["clean"], marker=markers[attacks.index(a) % len(markers)], s=40)
            ax.annotate(f"{row['label']} · {a}", (asr, row["clean"]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
    ax.set_xlabel("ASR % (lower is better)")
    ax.set_ylabel("clean top-1 % (higher is better)")
    ax.grid(alpha=0.3)
    path = Path(path)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def save_map(path, maps: dict[str, dict]) -> None:
    """The coordinates as JSON beside the figure (to re-plot or measure)."""
    from parclip.utils.files import write_json
    write_json(path, {k: {"xy_clean": m["xy_clean"].tolist(), "xy_triggered": m["xy_triggered"].tolist(),
                          "labels": m["labels"].tolist(), "indices": m["indices"]} for k, m in maps.items()})

