"""Exclusive per-target locks for builds that replace a folder (an index, a dataset).

Two builds of one target at the same time would share work folders and replace each
other's output. :func:`exclusive` takes an OS file lock (``filelock``: ``flock`` on POSIX)
on a small lock file *beside* the target (``index/.<name>.lock``, never inside the output
folder) and fails at once when another process holds it; the process id of the holder is
written to ``<lock>.pid`` so that the refusal can name it. The OS drops the lock when the
holder exits or crashes; a stale ``.pid`` file left by a crash is simply overwritten by the
next holder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from cmpc.errors import CmpcError


class BusyError(CmpcError):
    """Another process is building the same target right now."""


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of a folder ``target``: ``<parent>/.<name>.lock`` (beside it, hidden;
    absolute, so that every spelling of one folder gives one lock)."""
    t = Path(os.path.abspath(target))
    return t.parent / f".{t.name}.lock"


def pid_path(lock: str | os.PathLike[str]) -> Path:
    """The file beside ``lock`` that holds the process id of the lock's holder."""
    p = Path(lock)
    return p.with_name(p.name + ".pid")


def holder_pid(lock: str | os.PathLike[str]) -> int | None:
    """The process id written by the holder of ``lock``; None when unknown."""
    try:
        return int(pid_path(lock).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike[str], what: str = "index build", target: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock ``lock`` for the duration of the block (non-blocking).

    Raises :class:`BusyError` (one line naming the holder's process id) when another process
    holds it. ``what`` names the operation and ``target`` the folder being built, for the
    message. The lock's folder is created when missing. Yields the lock path.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fl = FileLock(str(lock))
    try:
        fl.acquire(timeout=0)
    except Timeout:
        pid = holder_pid(lock)
        who = f"process {pid}" if pid is not None else "another process (process id unknown)"
        on = f" of {target}" if target is not None else ""
        raise BusyError(
            f"another {what}{on} is running ({who}, lock {lock}); wait for it to finish or stop it, then run again"
        ) from None
    try:
        pp = pid_path(lock)
        tmp = pp.with_name(f"{pp.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{os.getpid()}\n", encoding="ascii")
        os.replace(tmp, pp)  # whole or absent: a reader never sees half a pid
        try:
            yield lock
        finally:
            with contextlib.suppress(OSError):
                if holder_pid(lock) == os.getpid():
                    pp.unlink()
    finally:
        fl.release()


def discard(lock: str | os.PathLike[str]) -> None:
    """Remove a released lock file and its pid file (only for a folder the caller created and
    is about to remove again; a lock file normally stays, as removing it could race)."""
    for p in (Path(lock), pid_path(lock)):
        with contextlib.suppress(OSError):
            p.unlink()
