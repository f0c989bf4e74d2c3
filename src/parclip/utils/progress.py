"""The one progress bar of parclip's long loops (exporting, verifying, poisoning, EDA captions)."""
from __future__ import annotations


def progress_bar(iterable=None, *, total: int | None = None, desc: str | None = None, unit: str = "it",
                 min_total: int = 0, **kw):
    """A tqdm bar on stderr. It hides itself when stderr is not a terminal (tqdm's ``disable=None``), and when the
    work is small: ``total`` (or ``len(iterable)``) below ``min_total``. Extra keywords go to tqdm."""
    from tqdm.auto import tqdm

    n = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    small = n is not None and n < min_total
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True if small else None, dynamic_ncols=True, **kw)
