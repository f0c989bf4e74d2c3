"""Where a shard's bytes come from: every shard is opened with webdataset's own opener (``webdataset.gopen``), so a
source can be a local path, ``file:PATH``, ``pipe:COMMAND`` (the command's standard output is the tar, e.g.
``pipe:aws s3 cp s3://bucket/00000.tar -``) or ``http(s)://…`` (fetched with curl, as webdataset does).

* :func:`local_path`: the file a source names, or None for a remote one (``pipe:``, a URL).
* :func:`open_shard` / :func:`finish`: open a shard for reading; close it and say whether it failed. A command (a
  ``pipe:`` or curl) that exits with an error status is a failure even when its output looked like a valid, shorter
  tar (a download cut at a file boundary): :func:`finish` names the status, with curl's meaning where it is known.
* :func:`beside`: a small file next to a shard (``sizes.json``, ``classnames.txt``): read from the shard's folder for
  a local shard, fetched from the same place (``http://host/dir/sizes.json``) for a URL; a ``pipe:`` source has no
  "beside" (None).
"""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

__all__ = ["local_path", "is_remote", "open_shard", "finish", "beside"]

# curl's exit statuses that a shard download meets (curl -f: an HTTP error status is 22)
_CURL = {6: "could not resolve the host", 7: "could not connect", 18: "the server closed the connection mid-file",
         22: "the server answered with an HTTP error (404: no such file)", 28: "timed out",
         35: "TLS handshake failed", 56: "the connection broke"}
_SIGPIPE = (141, -13)  # the reader stopped before the writer (a tar's trailing padding): not a failure


def _scheme(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    return scheme if len(scheme) > 1 else ""  # "C:\\data" is a Windows path, not a URL


def local_path(url: str) -> Path | None:
    """The local file a source names (a path or ``file:PATH``), None for a remote source (``pipe:``, a URL)."""
    scheme = _scheme(url)
    if scheme == "":
        return Path(url)
    if scheme == "file":
        return Path(url2pathname(urlparse(url).path))
    return None


def is_remote(url: str) -> bool:
    """Whether a source is read through a command or a download (``pipe:``, ``http://`` …), not from a local file."""
    return local_path(url) is None


def open_shard(url: str):
    """The shard's byte stream, opened by ``webdataset.gopen`` (a file, or webdataset's ``Pipe`` over a command)."""
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def finish(stream, *, abandon: bool = False) -> str | None:
    """Close a stream of :func:`open_shard`. For a command: wait for it (killed first when `abandon`: the reader
    stops early on purpose) and return why it failed ("pipe:… exited with status 1"), or None when it did not."""
    if stream is None:
        return None
    proc = getattr(stream, "proc", None)  # webdataset.gopen.Pipe: a command's standard output
    with contextlib.suppress(OSError):
        getattr(stream, "stream", stream).close()
    if proc is None:
        return None
    if abandon and proc.poll() is None:
        proc.kill()
    try:
        status = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # output closed and still running: it will never finish a shard we read
        proc.kill()
        status = proc.wait()
    stream.status = status
    if abandon or status == 0 or status in _SIGPIPE or status in getattr(stream, "ignore_status", ()):
        return None
    args = proc.args
    command = args if isinstance(args, str) else " ".join(str(a) for a in args)
    curl = isinstance(args, (list, tuple)) and args[:1] == ["curl"]
    meaning = f": {_CURL[status]}" if curl and status in _CURL else ""
    return f"`{command[:200]}` exited with status {status}{meaning}"


def beside(url: str, name: str, *, up: int = 0) -> bytes | None:
    """The bytes of the file `name` in the shard's folder (`up` folders higher), or None where there is none: read
    from disk for a local shard, fetched with :func:`open_shard` for a URL, None for a ``pipe:`` source."""
    path = local_path(url)
    if path is not None:
        folder = path.parent
        for _ in range(up):
            folder = folder.parent
        try:
            return (folder / name).read_bytes() if (folder / name).is_file() else None
        except OSError:
            return None
    if _scheme(url) == "pipe":
        return None
    stream = None
    try:
        stream = open_shard(urljoin(url, "../" * up + name))
        data = stream.read()
    except (OSError, ValueError):
        finish(stream, abandon=True)
        return None
    return None if finish(stream) else data
