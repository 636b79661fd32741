"""Paths on local disk or fsspec URLs, and atomic writes.

Every store and checkpoint is written to a temporary sibling and renamed into place only when
complete, so a killed run never leaves something at the final path that looks finished. On local
disk the rename is atomic (``os.replace``); on object storage fsspec's ``mv`` is a copy + delete,
which is the best those systems offer, and the temporary name still marks unfinished work.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import fsspec

from nowcast.config import ConfigError, UserError


class DiskWriteError(UserError):
    """A write failed, or would fail, because the disk is full or the folder is read-only."""


#: errno values that mean the disk or folder, not the program, stopped a write.
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}

#: Below this many free bytes a failed write is blamed on a full disk: libraries such as netCDF
#: (``NetCDF: HDF error``) and torch (``file write failed``) do not pass the errno on.
FULL_DISK_BYTES = 1 << 20


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable size (``3.9 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_free_space(path: str | os.PathLike, needed: float, what: str) -> None:
    """Stop before a large write that the disk holding ``path`` has no room for.

    Parameters
    ----------
    path : str or PathLike
        Where the write goes (need not exist yet).
    needed : float
        Estimated bytes, with any safety margin already applied.
    what : str
        What is written, for the message (``"export of 3 NetCDF files"``).

    Raises
    ------
    DiskWriteError
        One line with the estimate and the free bytes. Nothing is checked for fsspec URLs.
    """
    if not is_url(path):
        unwritable = _unwritable(_existing_folder(_local(str(path))))
        if unwritable:
            raise DiskWriteError(f"cannot write {path}: {unwritable} (choose a writable folder)")
    free = free_bytes(path)
    if free is not None and needed > free:
        raise DiskWriteError(
            f"{path}: not enough free disk space for the {what}: needs about "
            f"{format_bytes(needed)}, {format_bytes(free)} free (free some space or choose "
            "another folder)"
        )


def disk_write_error(err: BaseException, path: str | os.PathLike) -> DiskWriteError | None:
    """The :class:`DiskWriteError` that explains ``err`` raised while writing ``path``, if any.

    An ``OSError`` with one of :data:`DISK_ERRNOS` says so itself; any other error counts as a
    full disk when less than :data:`FULL_DISK_BYTES` are free, or as a read-only folder when the
    folder is not writable. Call it before the partial output is removed (that frees space).
    """
    if isinstance(err, DiskWriteError):
        return err
    path = str(path)
    reason = DISK_ERRNOS.get(err.errno) if isinstance(err, OSError) else None
    if reason is None and not is_url(path) and isinstance(err, (OSError, RuntimeError)):
        free = free_bytes(path)
        if free is not None and free < FULL_DISK_BYTES:
            reason = DISK_ERRNOS[errno.ENOSPC]
        else:
            reason = _unwritable(_existing_folder(_local(path)))
    if reason is None:
        return None
    free = free_bytes(path)
    room = f", {format_bytes(free)} free" if free is not None else ""
    return DiskWriteError(
        f"cannot write {path}: {reason}{room} (free some space or choose a writable folder)"
    )


@contextmanager
def writing(path: str | os.PathLike):
    """Turn a full or read-only disk met in the block into one :class:`DiskWriteError` naming
    ``path``; other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        explained = disk_write_error(err, path)
        if explained is None or explained is err:
            raise
        raise explained from err


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (a read-only mount, no permission), or None.

    The mount flag is asked first: it holds for root too, who passes every permission check.
    """
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return DISK_ERRNOS[errno.EROFS]
    except OSError:
        return None
    if not os.access(folder, os.W_OK):
        return f"{folder}: {DISK_ERRNOS[errno.EACCES]}"
    return None


def _existing_folder(path: str) -> Path:
    probe = Path(path).absolute()
    while not probe.is_dir() and probe != probe.parent:
        probe = probe.parent
    return probe


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


def restore_swapped_out(final: str | os.PathLike) -> str | None:
    """Put back a store that :func:`replace` moved aside, if a kill stopped the swap there.

    :func:`replace` moves the old store to ``<final>.tmp-*.old`` before moving the new one in;
    a run killed between the two renames leaves no store at ``final`` and the complete old one
    aside. That one is moved back (and a note printed), so the next run starts from it instead
    of deleting it with the other temporaries. Returns the restored temporary name, or None.
    """
    final = str(final).rstrip("/")
    if exists(final):
        return None
    fs, inner = filesystem(final)
    aside = sorted(fs.glob(inner + ".tmp-*.old"))
    if not aside:
        return None
    fs.mv(aside[-1], inner, recursive=True)
    print(f"note: {final} was being replaced when a run stopped: restored it from {aside[-1]}")
    return aside[-1]


def exchange(first: str, second: str) -> bool:
    """Swap two existing local paths in one atomic step; False where the system cannot.

    Linux's ``renameat2(RENAME_EXCHANGE)`` (glibc 2.28+; local filesystems such as ext4, xfs,
    btrfs and tmpfs) is the only way to replace a directory atomically; Python's ``os`` module
    does not wrap it, hence ctypes.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange):
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False  # this filesystem cannot exchange: fall back to two renames
        raise OSError(code, os.strerror(code), first, None, second)
    return True


def replace(tmp: str, final: str) -> None:
    """Move ``tmp`` to ``final``, replacing what is there."""
    if not is_url(final):
        tmp_local, final_local = _local(tmp), _local(final)
        if os.path.isdir(final_local):
            if exchange(tmp_local, final_local):
                # The final path held the old store until this instant and the new one since;
                # the old one, now at the temporary name, is removed (or, after a kill, by the
                # next run's clean-up of temporaries).
                shutil.rmtree(tmp_local, ignore_errors=True)
                return
            # No exchange here: move the old store aside first, so that a kill between the two
            # renames leaves it complete for :func:`restore_swapped_out` to put back.
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


def remove_zarr_temporaries(store: str | os.PathLike) -> int:
    """Remove the files a killed chunk write of zarr's local store leaves in ``store``.

    zarr writes each chunk to ``<key>.<uuid hex>.partial`` and renames it into place; a kill
    in between leaves that file, which a resumed store would otherwise keep for good (it is
    rewritten, not deleted, by the resumed run). Returns how many were removed; fsspec URLs
    have no such files (one PUT per chunk).
    """
    if is_url(store):
        return 0
    leftovers = [p for p in Path(_local(str(store))).rglob("*.partial") if p.is_file()]
    for leftover in leftovers:
        leftover.unlink()
    return len(leftovers)


def _local(path: str) -> str:
    return str(path)[len("file://") :] if str(path).startswith("file://") else str(path)


@contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path; on success move it to ``final``, on failure delete it.

    Temporaries of earlier killed runs are removed first, so a re-run redoes the work. Every
    artifact (zarr store, NetCDF, checkpoint, JSON) is committed through :func:`replace` here or
    in :func:`write_text`; a full or read-only disk becomes one :class:`DiskWriteError` naming
    ``final``, with the temporary removed.
    """
    final = str(final).rstrip("/")
    with writing(final):
        restore_swapped_out(final)
        for stale in stale_temporaries(final):
            remove(stale)
        if not is_url(final):
            Path(_local(final)).parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(final)
        try:
            yield tmp
            replace(tmp, final)
        except BaseException as err:
            explained = disk_write_error(err, final) if isinstance(err, Exception) else None
            remove(tmp)
            if explained is not None and explained is not err:
                raise explained from err
            raise


def atomic_write_file(final: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename to ``final`` (for checkpoints, NetCDF, JSON)."""
    with atomic_path(final) as tmp:
        write(tmp)


class StoreLockedError(ConfigError):
    """Another process holds the lock of a store (exit code 3 on the command line)."""

    exit_code = 3


def _lock_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


def _alive_here(holder: dict) -> bool:
    """Whether the lock holder may still run: True unless it is a dead pid of this host."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True  # another host's process cannot be checked from here
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _create_exclusive(path: str, text: str) -> bool:
    """Create ``path`` holding ``text`` only if it does not exist; False if it does."""
    if not is_url(path):
        try:
            fd = os.open(_local(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    fs, inner = filesystem(path)
    try:
        # Exclusive create where the filesystem has it (local, memory, GCS, recent S3); object
        # stores without conditional writes fall back to check-then-write, which leaves a short
        # race between two starts - the best such a store allows.
        with fs.open(inner, "xb") as f:
            f.write(text.encode())
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):
        if fs.exists(inner):
            return False
        fs.pipe(inner, text.encode())
        return True


#: Seconds after which a lock file with no readable holder is stale: a live process writes its
#: host and pid right after creating the file.
EMPTY_LOCK_STALE_SECONDS = 60


def _age_seconds(path: str) -> float | None:
    """Seconds since ``path`` was last modified; None where the filesystem does not say."""
    if not is_url(path):
        try:
            return time.time() - os.stat(_local(path)).st_mtime
        except OSError:
            return None
    fs, inner = filesystem(path)
    try:
        modified = fs.modified(inner)
    except (FileNotFoundError, NotImplementedError, OSError):
        return None
    return time.time() - modified.timestamp()


@contextmanager
def exclusive_lock(path: str | os.PathLike):
    """Hold a lock file (``O_CREAT | O_EXCL``, host and pid inside) for the block.

    A lock is stale, and taken over with a note naming its holder, when its holder is a pid of
    this host that no longer exists, or when it has no readable holder and is older than
    :data:`EMPTY_LOCK_STALE_SECONDS`.

    Raises
    ------
    StoreLockedError
        If another live process holds the lock (one line naming the file and the holder).
    """
    path = str(path)
    created = []  # folders made for the lock, removed again if the run leaves them empty
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
    text = json.dumps(me)
    for _ in range(3):
        with writing(path):  # the lock is a run's first write: a read-only folder shows here
            if not is_url(path):
                for folder in reversed(Path(_local(path)).parents):
                    try:
                        folder.mkdir()
                        created.append(folder)
                    except FileExistsError:
                        pass
            taken = _create_exclusive(path, text)
        if taken:
            break
        holder = _lock_holder(read_text(path) or "")
        if holder and not _alive_here(holder):
            print(
                f"note: taking over {path}: its holder, host {holder['host']} pid "
                f"{holder['pid']}, is gone",
                file=sys.stderr,
            )
            remove(path)  # stale: its process is gone; retry the exclusive create
            continue
        age = _age_seconds(path)
        if not holder and age is not None and age > EMPTY_LOCK_STALE_SECONDS:
            # An empty or unreadable lock: its writer died between creating and writing it (a
            # live one writes within moments, hence the grace period).
            print(
                f"note: taking over {path}: empty or unreadable for {age:.0f} s",
                file=sys.stderr,
            )
            remove(path)
            continue
        if not holder:
            raise StoreLockedError(
                f"{path} names no holder yet (another process may be taking it; it counts as "
                f"stale after {EMPTY_LOCK_STALE_SECONDS} s): retry, or remove it if no other run "
                "is starting"
            )
        raise StoreLockedError(
            f"{path} is held by host {holder.get('host', '?')} pid {holder.get('pid', '?')} "
            f"since {holder.get('since', '?')}: another run is writing this store "
            "(remove the lock file if that process is gone)"
        )
    else:
        raise StoreLockedError(f"{path}: could not take the lock (it keeps reappearing)")
    try:
        yield path
    finally:
        if _lock_holder(read_text(path) or "").get("pid") == os.getpid():
            remove(path)
        for folder in reversed(created):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file so that it is either absent or complete (:func:`atomic_path`; on
    object storage one PUT, which is atomic there)."""
    path = str(path)
    if is_url(path):
        fs, inner = filesystem(path)
        with writing(path):
            fs.pipe(inner, text.encode())
        return
    with atomic_path(path) as tmp:
        with open(_local(tmp), "w") as f:
            f.write(text)


def read_text(path: str | os.PathLike) -> str | None:
    """Contents of a small text file, or None if it does not exist."""
    fs, inner = filesystem(str(path))
    try:
        return fs.cat(inner).decode(errors="replace")
    except FileNotFoundError:
        return None


def list_names(path: str | os.PathLike) -> list[str]:
    """Base names of the entries of a directory (empty if it does not exist)."""
    fs, inner = filesystem(str(path))
    if not fs.exists(inner):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False))


def link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` hold the bytes of ``src`` without copying them where possible.

    On local disk a hard link shares the file (zarr's local store replaces files rather than
    writing into them, so later writes to either path never reach the other); on object
    storage a server-side copy is the nearest thing.
    """
    if not is_url(dst):
        Path(_local(dst)).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(_local(src), _local(dst))
        except FileExistsError:
            pass
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(_local(src), _local(dst))
        return
    fs, src_inner = filesystem(src)
    _, dst_inner = filesystem(dst)
    fs.copy(src_inner, dst_inner)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the disk that would hold ``path`` (None for fsspec URLs)."""
    if is_url(path):
        return None
    probe = Path(_local(str(path))).absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
