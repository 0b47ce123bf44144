"""Where results go: checks made before any work, atomic writes, and safe replacement of old outputs.

Every command that writes calls ``check_output_dir`` / ``check_output_file`` before it loads a model, so a
bad ``--out`` fails in milliseconds, not after the calibration. Writes then go to a hidden temp path in the
same folder (``.moeslim-tmp-<pid>-<random>``) and are renamed into place: a killed run leaves no
half-written checkpoint, and the next run removes temp folders whose process is gone.

One rule for every output: an existing output is refused unless ``--overwrite``; an input of the run, or a
file or folder inside an input model folder, is never written, even with ``--overwrite``; no path is written
through a symbolic link (the output itself or any folder on the way to it). ``--overwrite`` replaces only
what is recognisably a checkpoint (a folder with ``config.json``) or an empty folder; never the working
directory, a parent of it, or a folder that holds one of the run's inputs. The old checkpoint is swapped out
atomically (``renameat2(RENAME_EXCHANGE)`` where the OS has it, two renames otherwise) and deleted only after
the new one is in place.

``output_lock`` makes two runs that write the same output exclude each other: the second fails at once
instead of silently replacing the first one's result.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from moeslim.config import ConfigError

__all__ = [
    "TMP_PREFIX",
    "OutputError",
    "atomic_dir",
    "atomic_file",
    "check_output_dir",
    "check_output_file",
    "output_lock",
    "temp_dir_beside",
    "write_text_atomic",
]

TMP_PREFIX = ".moeslim-tmp-"
_OLD_PREFIX = ".moeslim-old-"
_STALE = re.compile(rf"^({re.escape(TMP_PREFIX)}|{re.escape(_OLD_PREFIX)})(\d+)-")
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


def _check_no_links(path: Path, shown: str) -> None:
    """No component of ``path`` as given (the output or a folder on the way to it) is a symbolic link: the
    input checks compare real paths, and a link could lead the write into an input folder or elsewhere."""
    current = Path(path.anchor) if path.is_absolute() else Path()
    for part in path.parts[1:] if path.is_absolute() else path.parts:
        current = current / part
        if current.is_symlink():
            what = "is a symbolic link" if current == path else f"goes through the symbolic link {current}"
            raise OutputError(f"--out {shown} {what}; moeslim does not write through links, give the real path "
                              f"({_resolved(path)})")


def _inside_input(out: Path, inputs: Iterable[str | Path]) -> str | None:
    """Why ``out`` (resolved) is an input of the run or lies inside an input folder, or None."""
    for given in inputs:
        source = _resolved(given)
        if out == source:
            return f"it is an input of this run ({given})"
        if source.is_dir() and _is_within(out, source):
            return f"it is inside the input folder {given}, which moeslim never writes into"
    return None


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


def check_output_file(path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate a file output (plan JSON, result JSON, GGUF file) before any work; returns it, not resolved.

    Refuses an existing file unless ``overwrite``; never an input of the run or a file inside an input folder;
    no symbolic link on the way. Removes temp files that killed runs left beside it.
    """
    given = Path(path).expanduser()
    shown = str(path)
    _check_names(given, shown)
    if str(path) in ("", ".") or given.name in ("", ".", ".."):
        raise OutputError(f"--out {shown!r} is not a file name; give e.g. runs/plan.json")
    _check_no_links(given, shown)
    if given.is_dir():
        raise OutputError(f"--out {shown} is a folder; give a file path such as {given / 'plan.json'}")
    resolved = _resolved(given)
    reason = _inside_input(resolved, inputs)
    if reason is not None:
        raise OutputError(f"--out {shown} cannot be written: {reason}; choose another file")
    if resolved.exists() and not overwrite:
        raise OutputError(f"--out {shown} already exists; choose another file or pass --overwrite to replace it")
    _check_writable(resolved, shown)
    clean_stale(resolved.parent)
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
    _check_no_links(given, shown)
    resolved = _resolved(given)
    reason = _protected(resolved, inputs) or _inside_input(resolved, inputs)
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


def _lock_path(target: Path) -> Path:
    """One lock file per resolved output path, outside the user's folders (nothing to clean up beside --out)."""
    folder = Path(tempfile.gettempdir()) / f"moeslim-locks-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{hashlib.sha256(os.fsencode(target)).hexdigest()[:32]}.lock"


def _lock_owner(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the output ``out`` for the block; a second run that writes the same output
    fails at once with a clear error instead of racing this one (and one result being silently lost).

    Re-entrant within one process (the CLI holds it for the whole command; ``atomic_dir`` and
    ``write_text_atomic`` take it again). The lock is an ``flock`` on a file named by the output's real path
    in the temp folder, released by the kernel when the process dies: a killed run never leaves it held.
    """
    target = _resolved(out)
    lock = _lock_path(target)
    fd = _acquire(lock, out)
    if fd is None:  # this process already holds it (an outer block)
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _acquire(lock: Path, out: str | Path) -> int | None:
    """A descriptor holding ``lock``; None when this process holds it already; OutputError when another does."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = _lock_owner(lock)
            if owner == os.getpid():
                return None
            who = f" (pid {owner})" if owner is not None else ""
            raise OutputError(f"--out {out} is being written by another moeslim run{who}; wait for it to finish "
                              "or choose another --out") from None
        try:  # the previous holder may have unlinked the file between our open and flock: then retry
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def temp_dir_beside(target: str | Path) -> contextlib.AbstractContextManager[str]:
    """A temp folder in ``target``'s folder (same file system, so the result is renamed into place), named so
    that the next run removes it if this process is killed (``clean_stale``)."""
    parent = _resolved(target).parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=parent, prefix=f"{TMP_PREFIX}{os.getpid()}-")


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``out``; on success fsync it and put it in place of ``out``.

    Errors name ``out``, not the hidden temp folder. On any error the temp folder is removed and an old
    ``out`` is left as it was. ``out`` is locked (``output_lock``) from the check to the rename.
    """
    with output_lock(out):
        given = check_output_dir(out, overwrite=overwrite, inputs=inputs)
        target = _resolved(given)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TMP_PREFIX}{os.getpid()}-"))
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


@contextlib.contextmanager
def atomic_file(path: str | Path, *, overwrite: bool = True, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix, so writers that infer a format from it work); when the block
    succeeds, fsync it and rename it to ``path``. On any error the temp file is removed and ``path`` is untouched.

    ``overwrite`` defaults to True here: commands check their outputs (``check_output_file``) before any work,
    with the user's ``--overwrite``, and write at the end; this keeps the structural checks (links, inputs).
    """
    with output_lock(path):
        given = check_output_file(path, overwrite=overwrite, inputs=inputs)
        target = _resolved(given)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=target.suffix)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # a writer may have replaced it by its own 0600 temp file
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = True,
                      inputs: Iterable[str | Path] = ()) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename (``atomic_file``)."""
    with atomic_file(path, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path).expanduser()
