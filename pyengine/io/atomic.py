"""Atomic writes: a file goes through a temp file in the target folder and a rename, and a
directory (a saved model) through a temporary sibling directory that is swapped in as a unit,
so a crash never leaves half a model, result or plot behind, and a reader sees the old
contents or the new ones, never a mix."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["write_bytes", "write_text", "write_json", "save_figure", "replace_directory",
           "write_synced", "fsync_dir", "cleanup_stale", "wait_for_writer", "output_file"]


def output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """``path`` as a file to write: a clear error when it is an existing directory."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} {p} is a directory; give a file name")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what} {p}: {parent} is a file, not a directory")
            break
    return p


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a new file and fsync it (inside a directory not yet visible)."""
    p = Path(path)
    with open(p, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return p


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    p = output_file(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)
    return p


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """``fig.savefig`` through a temp file with the same suffix (matplotlib picks the format
    from it)."""
    p = output_file(path, "plot")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.tmp{p.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, p)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return p


# ---------------------------------------------------------------------------- directories
# A writer fills ".NAME.pyengine-new-PID-TOKEN" beside NAME and swaps it in; the previous
# directory then lives under the temporary name until it is removed. Without an atomic
# exchange the previous one is first renamed to ".NAME.pyengine-old-PID-TOKEN".
_TEMP = re.compile(r"^\.(?P<name>.+)\.pyengine-(?P<kind>new|old)-(?P<pid>\d+)-[0-9a-f]+$")
_RENAME_EXCHANGE = 2  # linux/fs.h


def _temp_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.pyengine-{kind}-{os.getpid()}-"
                            f"{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _temps(target: Path) -> list[tuple[str, int, Path]]:
    """``(kind, pid, path)`` of the temporaries of ``target`` lying beside it."""
    out = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return out
    for p in entries:
        m = _TEMP.match(p.name)
        if m and m.group("name") == target.name:
            out.append((m.group("kind"), int(m.group("pid")), p))
    return out


def cleanup_stale(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that writers killed mid-save left beside ``directory``; if one
    was killed between the two renames of a non-atomic swap (``directory`` missing), put the
    previous directory back first. Temporaries of live writers are left alone. Best effort
    (a read-only parent is fine); returns what was removed or restored."""
    target = Path(directory)
    done = []
    stale = [(k, pid, p) for k, pid, p in _temps(target) if not _alive(pid)]
    for kind, _, p in sorted(stale, key=lambda t: t[0] != "old"):  # restore before removing
        try:
            if kind == "old" and not os.path.lexists(target):
                os.rename(p, target)
            else:
                shutil.rmtree(p)
            done.append(p)
        except OSError:
            pass
    if done:
        fsync_dir(target.parent)
    return done


def wait_for_writer(directory: str | os.PathLike, timeout: float = 5.0) -> None:
    """When ``directory`` is missing because a live writer is between the two renames of a
    non-atomic swap, wait (up to ``timeout`` s) until it is back."""
    target = Path(directory)
    t_end = time.monotonic() + timeout
    while not os.path.lexists(target) and time.monotonic() < t_end:
        if not any(k == "old" and _alive(pid) for k, pid, _ in _temps(target)):
            return
        time.sleep(0.02)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # this kernel / file system cannot exchange
    raise OSError(err, f"cannot swap {b} into place: {os.strerror(err)}", str(b))


def _link_tree(src: Path, dst: Path) -> None:
    """Recreate ``src`` at ``dst``: directories made, files hard-linked (copied where links
    are impossible), symlinks copied as links."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
        fsync_dir(dst)
    elif src.is_file():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _target(directory: str | os.PathLike) -> Path:
    target = Path(directory)
    if target.is_symlink():
        target = target.resolve()  # swap the real directory, keep the link
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} is a file, not a directory")
    cwd = Path.cwd().resolve()
    real = target.resolve()
    if cwd == real or real in cwd.parents:
        raise ValueError(f"cannot replace {directory}: it is (or contains) the current "
                         "directory; write into a subdirectory")
    return target


@contextmanager
def replace_directory(directory: str | os.PathLike, carry: bool = True) -> Iterator[Path]:
    """Write a directory as a unit::

        with replace_directory("out/model") as tmp:
            write_synced(tmp / "a.bin", data)     # fill the temporary sibling directory

    On leaving the block the temporary directory is fsynced and swapped in with renames: every
    reader sees the previous directory or the complete new one. With ``carry``, entries of the
    previous directory that the block did not write (checkpoints, logs) are carried over as
    hard links. An exception leaves the previous directory as it was. Temporaries of killed
    writers are removed by the next :func:`replace_directory` or :func:`cleanup_stale`.
    """
    target = _target(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(target)
    if os.path.ismount(target):  # a mount point cannot be renamed: replace file by file
        warnings.warn(f"{target} is a mount point: its files are replaced one by one, not as "
                      "a unit", stacklevel=3)
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            yield Path(tmp)
            for p in sorted(Path(tmp).iterdir(), key=lambda p: p.name == "manifest.json"):
                os.replace(p, target / p.name)  # the manifest last
        fsync_dir(target)
        return
    tmp = _temp_name(target, "new")
    tmp.mkdir()
    try:
        yield tmp
        if carry and target.is_dir():
            for child in target.iterdir():
                if not os.path.lexists(tmp / child.name):
                    _link_tree(child, tmp / child.name)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # now the previous directory
        else:
            old = _temp_name(target, "old")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old)
    except BaseException:
        if os.path.lexists(target):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
