"""What a scan writes (docs/scan.md#output): ``scan.json`` (everything :func:`parclip.scan.scan` returns),
``scan.md`` (the verdict and a short table per part) and ``triggers/<name>.png`` per inverted trigger: the trigger
(mask × pattern over grey), its mask, and clean images above the same images stamped with it."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from parclip.data.names import name_part
from parclip.utils.files import atomic_write, write_json, write_text

__all__ = ["write_scan", "summary_table", "trigger_strip"]


def _tile(t: torch.Tensor, scale: int) -> Image.Image:
    arr = (t.clamp(0, 1) * 255).round().to(torch.uint8)
    if arr.ndim == 2:
        arr = arr[None].expand(3, -1, -1)
    img = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy(), "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def trigger_strip(inv, images: torch.Tensor, n: int = 6) -> Image.Image:
    """Two rows: [trigger over grey, mask, n clean images] and [blank, blank, the same n stamped]; small images
    are enlarged (nearest) to at least 96 px."""
    S = images.shape[-1]
    scale = max(1, math.ceil(96 / S))
    x = images[:n].cpu()
    top = [inv.stamp(torch.full((1, 3, S, S), 0.5))[0], inv.mask, *x]
    bottom = [torch.ones(3, S, S), torch.ones(3, S, S), *inv.stamp(x)]
    side, gap = S * scale, 4
    canvas = Image.new("RGB", (len(top) * (side + gap), 2 * (side + gap)), "white")
    for row, tiles in enumerate((top, bottom)):
        for col, t in enumerate(tiles):
            canvas.paste(_tile(t, scale), (col * (side + gap), row * (side + gap)))
    return canvas


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_table(result: dict, model: str = "") -> str:
    """The verdict and each part as Markdown."""
    v = result["verdict"]
    lines = [f"# Scan{' of ' + model if model else ''}", "",
             f"**{'BACKDOORED' if v['backdoored'] else 'no backdoor found'}**"
             + (f", suspected target {v['target']!r}" if v["target"] else "")
             + f" ({result['n_images']} images, {result['seconds']['total']:.0f} s)", "",
             "| test | fired | target | value | threshold | evidence |", "|---|---|---|---|---|---|"]
    for e in v["evidence"]:
        lines.append(f"| {e['test']} | {'**yes**' if e['fired'] else 'no' if e['ran'] else 'skipped'} | "
                     f"{_fmt(e.get('target'))} | {_fmt(e.get('value'))} | {_fmt(e.get('threshold'))} | {e['why']} |")
    if result["sweep"]:
        lines += ["", "## Known-trigger sweep (the 8 highest lifts)", "",
                  "| variant | toward | flipped % | control % | lift (points) |", "|---|---|---|---|---|"]
        for r in sorted(result["sweep"], key=lambda r: -r["lift"])[:8]:
            lines.append(f"| {r['variant']} | {r['target']} | {r['flip']:.1f} | {r['control_flip']:.1f} | "
                         f"{r['lift']:.1f} |")
    if result["classifier"]:
        lines += ["", "## Classifier-level inversion", "", "| class | mask area | reached | anomaly index | "
                  "relative area | × reference |", "|---|---|---|---|---|---|"]
        for r in sorted(result["classifier"]["per_class"], key=lambda r: r["area"]):
            lines.append(f"| {r['class']} | {r['area']:.4f} | {100 * r['metric']:.0f} % | {r['anomaly_index']:.2f} "
                         f"| {r['relative_area']:.2f} | {_fmt(r.get('reference_ratio'))} |")
    if result["encoder"]:
        e = result["encoder"]
        lines += ["", f"Encoder-level inversion: mask area {e['area']:.4f}, mean cosine {e['metric']:.3f} (target "
                  f"{e['target_similarity']:.3f}, clean {e['clean_similarity']:.3f}); its trigger sends "
                  f"{100 * (e.get('top_class_share') or 0):.0f} % of images to {_fmt(e.get('top_class'))}"
                  + (f"; {e['reference_ratio']:.2f} × the reference's area" if "reference_ratio" in e else "")]
    return "\n".join(lines) + "\n"


def write_scan(out: str | Path, result: dict, artefacts, *, model: str = "") -> Path:
    """scan.json, scan.md and triggers/*.png (from :class:`parclip.scan.run.Artefacts`) under `out`; returns the
    JSON's path."""
    out = Path(out)
    (out / "triggers").mkdir(parents=True, exist_ok=True)
    for name, inv in artefacts.inversions.items():
        strip = trigger_strip(inv, artefacts.images)
        atomic_write(out / "triggers" / f"{name_part(name.replace(' ', '_'))}.png",  # a class name is data
                     lambda tmp, s=strip: s.save(tmp, format="PNG"))
    write_text(out / "scan.md", summary_table(result, model))
    return write_json(out / "scan.json", result)
