"""Atomic file and directory writes.

Every product file is written to a temporary sibling and renamed into place, so an
interrupted or failed run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    Use for writers that want a file name (rasterio, h5py, faiss, torch.save). On error the
    temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.unlink()  # writers such as h5py/GDAL want to create the file themselves
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            if tmp_path.is_dir():
                shutil.rmtree(tmp_path, ignore_errors=True)
            else:
                tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def _pid_running(pid: int) -> bool:
    """True when a process ``pid`` exists on this machine (or cannot be checked)."""
    if os.name == "nt":  # os.kill(pid, 0) is not a probe on Windows: keep everything
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def remove_stale_partials(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed writers of ``path`` left beside it; return the removed paths.

    :func:`atomic_dir` builds ``path`` as ``.<name>.<pid>.<random>.partial`` and swaps an old
    ``path`` aside as ``.<name>.old-<pid>``. A run killed outright (SIGKILL, power loss) cannot
    clean up, so the next writer of the same ``path`` does: partial folders whose pid is not a
    running process, and partial folders of the older naming without a pid, are deleted; an
    ``old-<pid>`` folder of a dead process is put back when ``path`` itself is missing (the
    kill fell between the two renames), else deleted. Partials of running processes (another
    run writing the same folder right now) are left alone. Resumable build folders such as
    ``index/.<name>.building/`` do not match and stay.
    """
    path = Path(path)
    name = re.escape(path.name)
    partial = re.compile(rf"\.{name}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.partial")
    old = re.compile(rf"\.{name}\.old-(\d+)")
    removed: list[Path] = []
    try:
        siblings = sorted(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        if (m := partial.fullmatch(p.name)) and p.is_dir() and not p.is_symlink():
            if m.group(1) is not None and _pid_running(int(m.group(1))):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif (m := old.fullmatch(p.name)) and not _pid_running(int(m.group(1))):
            if not os.path.lexists(path):
                os.replace(p, path)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def check_out_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder to write: refused (one line) when it, or a folder above it, is a file."""
    from cmpc.errors import CmpcError

    path = Path(path)
    for p in (path, *path.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                what = "is a file" if p == path else f"lies under {p}, a file"
                raise CmpcError(f"output folder {path} {what}, not a folder; choose another output path")
            break
    return path


def _replace_entry(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst`` (file or folder), replacing what is there."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike[str],
    overwrite: bool = True,
    *,
    merge: bool = False,
    owned: Iterable[str] = (),
) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to ``path`` on success.

    On failure the temporary directory is removed and any existing ``path`` is untouched.
    With ``overwrite`` an existing ``path`` is replaced only after the new one is complete.
    The temporary folder is ``.<name>.<pid>.<random>.partial`` beside ``path``; ones left
    by killed runs are removed first (:func:`remove_stale_partials`).

    ``merge``: ``path`` is a folder other commands write into too (``reports/<name>/`` holds
    ``cmpc test``'s files and ``localize/``, ``translate/``, ...). Instead of replacing it,
    each entry of the finished temporary folder is renamed into ``path`` (created if
    needed); entries of ``path`` the run did not produce stay, except the names in
    ``owned`` (this command's products from an earlier run, e.g. a plot the new run no
    longer draws), which are removed so one folder never mixes two runs' outputs.
    """
    path = check_out_dir(path)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".partial", dir=path.parent))
    # mkdtemp makes the folder private (0700); a dataset or index is a normal folder (umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if merge:
            path.mkdir(exist_ok=True)
            produced = sorted(tmp.iterdir())
            for src in produced:
                _replace_entry(src, path / src.name)
            made = {p.name for p in produced}
            for name in owned:
                stale = path / name
                if name in made or not os.path.lexists(stale):
                    continue
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()
            tmp.rmdir()
        else:
            _replace_entry(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON record as a line (logs: a torn last line is skipped by readers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines log, skipping a torn last line."""
    out: list[dict[str, Any]] = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
