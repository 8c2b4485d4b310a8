"""Atomic file writes.

A file written in place is briefly empty or half-written; a crash (or a pre-empted job) at that moment
leaves a truncated checkpoint or results file behind that looks valid by name. Every writer here
writes a temporary file in the *same* folder (so the final rename never crosses a file system) and
moves it over the destination with ``os.replace``, which is atomic on POSIX and Windows: a reader sees
either the old file or the complete new one, never a mix.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

# mkstemp creates files with mode 0600; give finished files the mode a plain open() would have.
# The umask can only be read by setting it, so do that once at import (not thread-safe later).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    The temporary name keeps the destination's extension, so writers that infer the format from the
    name (``Figure.savefig``, ``torch.save`` does not care) still work. On an exception the temporary
    file is removed and the destination is left untouched. Parent folders are created.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    _, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=f".tmp{ext}")
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _fsync_file(path: str) -> None:
    # Flush the data to disk before the rename; otherwise a power loss can leave the renamed file empty.
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (newlines written as given, no platform translation)."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically.

    For writers that want a file name, e.g. ``atomic_write_with(p, lambda t: fig.savefig(t, format="png"))``.
    """
    with atomic_path(path) as tmp:
        write(tmp)


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` and prove a file can be written in it, so a read-only or missing output
    location fails at start-up with one message instead of at the first checkpoint, hours later."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise SystemExit(f"error: cannot write to the output folder {folder}: {err.strerror}. Pass a "
                         "writable --output_dir (or fix the folder's permissions or mount).") from None


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically (checkpoints: a crash never leaves a truncated file)."""
    import torch  # local import: the rest of this module must not need torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
