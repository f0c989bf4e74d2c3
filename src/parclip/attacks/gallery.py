"""The trigger catalogue for people: a text table of every registered trigger, and a PNG gallery showing each one on
sample photos.

    parclip triggers list                      name, aliases, kind, random?, parameters and defaults
    parclip triggers show --out gallery.png    every trigger on the bundled photos (or --images ...)

Gallery layout (one matplotlib figure, saved at a fixed size): columns are the clean image and then one column per
trigger; every photo gets

* a row of the images at the trigger resolution (squash-resized to ``size x size``, as the poisoning and evaluation
  pipeline does), with a box marking the zoomed region;
* a row of zooms: a ``size/zoom`` square crop around where the trigger changed the pixels most, enlarged ``zoom`` times
  with nearest-neighbour so single pixels stay visible (the clean column shows its centre crop);
* optionally a row of the change ``|triggered - clean|`` (max over RGB), stretched to each image's own maximum so that
  faint blends are visible; the caption gives the real size of the change in grey levels.

Random triggers are drawn with ``trigger_generator(seed, photo_index)``, so the gallery repeats exactly. ``--patch`` /
``--mask`` go to every trigger that takes a ``patch`` / ``mask`` parameter (``badclip``'s patch, ``water_patt``'s text
mask); the others use their defaults. A trigger that needs a patch and got none (``badclip``) is drawn with a
generated placeholder patch, labelled as such (it is **not** an optimised BadCLIP patch). A trigger that cannot be
built or fails when applied is skipped and reported (``GalleryResult.skipped``, and a note under the figure), never
fatal.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import open_rgb
from ..utils.checks import check_int
from ..utils.files import atomic_write
from .triggers import Trigger, list_triggers, squash_resize, trigger_class, trigger_generator

__all__ = ["ASSETS_DIR", "bundled_images", "trigger_rows", "format_trigger_table", "GalleryResult", "render_gallery",
           "change_box", "gallery_size"]

logger = logging.getLogger("parclip")

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
_COMMON_PARAMS = ("self", "image_size", "uint8_mode")


def bundled_images() -> list[Path]:
    """The free sample photos shipped in ``parclip/assets`` (see ``assets/LICENSES.md``), sorted by name."""
    return sorted(p for p in ASSETS_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


# ----------------------------------------------------------------------------------------------------------------------
# listing
# ----------------------------------------------------------------------------------------------------------------------

def _defaults(cls: type[Trigger]) -> dict:
    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in _COMMON_PARAMS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = None if p.default is inspect.Parameter.empty else p.default
    return out


def _default_build_error(cls: type[Trigger], size: int = 224) -> str | None:
    try:
        cls(image_size=size)
    except Exception as e:  # noqa: BLE001 - any failure means "needs parameters"
        return f"{type(e).__name__}: {e}"
    return None


def trigger_rows(classes: Sequence[type[Trigger]] | None = None) -> list[dict]:
    """One dict per registered trigger: name, aliases, kind, random, description, params (name -> default) and
    ``needs`` (None, or why it cannot be built with its defaults at 224 px, e.g. a required patch file)."""
    rows = []
    for cls in (list_triggers() if classes is None else classes):
        rows.append({"name": cls.name, "aliases": list(cls.aliases), "kind": cls.kind, "random": cls.random,
                     "description": cls.description, "params": _defaults(cls),
                     "needs": _default_build_error(cls)})
    return rows


def _required(row: dict) -> set[str]:
    """Parameters defaulting to None that the default-construction error asks for (``name=`` in its message)."""
    import re

    msg = row.get("needs") or ""
    return {k for k, v in row["params"].items() if v is None and re.search(rf"(?<![\w.]){re.escape(k)}=", msg)}


def _fmt_default(v) -> str:
    if v is None:
        return "auto"
    if isinstance(v, float):
        return f"{v:g}"
    return repr(v) if isinstance(v, str) else str(v)


def format_trigger_table(rows: list[dict] | None = None, *, as_json: bool = False) -> str:
    """The ``parclip triggers list`` text: an aligned table, then one description line per trigger, then the
    triggers that need parameters. ``as_json``: the rows as JSON instead."""
    rows = trigger_rows() if rows is None else rows
    if as_json:
        return json.dumps(rows, indent=2, default=str)
    header = ("name", "aliases", "kind", "random", "parameters (defaults)")
    table = [header]
    for r in rows:
        req = _required(r)
        params = ", ".join(f"{k}=<required>" if k in req else f"{k}={_fmt_default(v)}"
                           for k, v in r["params"].items()) or "-"
        table.append((r["name"], ", ".join(r["aliases"]) or "-", r["kind"], "yes" if r["random"] else "no", params))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = []
    for k, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
        if k == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    lines.append("")
    lines.append("every trigger also takes image_size (default 224: the model resolution) and uint8_mode "
                 "(wrap | clamp, default wrap); 'auto' = chosen from image_size")
    lines.append("")
    w = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        lines.append(f"{r['name'].ljust(w)}  {r['description']}")
    needs = [r for r in rows if r["needs"]]
    if needs:
        lines.append("")
        lines.append("cannot be built with defaults alone:")
        for r in needs:
            msg = r["needs"].split(": ", 1)[-1]
            lines.append(f"  {r['name']}: {msg[:160] + ('...' if len(msg) > 160 else '')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# the gallery
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class GalleryResult:
    """What :func:`render_gallery` drew.

    ``attacks``: canonical names of the rendered triggers, in column order (column 0 is the clean image);
    ``labels``: their column titles; ``placeholders``: triggers drawn with a generated placeholder patch;
    ``skipped``: trigger name -> reason; ``images``: the photos (file names), one block of rows each;
    ``size``: the PNG's (width, height) in pixels; ``rows_per_image``: 2 (image, zoom) or 3 (with the change map).
    """

    path: Path
    attacks: list[str]
    labels: list[str]
    placeholders: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)
    rows_per_image: int = 2


def change_box(clean: np.ndarray, triggered: np.ndarray, side: int) -> tuple[int, int, float]:
    """``(top, left, score)`` of a ``side x side`` window showing where the trigger changed the image most.

    The window with the largest total change ``|triggered - clean|`` (summed over RGB; ``score`` = its mean) is
    found first, then re-centred on the centre of mass of the change inside it (clamped to the image), so that a small
    patch appears in the middle of the zoom rather than in a corner. The centre window and score 0 when nothing
    changed. Arrays are uint8 ``[H, W, 3]``.
    """
    H, W = clean.shape[:2]
    side = min(side, H, W)
    d = np.abs(triggered.astype(np.int32) - clean.astype(np.int32)).sum(-1).astype(np.float64)
    if d.max() == 0:
        return (H - side) // 2, (W - side) // 2, 0.0
    sums = F.avg_pool2d(torch.from_numpy(d)[None, None], side, stride=1)[0, 0]   # [H-side+1, W-side+1]
    k = int(torch.argmax(sums))
    top, left = k // sums.shape[1], k % sums.shape[1]
    win = d[top:top + side, left:left + side]
    rows, cols = np.indices(win.shape)
    cy, cx = (rows * win).sum() / win.sum() + top, (cols * win).sum() / win.sum() + left
    top = int(np.clip(round(cy - (side - 1) / 2), 0, H - side))
    left = int(np.clip(round(cx - (side - 1) / 2), 0, W - side))
    return top, left, float(sums.max())


def _build(cls: type[Trigger], size: int, patch, mask, seed: int) -> tuple[Trigger | None, str | None, str | None]:
    """(trigger, note, skip reason). The user's --patch/--mask go to every trigger that takes a ``patch``/``mask``
    parameter; otherwise defaults; a trigger that needs a patch and got none is drawn with a placeholder patch."""
    accepted = _defaults(cls)
    kwargs = {}
    if "patch" in accepted and patch is not None:
        kwargs["patch"] = os.fspath(patch)
    if "mask" in accepted and mask is not None:
        kwargs["mask"] = os.fspath(mask)
    if kwargs:
        try:
            return cls(image_size=size, **kwargs), None, None
        except Exception as e:  # noqa: BLE001
            return None, None, f"could not be built from {', '.join(f'{k}={v}' for k, v in kwargs.items())}: " \
                               f"{type(e).__name__}: {e}"
    try:
        return cls(image_size=size), None, None
    except Exception as e:  # noqa: BLE001
        first_error = f"{type(e).__name__}: {e}"
    if "patch" in accepted:
        from .triggers import scaled_size
        from .triggers.badclip import placeholder_patch

        ph = placeholder_patch(scaled_size(16, size), seed=seed)
        try:
            return cls(image_size=size, patch=ph), "placeholder patch", None
        except Exception:  # noqa: BLE001 - the trigger may take file paths only
            pass
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "placeholder.png"
            Image.fromarray(ph.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB").save(p)  # not-atomic: scratch file
            try:
                return cls(image_size=size, patch=str(p)), "placeholder patch", None
            except Exception:  # noqa: BLE001
                pass
    return None, None, f"needs parameters ({first_error}); pass --patch/--mask"


_MARGINS_IN = (0.55, 0.85, 0.35, 0.1)   # left, top (with title), bottom, right, in inches


def _figure_inches(n_triggers: int, n_images: int, *, show_diff: bool, cell_inches: float,
                   title: bool) -> tuple[float, float]:
    left, top, bottom, right = _MARGINS_IN
    top = top if title else bottom + 0.2
    rows = (3 if show_diff else 2) * n_images
    return left + right + (1 + n_triggers) * cell_inches, top + bottom + rows * (cell_inches + 0.3)


def gallery_size(n_triggers: int, n_images: int, *, show_diff: bool = True, cell_inches: float = 1.6, dpi: int = 100,
                 title: bool = True) -> tuple[int, int]:
    """The gallery PNG's (width, height) in pixels for ``n_triggers`` trigger columns and ``n_images`` photos."""
    w, h = _figure_inches(n_triggers, n_images, show_diff=show_diff, cell_inches=cell_inches, title=title)
    return int(round(w * dpi)), int(round(h * dpi))


def _resolve_attacks(attacks: Sequence[str] | None) -> list[type[Trigger]]:
    classes = {c.name: c for c in list_triggers()}
    if not attacks:
        return list(classes.values())
    out = []
    for a in attacks:
        cls = classes[trigger_class(a).name]  # unknown names raise ValueError listing the known ones
        if cls not in out:
            out.append(cls)
    return out


def render_gallery(images: Sequence[str | os.PathLike] | None = None, *, size: int = 224,
                   attacks: Sequence[str] | None = None, out: str | os.PathLike = "trigger_gallery.png",
                   seed: int = 0, patch: str | os.PathLike | None = None, mask: str | os.PathLike | None = None,
                   zoom: int = 4, show_diff: bool = True, cell_inches: float = 1.6, dpi: int = 100,
                   title: str | bool | None = None) -> GalleryResult:
    """Render every trigger (or ``attacks``) onto ``images`` (default: the bundled photos) into one PNG at ``out``.

    ``size``: trigger resolution S (the model's: 224, 336, ...). ``patch`` / ``mask``: files for the triggers that take
    them (``badclip`` without a patch: a labelled placeholder). ``zoom``: enlargement of the zoom row (crop side ``S // zoom``).
    ``show_diff``: add the change-map row. ``title``: figure title (None: a default one, False: none). The PNG is
    ``round(cell_inches * dpi)`` pixels per cell plus margins (:func:`gallery_size`); the exact pixel size is returned
    in ``GalleryResult.size``. Photos are squash-resized to ``size x size`` like the poisoning pipeline does.
    """
    out, paths = _gallery_inputs(images, size=size, zoom=zoom, out=out)
    photos = [squash_resize(open_rgb(p), size) for p in paths]
    columns, placeholders, skipped = _apply_triggers(_resolve_attacks(attacks), photos, size=size, patch=patch,
                                                     mask=mask, seed=seed)
    if title is not False:
        title = title or (f"parclip triggers at {size} px (seed {seed}): image, x{zoom} zoom of the boxed region"
                          + (", |change| stretched to its max" if show_diff else ""))
    fig, canvas, axes = _new_figure(len(columns), len(photos), show_diff=show_diff, cell_inches=cell_inches, dpi=dpi,
                                    title=title)
    crop = max(2, size // zoom)
    rpi = 3 if show_diff else 2
    for i, (p, ph) in enumerate(zip(paths, photos)):
        clean = np.asarray(ph)
        _draw_clean_cells(axes[i * rpi:(i + 1) * rpi, 0], p.stem, clean, size=size, crop=crop, zoom=zoom,
                          first=i == 0)
        for j, (_, label, outs) in enumerate(columns, start=1):
            _draw_triggered_cells(axes[i * rpi:(i + 1) * rpi, j], label if i == 0 else None, clean, outs[i],
                                  crop=crop, zoom=zoom)
    _add_note(fig, placeholders, skipped)
    png_size = _save_png(canvas, out)
    return GalleryResult(path=out, attacks=[n for n, _, _ in columns], labels=[lab for _, lab, _ in columns],
                         placeholders=placeholders, skipped=skipped, images=[p.name for p in paths],
                         size=png_size, rows_per_image=rpi)


_FONT_SIZE = 10


def _gallery_inputs(images: Sequence[str | os.PathLike] | None, *, size: int, zoom: int,
                    out: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The checked output path and the photo paths (the bundled photos when none are given)."""
    check_int("size", size, 8)
    check_int("zoom", zoom, 1, size)
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"the gallery is written as PNG: give a file name ending in .png, got {out.name!r}")
    paths = [Path(p) for p in images] if images else bundled_images()
    if not paths:
        raise ValueError("no images given and no bundled sample photos found")
    return out, paths


def _apply_triggers(classes: Sequence[type[Trigger]], photos: Sequence[Image.Image], *, size: int, patch, mask,
                    seed: int) -> tuple[list[tuple[str, str, list[np.ndarray]]], list[str], dict[str, str]]:
    """Build each trigger and apply it to every photo: ``(columns, placeholders, skipped)``, failures skipped."""
    columns: list[tuple[str, str, list[np.ndarray]]] = []   # (name, label, triggered photos)
    placeholders, skipped = [], {}
    for cls in classes:
        trig, note, reason = _build(cls, size, patch, mask, seed)
        if trig is None:
            skipped[cls.name] = reason
            logger.warning("gallery: skipping %s: %s", cls.name, reason)
            continue
        try:
            outs = [np.asarray(trig(ph, trigger_generator(seed, i))) for i, ph in enumerate(photos)]
        except Exception as e:  # noqa: BLE001
            skipped[cls.name] = f"failed when applied: {type(e).__name__}: {e}"
            logger.warning("gallery: skipping %s: %s", cls.name, skipped[cls.name])
            continue
        label = cls.name + (f"\n({note})" if note else "")
        if note:
            placeholders.append(cls.name)
        columns.append((cls.name, label, outs))
    return columns, placeholders, skipped


def _new_figure(n_triggers: int, n_images: int, *, show_diff: bool, cell_inches: float, dpi: int,
                title: str | bool):
    """The figure (with its title unless ``title`` is False), its canvas and the grid of bare axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    left_in, top_in, bottom_in, right_in = _MARGINS_IN
    top_in = top_in if title is not False else bottom_in + 0.2
    fig_w, fig_h = _figure_inches(n_triggers, n_images, show_diff=show_diff, cell_inches=cell_inches,
                                  title=title is not False)
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left_in / fig_w, right=1 - right_in / fig_w, top=1 - top_in / fig_h,
                        bottom=bottom_in / fig_h, wspace=0.06, hspace=0.3 / cell_inches)
    if title is not False:
        fig.suptitle(title, fontsize=14, y=1 - 0.2 / fig_h)
    axes = fig.subplots((3 if show_diff else 2) * n_images, 1 + n_triggers, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_linewidth(0.4)
    return fig, canvas, axes


def _enlarge(a: np.ndarray, zoom: int) -> np.ndarray:
    """``a`` enlarged ``zoom`` times with nearest-neighbour (every pixel a ``zoom x zoom`` block)."""
    return np.repeat(np.repeat(a, zoom, axis=0), zoom, axis=1)


def _draw_clean_cells(axes, stem: str, clean: np.ndarray, *, size: int, crop: int, zoom: int, first: bool) -> None:
    """One photo's clean column: the image, its centre crop zoomed, and the legend of the change row if there is one."""
    fs = _FONT_SIZE
    axes[0].set_ylabel(stem, fontsize=fs + 1)
    axes[1].set_ylabel(f"x{zoom} zoom", fontsize=fs)
    axes[0].imshow(clean, interpolation="nearest")
    t0 = (size - crop) // 2
    axes[1].imshow(_enlarge(clean[t0:t0 + crop, t0:t0 + crop], zoom), interpolation="nearest")
    axes[1].set_title("clean, centre", fontsize=fs - 2, pad=2)
    if first:
        axes[0].set_title("clean", fontsize=fs + 1, pad=3)
    if len(axes) > 2:
        axes[2].set_ylabel("|change|", fontsize=fs)
        axes[2].text(0.5, 0.5, "|triggered - clean|\nmax over RGB,\nstretched to\neach map's max",
                     ha="center", va="center", fontsize=fs - 1, transform=axes[2].transAxes)
        axes[2].set_axis_off()


def _draw_triggered_cells(axes, label: str | None, clean: np.ndarray, triggered: np.ndarray, *, crop: int,
                          zoom: int) -> None:
    """One photo under one trigger: the image with the zoom box, the zoom, and the change map if there is a row."""
    from matplotlib.patches import Rectangle

    fs = _FONT_SIZE
    top, left, score = change_box(clean, triggered, crop)
    axes[0].imshow(triggered, interpolation="nearest")
    axes[0].add_patch(Rectangle((left - 0.5, top - 0.5), crop, crop, fill=False, edgecolor="#ff2d2d", linewidth=1.0))
    if label is not None:
        axes[0].set_title(label, fontsize=fs + 1, pad=3)
    axes[1].imshow(_enlarge(triggered[top:top + crop, left:left + crop], zoom), interpolation="nearest")
    axes[1].set_title(f"[{top}:{top + crop}, {left}:{left + crop}]" if score else "no change", fontsize=fs - 2, pad=2)
    if len(axes) > 2:
        d = np.abs(triggered.astype(np.int16) - clean.astype(np.int16)).max(-1)
        m = int(d.max())
        axes[2].imshow(d, cmap="magma", vmin=0, vmax=max(m, 1), interpolation="nearest")
        changed = 100.0 * (d > 0).mean()
        axes[2].set_title(f"max {m}/255, {changed:.0f}% px", fontsize=fs - 2, pad=2)


def _add_note(fig, placeholders: list[str], skipped: dict[str, str]) -> None:
    """The line under the figure naming the placeholder patches and the skipped triggers (none when neither)."""
    note_parts = []
    if placeholders:
        note_parts.append(f"{', '.join(placeholders)}: generated placeholder patch, not an optimised patch "
                          f"(pass --patch PATH)")
    if skipped:
        note_parts.append("skipped: " + "; ".join(f"{k} ({v[:80]})" for k, v in skipped.items()))
    if note_parts:
        fig.text(0.01, 0.12 / fig.get_figheight(), " | ".join(note_parts), fontsize=_FONT_SIZE - 1, ha="left",
                 va="bottom")


def _save_png(canvas, out: Path) -> tuple[int, int]:
    """Draw the canvas and write it atomically to ``out`` as an RGB PNG; its (width, height) in pixels."""
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy(), "RGB")  # no alpha: ~10% smaller
    atomic_write(out, lambda tmp: rgb.save(tmp, "PNG", optimize=True))
    return rgb.size
