"""Names from data are data: the one place that turns a name found *in* data into something parclip opens or writes.

A name found in data is a file in a folder's listing (a shards folder, clip_benchmark's ``wds/`` layout), a key of a
``sizes.json``, a path in a table, a manifest or an annotation file (Karpathy JSON, COCO, Flickr), a tar member's key,
a class name. Whoever can put a file into a data folder chooses these names, so they must never do more than name:

* **Reading** (:func:`local_source`): a name from data names a local file and is opened as one, whatever it looks
  like: ``pipe:touch x;.tar``, ``http:x.tar``, ``file:x``, ``a.tar::pipe:cmd``, ``{0..9}.tar``. It becomes an
  absolute, normalised path, which webdataset's opener (``webdataset.gopen``) and ``urllib.parse.urlparse`` read as a
  plain path (``/data/pipe:touch x.tar`` has no scheme: a scheme cannot hold a ``/``), never a ``file:`` URL (gopen
  would decode ``%41`` in it and cut it at ``#`` or ``?``). The path is one source: callers hand it on as it is, never
  inside a source spec that is parsed again (``::`` lists, brace patterns). Only a source the user typed may be a
  ``pipe:`` command, a URL or a pattern.
* **Where** (``anywhere``): a name from a folder's listing, a key or a manifest lies inside its folder; an empty name,
  an absolute one, or one whose ``..`` climbs out of the folder is a :class:`DataError`. Image paths in caption tables
  and retrieval annotation files are lists of files by design (open_clip_train's tables hold absolute paths; BLIP's
  Karpathy files are read the same way), so there (``anywhere=True``) a relative path is joined to the root and an
  absolute one, or one climbing out with ``..``, is kept: such a path is still only decoded as an image, never run or
  fetched. Symbolic links are followed, as folder listings follow them (:func:`parclip.data.folder.walk_images`).
* **Writing** (:func:`name_part`): a name from data that becomes part of a file name parclip writes (a tar member's
  key, a class name, a data set name in ``--output``) is one path component: separators and NUL become ``_``, ``.``
  and ``..`` are not names, and it is cut to fit a file system's 255-byte limit.

:class:`DataError`, which every data module raises, is defined here, at the bottom of ``data/``, so that every reader
(tables included) can use the rule.
"""
from __future__ import annotations

import os

__all__ = ["DataError", "local_source", "name_part"]

_MAX_PART = 200  # bytes of UTF-8: room for a prefix and a suffix within a file system's 255-byte file names


class DataError(ValueError):
    """A problem with the user's data (table, images, folder, templates), with a message that says how to fix it."""


def local_source(folder: str | os.PathLike, name, *, anywhere: bool = False) -> str:
    """The local file that `name`, a name found in data, names in `folder`: an absolute, normalised path that
    webdataset's opener reads as a path whatever the name (see the module docstring). DataError when `name` is not a
    non-empty string or holds a NUL; unless `anywhere` (image paths of tables and annotation files), also when it is
    absolute or climbs out of `folder`."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{name!r} (in {folder}) is not a file name: expected a non-empty path; fix that entry")
    if "\0" in name:
        raise DataError(f"{name!r} (in {folder}) holds a NUL character, which no file name can; fix that entry")
    base = os.path.abspath(folder)
    if anywhere:
        return os.path.normpath(name if os.path.isabs(name) else os.path.join(base, name))
    path = os.path.normpath(os.path.join(base, name))
    if os.path.isabs(name) or not path.startswith(base.rstrip(os.sep) + os.sep):
        raise DataError(f"{name!r} (in {folder}) names a file outside that folder; a name found in data must lie "
                        f"inside its folder (no absolute path, no '..' above it): move the file into the folder and "
                        f"name it relative to it")
    return path


def name_part(text) -> str:
    """`text`, a string from data, as one component of a file name parclip writes: ``/``, ``\\`` and NUL become
    ``_``, an empty name or one of dots only (``.``, ``..``) becomes underscores, and it is cut to 200 bytes of
    UTF-8 (whole characters)."""
    part = str(text).replace("/", "_").replace("\\", "_").replace("\0", "_")
    if not part.strip("."):
        part = "_" * max(1, len(part))
    return part.encode("utf-8")[:_MAX_PART].decode("utf-8", errors="ignore")
