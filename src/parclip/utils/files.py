"""Crash-safe writing: a file appears at its path complete or not at all.

Every writer of the package goes through :func:`replacing` (directly or through :func:`atomic_write`,
:func:`atomic_open`, :func:`write_text`, :func:`write_json`): the content goes to a hidden temporary file in the same
folder (``.<name>.<random>.tmp``), is fsync'ed, and is moved over the target with ``os.replace`` (atomic on POSIX and
Windows); then the folder is fsync'ed where the OS allows, so the rename itself survives a power cut. A crash or kill at
any moment leaves the old file or the new one, never half of one; the temporary file of a failed write is removed.

Fault injection (for the tests of that promise): with ``PARCLIP_FAULT_KILL=<file name pattern>:<n>`` in the
environment (a glob: ``latest.pt:3``, ``*.png:20``) the process kills itself (SIGKILL) on the n-th write of a file
matching it, after the temporary file is written and before it replaces the target: the worst moment for a writer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["replacing", "atomic_write", "atomic_open", "write_text", "write_json", "sha256_file"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike) -> None:
    """fsync a file, or a folder (which persists a rename; silently skipped where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """``with replacing(path) as tmp:`` write the file ``tmp``; when the block succeeds it becomes ``path``.

    The parent folder is created; the file gets the permissions ``open()`` would give it (0666 minus the umask). On
    an exception the temporary file is deleted and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual permissions
        yield tmp
        _fsync(tmp)
        _maybe_die(path.name)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)


_FAULT_COUNTS: dict[str, int] = {}


def _maybe_die(name: str) -> None:
    """The fault-injection point (see the module docstring); nothing happens unless PARCLIP_FAULT_KILL matches."""
    spec = os.environ.get("PARCLIP_FAULT_KILL")
    if not spec:
        return
    import fnmatch

    pattern, _, nth = spec.rpartition(":")
    if not fnmatch.fnmatch(name, pattern):
        return
    _FAULT_COUNTS[pattern] = _FAULT_COUNTS.get(pattern, 0) + 1
    if str(_FAULT_COUNTS[pattern]) == nth:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(tmp_path)`` fills a temporary file that then replaces ``path`` (for writers that take a path:
    ``torch.save``, ``safetensors.torch.save_file``, ``PIL.Image.save``). Returns ``path``."""
    with replacing(path) as tmp:
        write(tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, *, newline: str | None = None) -> Iterator:
    """``with atomic_open(path) as f: f.write(...)``: a UTF-8 text file that appears at ``path`` only when the block
    finishes without an exception."""
    with replacing(path) as tmp, open(tmp, "w", newline=newline, encoding="utf-8") as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def save_figure(fig, path: str | os.PathLike, **kw) -> Path:
    """Atomic ``fig.savefig(path, **kw)`` of a matplotlib figure; the format comes from ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kw))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, not ASCII-escaped, a newline at the end) to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
