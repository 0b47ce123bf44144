"""Where results go: checks made before any work, atomic writes, and safe replacement of old outputs.

Every command that writes calls ``check_output_dir`` / ``check_output_file`` before it loads a model, so a
bad ``--out`` fails in milliseconds, not after the calibration. Writes then go to a hidden temp path in the
same folder (``.moeslim-tmp-<pid>-<random>``) and are renamed into place: a killed run leaves no
half-written checkpoint, and the next run removes temp folders whose process is gone.

``--overwrite`` replaces only what is recognisably a checkpoint (a folder with ``config.json``) or an empty
folder; never the working directory, a parent of it, or a folder that holds one of the run's inputs. The old
checkpoint is swapped out atomically (``renameat2(RENAME_EXCHANGE)`` where the OS has it, two renames
otherwise) and deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from moeslim.config import ConfigError

__all__ = [
    "OutputError",
    "atomic_dir",
    "check_output_dir",
    "check_output_file",
    "write_text_atomic",
]

_TMP_PREFIX = ".moeslim-tmp-"
_OLD_PREFIX = ".moeslim-old-"
_STALE = re.compile(rf"^({re.escape(_TMP_PREFIX)}|{re.escape(_OLD_PREFIX)})(\d+)-")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
CHECKPOINT_MARKER = "config.json"


class OutputError(ConfigError):
    """An output path that cannot (or must not) be written; the message names the path and the fix."""


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _check_writable(target: Path, shown: str) -> None:
    """The folder that will receive ``target`` exists or can be created, and we may write there."""
    anchor = _nearest_existing(target.parent)
    if not anchor.is_dir():
        raise OutputError(f"cannot write {shown}: {anchor} is a file, not a folder; choose another path")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {shown}: no write permission in {anchor}; choose another path")
    with contextlib.suppress(OSError):
        if os.statvfs(anchor).f_flag & os.ST_RDONLY:
            raise OutputError(f"cannot write {shown}: {anchor} is on a read-only file system")


def _check_names(path: Path, shown: str) -> None:
    """Every component fits the file system's name limit (checked first: stat() itself fails on longer names)."""
    name_max = 255
    with contextlib.suppress(OSError):
        name_max = os.pathconf(_nearest_existing_short(path), "PC_NAME_MAX")
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputError(f"cannot write {shown}: a name in it is longer than {name_max} bytes; "
                              "use a shorter name")


def _nearest_existing_short(path: Path) -> Path:
    for candidate in path.parents:
        if all(len(os.fsencode(part)) <= 255 for part in candidate.parts) and candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: Path) -> list[Path]:
    """Remove temp paths left in ``folder`` by killed moeslim processes; returns what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _STALE.match(entry.name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _protected(out: Path, inputs: Iterable[str | Path]) -> str | None:
    """Why ``out`` must never be replaced, or None."""
    cwd = Path.cwd().resolve()
    if _is_within(cwd, out):
        return "it is the working directory or one of its parents"
    home = Path.home().resolve()
    if out == home or out == Path(out.anchor or "/"):
        return "it is your home folder or the file system root"
    for given in inputs:
        source = _resolved(given)
        if _is_within(source, out):
            return f"it holds an input of this run ({given})"
    return None


def check_output_file(path: str | Path, *, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate a file output (plan JSON, result JSON) before any work; returns it, not resolved."""
    given = Path(path).expanduser()
    shown = str(path)
    _check_names(given, shown)
    if str(path) in ("", ".") or given.name in ("", ".", ".."):
        raise OutputError(f"--out {shown!r} is not a file name; give e.g. runs/plan.json")
    if given.is_symlink():
        raise OutputError(f"--out {shown} is a symbolic link; moeslim does not write through links, "
                          "give the real path")
    if given.is_dir():
        raise OutputError(f"--out {shown} is a folder; give a file path such as {given / 'plan.json'}")
    resolved = _resolved(given)
    for source in inputs:
        if resolved == _resolved(source):
            raise OutputError(f"--out {shown} is an input of this run; choose another file")
    _check_writable(resolved, shown)
    return given


def _looks_like_output(folder: Path) -> bool:
    return (folder / CHECKPOINT_MARKER).is_file() or not any(folder.iterdir())


def check_output_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate a checkpoint folder output before any work; removes stale temp folders beside it.

    Refuses: an existing ``out`` without ``overwrite``; with ``overwrite``, anything that is not a
    checkpoint folder (or empty), the working directory and its parents, home, the root, a folder that
    holds one of ``inputs``, and symbolic links.
    """
    given = Path(out).expanduser()
    shown = str(out)
    if str(out) == "":
        raise OutputError("--out is empty; give a folder such as runs/model")
    _check_names(given, shown)
    if given.is_symlink():
        raise OutputError(f"--out {shown} is a symbolic link; moeslim does not write through links, "
                          "give the real folder")
    resolved = _resolved(given)
    reason = _protected(resolved, inputs)
    if reason is not None:
        raise OutputError(f"--out {shown} cannot be written: {reason}; choose a new folder such as runs/model")
    if resolved.exists():
        if not resolved.is_dir():
            raise OutputError(f"--out {shown} is a file; give a folder path")
        if not overwrite:
            raise OutputError(f"--out {shown} already exists; choose another folder or pass --overwrite")
        if not _looks_like_output(resolved):
            raise OutputError(f"--out {shown} exists and is not a checkpoint folder (no {CHECKPOINT_MARKER}); "
                              "--overwrite only replaces checkpoints, so move it away or choose another folder")
    _check_writable(resolved, shown)
    clean_stale(resolved.parent)
    return given


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the OS cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _usual_modes(root: Path) -> None:
    """Give every file and folder under ``root`` the mode a plain ``open`` / ``mkdir`` would (0o666 / 0o777 & ~umask).

    Some writers create their file as a 0600 temp file and rename it (safetensors 0.8 ``save_file``, so
    ``save_pretrained``'s ``model.safetensors``): left so, a server running as another user could read the
    config but not the weights.
    """
    mask = _umask()
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _place(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``; an existing ``out`` is swapped out, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old checkpoint
        return
    old = out.parent / f"{_OLD_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``out``; on success fsync it and put it in place of ``out``.

    Errors name ``out``, not the hidden temp folder. On any error the temp folder is removed and an old
    ``out`` is left as it was.
    """
    given = check_output_dir(out, overwrite=overwrite, inputs=inputs)
    target = _resolved(given)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_TMP_PREFIX}{os.getpid()}-"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the checkpoint gets the user's usual permissions
    try:
        try:
            yield tmp
            _usual_modes(tmp)
            _fsync_tree(tmp)
            _place(tmp, target)
        except OSError as err:
            detail = err.strerror or str(err)
            raise OSError(err.errno, f"cannot write {out}: {detail}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str, *, inputs: Iterable[str | Path] = ()) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    given = check_output_file(path, inputs=inputs)
    target = _resolved(given)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{_TMP_PREFIX}{os.getpid()}-")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return given
