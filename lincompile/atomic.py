"""Atomic writes: a reader sees the old directory (or file) or the complete new one, never a half.

Used for saved models, ONNX exports, the asset cache and single result files. A failure deletes the
partial temp directory (or file) and leaves any previous `target` exactly as it was.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from lincompile.diagnostics import warn


def _exchange(source: Path, target: Path) -> bool:
    """Swap two existing paths in one step (Linux's renameat2 with RENAME_EXCHANGE): at no moment is `target`
    missing. False where the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # a C library without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if renameat2(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def replace_directory(source: Path, target: Path) -> None:
    """Move `source` to `target`, swapping out (and then deleting) an existing `target`: in one step where the
    system can; else in two renames, whose gap a crash may hit (`atomic_directory` puts the old one back then)."""
    if not target.exists():
        os.replace(source, target)
        return
    if _exchange(source, target):
        _remove(source)  # now the old directory
        return
    old = _old(target)
    _remove(old)
    os.replace(target, old)
    try:
        os.replace(source, target)
    except BaseException:
        if old.exists() and not target.exists():  # (another writer's recovery may have put it back already)
            os.replace(old, target)
        raise
    _remove(old)


def _old(target: Path) -> Path:
    """Where a two-rename swap parks the old `target` until the new one is in place."""
    return target.with_name(f".{target.name}.old")


def _recover(target: Path) -> None:
    """Put back the old `target` a crash left parked between the two renames of a swap (nothing else did), or
    delete it when the crash came after the new one was in place; and name the temp directories crashed writes left
    beside `target` (another process may be writing them: not deleted)."""
    old = _old(target)
    if target.exists() and (old.exists() or old.is_symlink()):
        _remove(old)
    elif old.is_dir() and not old.is_symlink():
        os.replace(old, target)
        warn(f"{target}: put back the previous directory, which an interrupted write had left as {old.name}")
    stale = sorted(p.name for p in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"))
    if stale:
        warn(f"{target.parent} holds {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}: left by writes of "
             f"{target.name} that were interrupted (or running now); delete them when no other process writes it")


def _remove(path: Path) -> None:
    """Delete a leftover of a crashed swap, whatever it is (a directory, a file, a link); gone already is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it twice would briefly give
    other threads' files 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shareable(directory: Path) -> None:
    """The permissions a plain `mkdir` or `open` would give a finished temp directory and what it holds (the
    umask applied: 0755 directories, 0644 files under the usual 022): mkdtemp makes the directory private, and
    some writers (safetensors) their files."""
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _check_not_current(target: Path) -> None:
    """Refuse replacing `target` (resolved) when it is the current directory or holds it."""
    if Path.cwd().is_relative_to(target):
        raise ValueError(f"{target} is the current directory or holds it; replacing it would pull it from under "
                         "this process: write to a new directory inside it, or elsewhere")


def check_not_inside(target: str | os.PathLike[str], *sources: str | os.PathLike[str] | None) -> None:
    """Refuse a `target` directory that is, or holds, one of the `sources` a command reads (writing it would replace
    them), or the current directory; sources that are not existing paths (model names) are ignored. Commands that
    replace `target` whole call it before long work."""
    where = Path(target).expanduser().resolve()  # through symlinks, to what would be replaced
    _check_not_current(where)
    for source in sources:
        path = Path(source).expanduser() if source is not None else None
        if path is not None and path.exists() and path.resolve().is_relative_to(where):
            raise ValueError(f"{target} holds {source}, which this command reads; writing it would replace that: "
                             "write to another directory")


def check_replaceable(target: str | os.PathLike[str], marker: str, replaced: bool = True) -> None:
    """Raise FileExistsError when `target` is a file, or a non-empty directory without `marker` (so not one of this
    kind that lincompile wrote): replacing it would delete the user's files; and when it cannot be made, under a
    file or a directory this process cannot write, or (`replaced`: made beside it, then moved in; else written
    inside) cannot be written. Commands call it before long work."""
    target = Path(target)
    if not target.exists():
        ancestor = Path(os.path.realpath(target)).parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise FileExistsError(f"{ancestor} is a file, so {target} cannot be made there; write elsewhere")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise PermissionError(f"{ancestor} is not writable, so {target} cannot be made there; write elsewhere")
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} is a file; write to a new or empty directory")
    where = Path(os.path.realpath(target)).parent if replaced else target  # where the new files are made
    if not os.access(where, os.W_OK | os.X_OK):
        raise PermissionError(f"{where} is not writable, so {target} cannot be "
                              f"{'replaced' if replaced else 'written'}; write elsewhere")
    if any(target.iterdir()) and not (target / marker).exists():
        raise FileExistsError(f"{target} is not empty and holds no {marker}, so it is not a directory of this kind "
                              "that lincompile wrote; replacing it would delete its files: write to a new or empty "
                              "directory")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], marker: str | None) -> Iterator[Path]:
    """Yield an empty temp sibling `.<name>.tmp-*` of `target`; on clean exit it becomes `target`.

    `marker` is a file every directory of this kind holds. An existing `target` that is a file, or a non-empty
    directory without `marker` (so not written by lincompile), is refused with FileExistsError before anything
    is written: replacing it would delete the user's files. None (private caches only) replaces anything."""
    # "." or "out/.." has no name to put a sibling beside; a link is followed, so that what it points to is
    # replaced (replacing the link itself would leave the old files where the link pointed)
    target = Path(os.path.realpath(target))
    _check_not_current(target)
    if target.parent.is_dir():
        _recover(target)
    if marker is not None:
        check_replaceable(target, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        make_shareable(tmp)
        replace_directory(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(target: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write `data` (text, or bytes: a picture) to a unique temp sibling of `target`, then rename it into place (safe
    when several processes write the same file: each rename is whole). A link is followed: what it points to is
    replaced. Returns `target` as given."""
    given = Path(target)
    target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; `open` would apply the umask
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return given
