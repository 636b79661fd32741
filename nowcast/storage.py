"""Paths on local disk or fsspec URLs, and atomic writes.

Every store and checkpoint is written to a temporary sibling and renamed into place only when
complete, so a killed run never leaves something at the final path that looks finished. On local
disk the rename is atomic (``os.replace``); on object storage fsspec's ``mv`` is a copy + delete,
which is the best those systems offer, and the temporary name still marks unfinished work.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import fsspec


def is_url(path: str | os.PathLike) -> bool:
    """True for fsspec URLs such as ``s3://bucket/cube.zarr`` (not for plain paths)."""
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and the path inside it."""
    fs, inner = fsspec.core.url_to_fs(str(path))
    return fs, inner


def exists(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def remove(path: str | os.PathLike) -> None:
    """Remove a file or directory tree if it exists."""
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def temporary_sibling(path: str | os.PathLike) -> str:
    """A unique temporary path next to ``path`` (same filesystem, so rename is cheap)."""
    path = str(path).rstrip("/")
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Temporary siblings left by killed runs."""
    fs, inner = filesystem(path)
    inner = inner.rstrip("/")
    return [p for p in fs.glob(inner + ".tmp-*")]


def replace(tmp: str, final: str) -> None:
    """Move ``tmp`` to ``final``, replacing what is there."""
    if not is_url(final):
        tmp_local, final_local = _local(tmp), _local(final)
        if os.path.isdir(final_local):
            # Move the old store aside first: a directory cannot be replaced atomically, but
            # this way the final path holds either the old or the new complete store.
            old = temporary_sibling(final_local) + ".old"
            os.replace(final_local, old)
            os.replace(tmp_local, final_local)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_local, final_local)
        return
    fs, final_inner = filesystem(final)
    _, tmp_inner = filesystem(tmp)
    if fs.exists(final_inner):
        fs.rm(final_inner, recursive=True)
    fs.mv(tmp_inner, final_inner, recursive=True)


def _local(path: str) -> str:
    return str(path)[len("file://") :] if str(path).startswith("file://") else str(path)


@contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path; on success move it to ``final``, on failure delete it.

    Temporaries of earlier killed runs are removed first, so a re-run redoes the work.
    """
    final = str(final).rstrip("/")
    for stale in stale_temporaries(final):
        remove(stale)
    if not is_url(final):
        Path(_local(final)).parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    replace(tmp, final)


def atomic_write_file(final: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename to ``final`` (for checkpoints, NetCDF, JSON)."""
    with atomic_path(final) as tmp:
        write(tmp)
