"""WordNet 3.0 synonyms, offline, straight from the database files (nltk is not needed to read them).

Where the files come from: Debian's package ``wordnet-base`` (``sudo apt-get install wordnet-base``, which
``scripts/setup.sh`` does) puts the WordNet 3.0 database in ``/usr/share/wordnet``; nltk's downloader
(``pip install nltk && python -m nltk.downloader wordnet``, no system package needed) puts the same files in
``<nltk_data>/corpora/wordnet.zip`` (or unzipped in ``corpora/wordnet/``). Any folder with the same files works
(``PARCLIP_WORDNET_DIR=/path/to/dict``, e.g. the ``dict`` folder of Princeton's WordNet-3.0 tarball), and so does
nltk's ``wordnet.zip`` itself. The search order: the ``folder`` argument, ``$PARCLIP_WORDNET_DIR``, then
:data:`SEARCH_PATHS`, then nltk's data folders (:func:`nltk_data_dirs`: ``$NLTK_DATA``, ``~/nltk_data``, the Python
prefix's and the system's ``nltk_data`` folders, and ``nltk.data.path`` when nltk is installed); a folder given by
argument or by the variable must hold the files (no silent fall-back).

The files read, per part of speech p ∈ {noun, verb, adj, adv} (format: ``man 5WN wndb``):

* ``index.p``: one line per lemma, ``lemma pos synset_cnt p_cnt [ptr_symbol × p_cnt] sense_cnt tagsense_cnt
  synset_offset × synset_cnt``; the offsets are listed most frequent sense first;
* ``data.p``: one line per synset, starting at byte ``synset_offset``: ``synset_offset lex_filenum ss_type w_cnt
  (word lex_id) × w_cnt ...`` with ``w_cnt`` two hex digits; adjectives may carry a marker ``(a)``, ``(p)`` or
  ``(ip)`` glued to the word, which is dropped;
* ``p.exc``: irregular forms, ``inflected base [base ...]`` (optional: without it only the rules below apply).

Lines that start with two spaces are the license header and are skipped.

**Morphological reduction** ("morphy", as WordNet's own lookup does it), for a word w and a part of speech p::

    bases_p(w) = {w} ∪ exc_p(w)            if w is in p.exc
               = {w} ∪ {detach(w, r) : r ∈ rules_p, w ends with r.suffix}    otherwise
    forms_p(w) = [b ∈ bases_p(w) : b is a lemma of index.p]  (order: w first, then the list order)

with the detachment rules (suffix → ending)::

    noun: s→,  ses→s,  xes→x,  zes→z,  ches→ch,  shes→sh,  men→man,  ies→y
    verb: s→,  ies→y,  es→e,  es→,  ed→e,  ed→,  ing→e,  ing→
    adj:  er→,  est→,  er→e,  est→e
    adv:  (none; exceptions only)

**Synonyms**: ``synonyms(w)`` = the lemma names of every synset s with s ∈ synsets_p(b), b ∈ forms_p(w), p in the
order noun, verb, adj, adv, in the index's sense order, each synset once; names lowercased, ``_`` and ``-`` turned into
spaces, duplicates and w itself dropped, first occurrence kept (so the order is stable across runs, unlike a set).

Cost: the four index files and exception lists are parsed once per folder on first use (≈ 0.5 s, 155 k lemmas); the
data files are read into memory (21 MB) and each synset line is decoded on demand and cached, as are the answers.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import threading
import zipfile
from pathlib import Path

from .captions import DataError

__all__ = ["ENV_VAR", "POS_FILES", "SEARCH_PATHS", "WordNet", "WordNetNotFoundError", "find_wordnet_dir",
           "load_wordnet", "nltk_data_dirs", "synonyms"]

#: environment variable naming a folder with the WordNet 3.0 ``index.*`` / ``data.*`` files
ENV_VAR = "PARCLIP_WORDNET_DIR"

#: where the files are looked for after ``$PARCLIP_WORDNET_DIR``: Debian's ``wordnet-base`` first, then the places
#: other packagings and a source build of WordNet 3.0 use
SEARCH_PATHS = (
    "/usr/share/wordnet",
    "/usr/share/wordnet/dict",
    "/usr/local/share/wordnet",
    "/usr/local/share/wordnet/dict",
    "/usr/lib/wordnet",
    "/usr/local/WordNet-3.0/dict",
    "/usr/share/WordNet-3.0/dict",
)

#: parts of speech in lookup order: (file suffix, index pos letter)
POS_FILES = (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r"))

# detachment rules per part of speech: (suffix, ending)
_RULES = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
             ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_INSTALL_HINT = (f"install Debian's WordNet 3.0 with 'sudo apt-get install wordnet-base' (or run scripts/setup.sh), "
                 f"or without a system package 'pip install nltk && python -m nltk.downloader wordnet', "
                 f"or set {ENV_VAR} to a folder (or nltk's wordnet.zip) holding the WordNet 3.0 files index.noun, "
                 f"data.noun, index.verb, data.verb, index.adj, data.adj, index.adv, data.adv (and noun.exc, "
                 f"verb.exc, adj.exc, adv.exc)")
_NLTK_MEMBER = "wordnet/"  # the folder inside nltk's corpora/wordnet.zip


class WordNetNotFoundError(DataError):
    """The WordNet 3.0 database files were not found; the message says how to install them or where to point."""


def _names(source: Path) -> set[str]:
    """The file names a WordNet source offers: a folder's files, or the members of nltk's ``wordnet.zip``."""
    if source.is_dir():
        return {p.name for p in source.iterdir() if p.is_file()}
    try:
        with zipfile.ZipFile(source) as z:
            return {n[len(_NLTK_MEMBER):] for n in z.namelist() if n.startswith(_NLTK_MEMBER)}
    except (OSError, zipfile.BadZipFile):
        return set()


def _missing(source: Path) -> list[str]:
    """Required files absent from ``source`` (a folder or nltk's zip; the exception lists are optional)."""
    have = _names(source)
    need = [f"{kind}.{suffix}" for suffix, _ in POS_FILES for kind in ("index", "data")]
    return [name for name in need if name not in have]


def nltk_data_dirs() -> list[Path]:
    """nltk's data folders, in nltk's order: ``$NLTK_DATA`` (``os.pathsep``-separated), ``~/nltk_data``, then
    ``nltk_data``, ``share/nltk_data`` and ``lib/nltk_data`` under the Python prefix, then under ``/usr/share``,
    ``/usr/local/share``, ``/usr/lib`` and ``/usr/local/lib``; and ``nltk.data.path`` when nltk is importable (it
    may hold folders a program added). Duplicates dropped."""
    dirs = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    dirs += [str(Path("~/nltk_data").expanduser())]
    dirs += [os.path.join(sys.prefix, sub) for sub in ("nltk_data", "share/nltk_data", "lib/nltk_data")]
    dirs += [f"{base}/nltk_data" for base in ("/usr/share", "/usr/local/share", "/usr/lib", "/usr/local/lib")]
    try:
        import nltk.data  # optional: only to honour folders a program appended to nltk.data.path
        dirs += [str(d) for d in nltk.data.path]
    except ImportError:
        pass
    return [Path(d) for d in dict.fromkeys(dirs)]


def _nltk_candidates() -> list[Path]:
    """Where nltk's downloader leaves WordNet 3.0 in each data folder: unzipped, then the zip."""
    return [d / "corpora" / name for d in nltk_data_dirs() for name in ("wordnet", "wordnet.zip")]


def find_wordnet_dir(folder: str | os.PathLike | None = None) -> Path:
    """The folder (or nltk's ``wordnet.zip``) holding the WordNet 3.0 files: ``folder``, else
    ``$PARCLIP_WORDNET_DIR``, else the first complete one of :data:`SEARCH_PATHS`, then of nltk's data folders
    (:func:`nltk_data_dirs`). Raises :class:`WordNetNotFoundError` saying what is missing and how to install it."""
    if folder is None and os.environ.get(ENV_VAR):
        folder, origin = os.environ[ENV_VAR], f"${ENV_VAR}"
    else:
        origin = "the folder given"
    if folder is not None:
        path = Path(folder).expanduser()
        if not path.exists():
            raise WordNetNotFoundError(f"WordNet folder {str(path)!r} ({origin}) does not exist: {_INSTALL_HINT}")
        missing = _missing(path)
        if missing:
            raise WordNetNotFoundError(f"WordNet folder {str(path)!r} ({origin}) lacks {', '.join(missing)}: "
                                       f"{_INSTALL_HINT}")
        return path.resolve()
    nltk = _nltk_candidates()
    for path in [*map(Path, SEARCH_PATHS), *nltk]:
        if path.exists() and not _missing(path):
            return path.resolve()
    raise WordNetNotFoundError(f"WordNet 3.0 not found (looked in ${ENV_VAR}, unset, in {', '.join(SEARCH_PATHS)}, "
                               f"and in nltk's data folders: {', '.join(sorted({str(p.parent) for p in nltk}))}): "
                               f"{_INSTALL_HINT}")


class WordNet:
    """A read-only WordNet 3.0 database in ``folder`` (see the module docstring for the files and the rules).

    ``WordNet(folder)`` checks the files at once; everything is parsed on the first lookup. Instances are thread-safe
    for reading and hold no open files (the data files are kept as bytes), so they survive ``fork``.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = find_wordnet_dir(folder)
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, tuple[int, ...]]] | None = None  # pos -> lemma -> synset offsets
        self._exc: dict[str, dict[str, tuple[str, ...]]] = {}
        self._data: dict[str, bytes] = {}
        self._synset_cache: dict[tuple[str, int], tuple[str, ...]] = {}
        self._synonym_cache: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"WordNet({str(self.folder)!r})"

    # -- loading ------------------------------------------------------------------------------------------------------

    def _read(self, name: str, optional: bool = False) -> bytes | None:
        """The bytes of WordNet file ``name`` from the folder or nltk's zip (None for an absent optional file)."""
        try:
            if self.folder.is_dir():
                path = self.folder / name
                return None if optional and not path.is_file() else path.read_bytes()
            with zipfile.ZipFile(self.folder) as z:
                member = _NLTK_MEMBER + name
                return None if optional and member not in z.namelist() else z.read(member)
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            raise WordNetNotFoundError(f"cannot read WordNet file {self.folder / name}: {e}; {_INSTALL_HINT}") from e

    def _load(self) -> None:
        with self._lock:
            if self._index is not None:
                return
            index: dict[str, dict[str, tuple[int, ...]]] = {}
            for suffix, _ in POS_FILES:
                lemmas: dict[str, tuple[int, ...]] = {}
                for line in self._read(f"index.{suffix}").decode("utf-8", "replace").splitlines():
                    if not line or line.startswith("  "):
                        continue
                    fields = line.split()
                    try:
                        synset_cnt = int(fields[2])
                        lemmas[fields[0]] = tuple(int(o) for o in fields[len(fields) - synset_cnt:])
                    except (IndexError, ValueError) as e:
                        raise DataError(f"{self.folder / ('index.' + suffix)}: malformed line {line[:80]!r}; is "
                                        f"this a WordNet 3.0 index file? {_INSTALL_HINT}") from e
                index[suffix] = lemmas
                self._data[suffix] = self._read(f"data.{suffix}")
                exc: dict[str, tuple[str, ...]] = {}
                exc_bytes = self._read(f"{suffix}.exc", optional=True)
                if exc_bytes is not None:
                    for line in exc_bytes.decode("utf-8", "replace").splitlines():
                        fields = line.split()
                        if len(fields) >= 2:
                            exc[fields[0]] = exc.get(fields[0], ()) + tuple(fields[1:])
                self._exc[suffix] = exc
            self._index = index

    # -- lookups ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _key(word: str) -> str:
        return "_".join(word.strip().lower().split())

    def morphy(self, word: str, pos: str) -> list[str]:
        """The base forms of ``word`` that are lemmas of part of speech ``pos`` ("noun", "verb", "adj", "adv"),
        the word itself first when it is one; ``[]`` when none is (rules in the module docstring)."""
        if pos not in _RULES:
            raise ValueError(f"pos must be one of {', '.join(_RULES)}, got {pos!r}")
        self._load()
        w = self._key(word)
        if not w:
            return []
        exc = self._exc[pos].get(w)
        if exc is not None:
            bases = [w, *exc]
        else:
            bases = [w] + [w[: len(w) - len(suffix)] + ending for suffix, ending in _RULES[pos]
                           if w.endswith(suffix) and len(w) > len(suffix)]
        lemmas = self._index[pos]
        return list(dict.fromkeys(b for b in bases if b in lemmas))

    def _synset_words(self, pos: str, offset: int) -> tuple[str, ...]:
        """The raw lemma names (as in the data file, marker dropped) of the synset at byte ``offset`` of data.pos."""
        key = (pos, offset)
        words = self._synset_cache.get(key)
        if words is None:
            data = self._data[pos]
            end = data.find(b"\n", offset)
            line = data[offset: end if end >= 0 else len(data)].decode("utf-8", "replace")
            fields = line.split(" ", 4 + 2 * 255)
            try:
                if int(fields[0]) != offset:
                    raise ValueError("offset mismatch")
                w_cnt = int(fields[3], 16)
                words = tuple(_ADJ_MARKER.sub("", fields[4 + 2 * i]) for i in range(w_cnt))
            except (IndexError, ValueError) as e:
                raise DataError(f"{self.folder / ('data.' + pos)}: no synset line at byte {offset} ({line[:60]!r}); "
                                f"the index and data files do not match: reinstall WordNet 3.0 ({_INSTALL_HINT})") from e
            self._synset_cache[key] = words
        return words

    def synsets(self, word: str) -> list[tuple[str, int]]:
        """The synsets of ``word`` after morphological reduction, as (pos, byte offset) pairs: nouns, verbs,
        adjectives, adverbs in that order, each in the index's sense order, each synset once."""
        self._load()
        out: dict[tuple[str, int], None] = {}
        for pos, _ in POS_FILES:
            for base in self.morphy(word, pos):
                for offset in self._index[pos][base]:
                    out.setdefault((pos, offset), None)
        return list(out)

    def synonyms(self, word: str) -> list[str]:
        """Lemma names of every synset ``word`` belongs to (module docstring): lowercase, ``_``/``-`` → space,
        ``word`` itself excluded, first occurrence first, no duplicates; ``[]`` for a word WordNet does not know."""
        query = " ".join(word.strip().lower().split())
        cached = self._synonym_cache.get(query)
        if cached is None:
            seen: dict[str, None] = {}
            for pos, offset in self.synsets(query):
                for raw in self._synset_words(pos, offset):
                    name = " ".join(raw.replace("_", " ").replace("-", " ").lower().split())
                    if name and name != query:
                        seen.setdefault(name, None)
            cached = self._synonym_cache[query] = list(seen)
        return list(cached)


@functools.lru_cache(maxsize=8)
def _open(folder: Path) -> WordNet:
    return WordNet(folder)


def load_wordnet(folder: str | os.PathLike | None = None) -> WordNet:
    """The shared :class:`WordNet` for ``folder`` (default: ``$PARCLIP_WORDNET_DIR``, then :data:`SEARCH_PATHS`, then
    nltk's data folders),
    opened once per folder and cached; raises :class:`WordNetNotFoundError` when the files are missing."""
    return _open(find_wordnet_dir(folder))


def synonyms(word: str, folder: str | os.PathLike | None = None) -> list[str]:
    """``load_wordnet(folder).synonyms(word)``: WordNet synonyms of ``word`` (see :meth:`WordNet.synonyms`)."""
    return load_wordnet(folder).synonyms(word)
