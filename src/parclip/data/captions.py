"""Image-caption tables (CSV/TSV) as open_clip users know them, with bad-row accounting.

A table has a header row; one column holds image paths (``img_key``), another the caption (``caption_key``). Relative
image paths are joined to ``root`` (default: the table's own folder); absolute paths are used as-is (and ``..`` may
climb out of the root): a table lists the files to read. Every path names a local file, read as an image, never a
command or a URL, whatever it looks like (``pipe:…``, ``http:…``; :mod:`parclip.data.names`). The default layout
is open_clip_train's: tab-separated (whatever the file's suffix, .csv too), columns ``filepath`` and ``title``; every
table parclip writes has it. A table in parclip's old layout (comma-separated, columns ``image`` and ``caption``) read
with the defaults is a DataError that says what changed and which flags read it.

Bad input never disappears silently and never ends in a bare traceback:

* rows with an empty image path, an empty caption or a missing image file are found at construction (one ``stat`` per
  row) and dropped; with ``verify_images=True`` every image is also decoded up front and failures are dropped too;
* the dropped rows are counted by reason in :class:`BadRows` (``dataset.bad_rows``), the first offenders named;
* above ``max_bad_fraction`` of the examined rows the construction stops with a :class:`DataError`; below it a warning
  with the same summary goes to the ``"parclip"`` logger;
* an image that fails to decode at load time is replaced by the next row that decodes (i+1, i+2, ... wrapping) and
  ``__getitem__`` returns the failed index so the training loop can count it.
"""
from __future__ import annotations

import csv
import functools
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from ..utils.checks import check_fraction
from ..utils.files import atomic_open
from ..utils.progress import progress_bar
from .names import DataError, local_source

__all__ = ["DataError", "BadRows", "CaptionDataset", "read_table", "read_table_lines", "check_row", "write_table",
           "open_rgb", "IMG_KEY", "CAPTION_KEY", "SEPARATOR"]

IMG_KEY, CAPTION_KEY, SEPARATOR = "filepath", "title", "\t"
"""The default table layout, open_clip_train's (--csv-img-key, --csv-caption-key, --csv-separator)."""
OLD_LAYOUT = ("image", "caption", ",")  # parclip's layout before it took open_clip_train's

logger = logging.getLogger("parclip")

#: how many distinct captions each dataset keeps tokenised (demo captions repeat a lot; web captions rarely do)
TOKEN_CACHE_SIZE = 16384

# Reasons a row can be unusable (keys of BadRows.counts).
EMPTY_PATH = "empty image path"
EMPTY_CAPTION = "empty caption"
MISSING_FILE = "missing image file"
BAD_PATH = "not a file name"
UNREADABLE = "unreadable image"


def _sep_name(sep: str) -> str:
    return {"\t": r"'\t' (tab)", ",": "','", ";": "';'", "|": "'|'"}.get(sep, repr(sep))


def _auto_sep(path: str | os.PathLike) -> str:
    """The separator when none is given: tab (open_clip_train's default, also for .csv files)."""
    return SEPARATOR


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB of a decoded image. 16-bit and 32-bit integer greyscale (PNG "I;16", "I") are scaled to 8 bits by their bit
    depth (Pillow's own convert clips them to 255, which would make a 16-bit image white)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        import numpy as np

        a = np.asarray(im).astype(np.int64)
        a = np.clip(a, 0, 65535) >> 8  # 16-bit range to 8 bits ("I" from a 16-bit PNG holds 0..65535)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully and return it as RGB; truncated or corrupt files raise :class:`DataError` naming the path.

    The whole file is decoded here (no lazy loading, no ``LOAD_TRUNCATED_IMAGES``), so a bad file fails now and not
    later inside a transform.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb(im)
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, DecompressionBombError, ...
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------------------------------------
# Tables


def read_table_lines(path: str | os.PathLike, *, sep: str | None = None, columns: tuple[str, str] | None = None
                     ) -> tuple[list[str], list[dict[str, str]], list[int], str]:
    """:func:`read_table`, also returning the line number of each row (header = line 1; a quoted caption may span
    lines) and the separator used: ``(fieldnames, rows, lines, sep)``."""
    path = Path(path)
    sep = _auto_sep(path) if sep is None else sep
    if sep in ("\\t", "tab"):  # what people type on a command line
        sep = "\t"
    if len(sep) != 1:
        raise DataError(f"the separator must be one character, got {sep!r} (use --csv-separator)")
    if not path.is_file():
        raise DataError(f"caption table not found: {path}")
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"caption table {path} is empty: it needs a header row (e.g. 'filepath<TAB>title')")
            fieldnames = [h.strip() for h in header]
            dupes = sorted({h for h in fieldnames if fieldnames.count(h) > 1 and h})
            if dupes:
                raise DataError(f"caption table {path} has duplicate column names {dupes} in its header; rename "
                                f"them so --csv-img-key / --csv-caption-key name one column each")
            if columns is not None:
                _require_columns(path, fieldnames, sep, *columns)
            n = len(fieldnames)
            for record in reader:
                if not record:  # blank line
                    continue
                if len(record) < n:
                    record = record + [""] * (n - len(record))
                rows.append(dict(zip(fieldnames, record)))
                lines.append(reader.line_num)
    except UnicodeDecodeError as e:
        raise DataError(f"caption table {path} is not UTF-8 text: {e}") from e
    except csv.Error as e:
        raise DataError(f"caption table {path} cannot be parsed as CSV (separator {_sep_name(sep)}): {e}") from e
    return fieldnames, rows, lines, sep


def read_table(path: str | os.PathLike, *, sep: str | None = None, columns: tuple[str, str] | None = None
               ) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV/TSV table with a header row. ``sep=None``: tab (open_clip_train's default). ``columns``: the
    (image, caption) column names the table must have; a DataError names a missing one, the columns there are, the
    flag to pass, and a separator that looks wrong.

    Returns ``(fieldnames, rows)`` with one ``dict`` per data row (short rows are padded with ``""``).
    """
    fieldnames, rows, _, _ = read_table_lines(path, sep=sep, columns=columns)
    return fieldnames, rows


def write_table(path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[dict[str, Any]], *,
                sep: str | None = None) -> Path:
    """Write a table atomically (temporary file in the same folder, then ``os.replace``). ``sep`` as in read_table."""
    path = Path(path)
    sep = _auto_sep(path) if sep is None else sep
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), delimiter=sep, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _require_columns(path, fieldnames: list[str], sep: str, img_key: str, caption_key: str) -> None:
    missing = [(opt, flag, col) for opt, flag, col in (("img_key", "--csv-img-key", img_key),
                                                        ("caption_key", "--csv-caption-key", caption_key))
               if col not in fieldnames]
    if missing:
        raise _column_error(path, fieldnames, sep, missing)


def _column_error(path, fieldnames: list[str], sep: str, missing: list[tuple[str, str, str]]) -> DataError:
    """missing: (option name, CLI flag, requested column)."""
    what = "; ".join(f"column {col!r} ({opt}) not found" for opt, _, col in missing)
    old = _old_layout(fieldnames, sep, [col for _, _, col in missing])
    if old:
        return DataError(f"{path}: {what}. {old}")
    msg = [f"{path}: {what}.", f"Available columns: {', '.join(repr(c) for c in fieldnames)}."]
    if len(fieldnames) == 1:
        header = fieldnames[0]
        guesses = [s for s in ("\t", ",", ";", "|") if s != sep and s in header]
        if guesses:
            msg.append(f"The whole header was read as one column with separator {_sep_name(sep)}; the file looks "
                       f"separated by {_sep_name(guesses[0])}: pass --csv-separator (sep=) accordingly.")
        else:
            msg.append(f"The whole header was read as one column with separator {_sep_name(sep)}: if the file uses "
                       f"another separator, pass --csv-separator (sep=).")
    msg.append("Name the right column" + ("s" if len(missing) > 1 else "") + " with "
               + " and ".join(f"{flag} <column> ({opt}=...)" for opt, flag, _ in missing) + ".")
    return DataError(" ".join(msg))


def _old_layout(fieldnames: list[str], sep: str, wanted: list[str]) -> str | None:
    """The message for a table in parclip's old layout (columns image and caption, comma-separated or not) read with
    the new defaults; None for any other table."""
    if not set(wanted) <= {IMG_KEY, CAPTION_KEY}:
        return None
    img, caption, comma = OLD_LAYOUT
    names = fieldnames[0].split(comma) if len(fieldnames) == 1 and sep != comma else fieldnames
    if not {img, caption} <= {n.strip() for n in names}:
        return None
    seps = f"--csv-separator '{comma}' " if names is not fieldnames else ""
    keys = f"sep='{comma}', " if names is not fieldnames else ""
    return (f"It is in parclip's old table layout (columns {img!r} and {caption!r}{', comma-separated' if seps else ''}"
            f"); parclip's table defaults are now open_clip_train's: tab-separated, columns {IMG_KEY!r} and "
            f"{CAPTION_KEY!r}. Read it with {seps}--csv-img-key {img} --csv-caption-key {caption} ({keys}"
            f"img_key={img!r}, caption_key={caption!r}), or rewrite it in the new layout (parclip's own tables: "
            f"export them again).")


# --------------------------------------------------------------------------------------------------------------------
# Bad-row report


class BadRows:
    """Unusable rows, counted by reason, with the first offenders named (line in the table, path, reason)."""

    def __init__(self, source: str = "", max_examples: int = 5, unit: str = "rows"):
        self.source = source
        self.unit = unit
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: list[tuple[int | None, str, str]] = []  # (line or None, path, reason with detail)
        self.examined = 0

    def add(self, line: int | None, path: str, reason: str, detail: str | None = None) -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((line, path, f"{reason}: {detail}" if detail else reason))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def fraction(self) -> float:
        return self.total / self.examined if self.examined else 0.0

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:
        return self.total > 0

    def __str__(self) -> str:
        where = f" of {self.source}" if self.source else ""
        if not self.total:
            return f"no unusable {self.unit}{where} ({self.examined} examined)"
        by_reason = ", ".join(f"{n} {r}" for r, n in self.counts.most_common())
        first = "; ".join(("" if line is None else f"line {line} ") + f"{path!r}: {why}"
                          for line, path, why in self.examples)
        return (f"{self.total} of {self.examined} {self.unit}{where} ({100 * self.fraction:.2f}%) are unusable "
                f"({by_reason}). First: {first}")

    def __repr__(self) -> str:
        return f"BadRows(total={self.total}, examined={self.examined}, counts={dict(self.counts)})"

    def check(self, max_bad_fraction: float) -> None:
        """Raise DataError above the limit; log a warning below it (if there is anything to report)."""
        if not self.total:
            return
        if self.fraction > max_bad_fraction:
            decode = (" (or leave verify_images off: undecodable images are then replaced at load time and counted)"
                      if self.counts.get(UNREADABLE) else "")
            raise DataError(
                f"too many unusable {self.unit}: {self}. That is above max_bad_fraction={max_bad_fraction:g}. "
                f"Fix or remove these {self.unit}{decode}, or raise the limit with max_bad_fraction "
                f"(CLI: --max-bad-fraction).")
        logger.warning("%s; they are skipped (below max_bad_fraction=%g)", self, max_bad_fraction)


# --------------------------------------------------------------------------------------------------------------------
# Dataset


def check_row(row: dict[str, str], line: int, img_key: str, caption_key: str, root_abs: str,
              bad: BadRows) -> tuple[str, str | None, str]:
    """One table row's checks, shared by every reader of caption tables: ``(rel, full path, caption)``, where the
    path is ``root_abs/rel`` (``rel`` itself when absolute), normalised (:func:`~parclip.data.names.local_source`: a
    table's path names a local file, whatever it looks like, and may lie anywhere); ``full`` is None, and the reason
    is added to `bad`, when the path or the caption is empty, the path is no file name (a NUL) or the file is
    missing. ``bad.examined`` is the caller's."""
    rel = (row.get(img_key) or "").strip()
    caption = row.get(caption_key) or ""
    if not rel:
        bad.add(line, rel, EMPTY_PATH)
        return rel, None, caption
    try:
        full = local_source(root_abs, rel, anywhere=True)
    except DataError as e:
        bad.add(line, rel, BAD_PATH, str(e))
        return rel, None, caption
    if not caption.strip():
        bad.add(line, rel, EMPTY_CAPTION)
        return rel, None, caption
    if not os.path.isfile(full):
        bad.add(line, rel, MISSING_FILE, None if os.path.isabs(rel) else f"looked in {root_abs}")
        return rel, None, caption
    return rel, full, caption


class CaptionDataset:
    """Map-style dataset over an image-caption table.

    ``__getitem__(i) -> (image, tokens, bad)``: ``image`` is ``transform(PIL RGB)`` (the PIL image when ``transform`` is
    None), ``tokens`` is ``tokenizer([caption])[0]`` (the caption string when ``tokenizer`` is None), and ``bad`` is -1,
    or ``i`` when row i failed to decode and the next decodable row was returned in its place. When
    ``caption_views`` (extra caption lists aligned with ``captions``, e.g. EDA twins) is set, ``tokens`` is a tuple:
    the caption's tokens, then each view's. ``captions`` may be replaced after construction (same length).

    ``num_samples`` keeps exactly that many usable rows: the first ones (``subset="first"``) or a random subset drawn
    with ``seed`` (``subset="random"``, returned in table order). Bad rows met on the way are reported and replaced by
    the next candidates.
    """

    def __init__(self, path: str | os.PathLike, *, img_key: str = IMG_KEY, caption_key: str = CAPTION_KEY,
                 sep: str | None = None, root: str | os.PathLike | None = None,
                 transform: Callable | None = None, tokenizer: Callable | None = None,
                 max_bad_fraction: float = 0.01, num_samples: int | None = None, subset: str = "first",
                 seed: int = 0, verify_images: bool = False):
        self.path = Path(path)
        self.transform = transform
        self.tokenizer = tokenizer
        self.max_bad_fraction = check_fraction("max_bad_fraction", max_bad_fraction, error=DataError)
        if subset not in ("first", "random"):
            raise DataError(f"subset must be 'first' or 'random', got {subset!r}")

        fieldnames, rows, lines, self.sep = read_table_lines(self.path, sep=sep, columns=(img_key, caption_key))
        self.fieldnames = fieldnames
        if not rows:
            raise DataError(f"caption table {self.path} has a header but no data rows")
        self.img_key, self.caption_key = img_key, caption_key
        self.root = Path(root).expanduser() if root is not None else self.path.parent
        if not self.root.is_dir():
            raise DataError(f"image root {self.root} is not a folder (root=...)")
        root_abs = os.path.abspath(self.root)

        n_total = len(rows)
        if num_samples is not None:
            num_samples = int(num_samples)
            if num_samples <= 0:
                raise DataError(f"num_samples must be positive, got {num_samples}")
            if num_samples > n_total:
                raise DataError(f"num_samples={num_samples} but {self.path} has only {n_total} rows")
        wanted = n_total if num_samples is None else num_samples
        if subset == "random" and num_samples is not None:
            import numpy as np

            order: Iterable[int] = (int(j) for j in np.random.default_rng(seed).permutation(n_total))
        else:
            order = range(n_total)

        self.bad_rows = BadRows(str(self.path))
        bar = progress_bar(total=wanted, desc="verifying images", unit="img") if verify_images else None
        kept: list[tuple[int, str, str]] = []  # (row index, absolute path, caption)
        try:
            for j in order:
                if len(kept) == wanted:
                    break
                self.bad_rows.examined += 1
                rel, full, caption = check_row(rows[j], lines[j], img_key, caption_key, root_abs, self.bad_rows)
                if full is None:
                    continue
                if verify_images:
                    try:
                        open_rgb(full)
                    except DataError as e:
                        self.bad_rows.add(lines[j], rel, UNREADABLE, str(e.__cause__ or e))
                        continue
                    bar.update(1)
                kept.append((j, full, caption))
        finally:
            if bar is not None:
                bar.close()
        if not kept:
            raise DataError(f"no usable rows in {self.path}: {self.bad_rows}")
        self.bad_rows.check(self.max_bad_fraction)
        if len(kept) < wanted and num_samples is not None:
            logger.warning("%s: only %d usable rows for num_samples=%d", self.path, len(kept), num_samples)
        kept.sort()
        self.rows = [j for j, _, _ in kept]  # index of each sample in the table's data rows
        self.lines = [lines[j] for j in self.rows]  # line number of each sample in the table (header = line 1)
        self.paths = [p for _, p, _ in kept]
        self.captions = [c for _, _, c in kept]
        self.caption_views: list[list[str]] = []  # extra caption lists aligned with `captions` (e.g. EDA twins)
        self._failed: set[int] = set()
        self._make_cache()

    # -- tokenisation (cached per distinct caption) -----------------------------------------------------------------
    def _make_cache(self) -> None:
        tok = self.tokenizer
        self._tokenize = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(lambda c: tok([c])[0]) if tok else None

    def __getstate__(self):  # lru_cache wrappers don't pickle (DataLoader workers under spawn)
        state = self.__dict__.copy()
        state.pop("_tokenize", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._make_cache()

    def _encode(self, caption: str):
        return self._tokenize(caption) if self._tokenize is not None else caption

    def tokens(self, i: int):
        """Tokens of caption i (the caption string when there is no tokenizer)."""
        return self._encode(self.captions[i])

    def _caption_item(self, j: int):
        """Tokens of caption j, or, with caption views, a tuple: the caption's tokens, then each view's."""
        if not self.caption_views:
            return self.tokens(j)
        return (self.tokens(j), *(self._encode(v[j]) for v in self.caption_views))

    # -- images -----------------------------------------------------------------------------------------------------
    def load_image(self, i: int) -> Image.Image:
        """Image i as PIL RGB; DataError naming the file (and its table line) if it cannot be decoded."""
        try:
            return open_rgb(self.paths[i])
        except DataError as e:
            raise DataError(f"{e} (line {self.lines[i]} of {self.path})") from e.__cause__

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, i: int) -> str:
        """Sample i for a message: its image path and table line."""
        return f"{self.paths[i]} (line {self.lines[i]})"

    def __getitem__(self, i: int):
        n = len(self.paths)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        bad = -1
        for k in range(n):
            j = (i + k) % n
            try:
                img = self.load_image(j)
            except DataError as e:
                if bad < 0:
                    bad = i
                if j not in self._failed:  # once per row and process
                    self._failed.add(j)
                    logger.warning("%s; using the next row instead", e)
                continue
            image = self.transform(img) if self.transform is not None else img
            return image, self._caption_item(j), bad
        raise DataError(f"no image of {self.path} can be decoded (tried all {n})")

    def __repr__(self) -> str:
        return (f"CaptionDataset({str(self.path)!r}, {len(self)} samples, img_key={self.img_key!r}, "
                f"caption_key={self.caption_key!r}, bad_rows={self.bad_rows.total})")
