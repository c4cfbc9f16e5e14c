"""Writing files safely: atomically, with normal permissions, through symlinks, cleaning up after crashes.

Every file the project writes (maps, LoRA exports, sweep grids) goes through ``atomic_write``, so a
reader sees the old file or the new one, never a partial one, and an interrupt (KeyboardInterrupt
included) leaves the old file in place.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ACTError, ACTInputError

_DEFAULT_MODE = 0o666  # before the umask, as open() creates files
_OS_ERROR_NUMBER = re.compile(r"os error (\d+)")
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class ACTFileWriteError(ACTError, OSError):
    """A file could not be written (disk full, quota, I/O error); the old file, if any, is unchanged."""


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_destination(path: str | os.PathLike, what: str = "") -> Path:
    """The regular file a write to ``path`` replaces (a symlink's target), or ``ACTInputError``.

    An existing destination must be a regular file: renaming over a FIFO, a device, a socket or a folder
    (or a symlink to one, such as a link to /dev/null) would replace it with a regular file. A symlink to
    a regular file, or a dangling one, is followed (the link survives). ``what`` prefixes the message.
    """
    path = Path(path)
    prefix = f"{what}: cannot write" if what else "Cannot write"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as error:
        raise ACTInputError(f"{prefix} {str(path)!r}: {error.strerror or error}.") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise ACTInputError(f"{prefix} {str(path)!r}: it is a folder. Give a file name.")
    if not stat.S_ISLNK(mode):
        raise ACTInputError(
            f"{prefix} {str(path)!r}: it is {_kind(mode)}, not a regular file, and writing would replace it. "
            "Choose a regular file path."
        )
    target = Path(os.path.realpath(path))
    try:
        target_mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target  # a dangling link: the new file is created where it points
    except OSError as error:
        raise ACTInputError(
            f"{prefix} {str(path)!r}: it is a symlink to {str(target)!r}, which cannot be checked "
            f"({error.strerror or error}). Choose a regular file path."
        ) from None
    if not stat.S_ISREG(target_mode):
        raise ACTInputError(
            f"{prefix} {str(path)!r}: it is a symlink to {str(target)!r}, which is {_kind(target_mode)}, not "
            "a regular file, and writing would replace it. Choose a regular file path."
        )
    return target


def _write_failure(path: str | os.PathLike, error: BaseException, existed: bool) -> ACTFileWriteError:
    """The one-line error for a write that failed on the disk (``OSError`` or safetensors' own error)."""
    number = error.errno if isinstance(error, OSError) else None
    if number is None:
        match = _OS_ERROR_NUMBER.search(str(error))
        number = int(match.group(1)) if match else None
    if number is not None:
        reason = os.strerror(number).lower()
    else:
        reason = (getattr(error, "strerror", None) or str(error) or type(error).__name__).rstrip(".")
    if number in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free some space or choose another folder, then try again."
    else:
        fix = "Check the disk and the folder, then try again."
    kept = "The old file is intact." if existed else "No file was written."
    failure = ACTFileWriteError(f"Could not write {str(path)!r}: {reason}. {kept} {fix}")
    failure.errno = number
    return failure


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[^/]*\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process) or cannot tell: keep its file
    return True


def clean_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files that an earlier, crashed write of ``path`` left beside it.

    Temporary names carry the writer's process id, so only files of processes that no longer run are
    removed; a concurrent writer's file is left alone.
    """
    path = Path(path)
    pattern = _temp_pattern(path.name)
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and not _alive(int(match.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def resolve_destination(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` should replace: a symlink's target (so the link survives)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    * The rename is atomic on POSIX and Windows; on any error or interrupt the temporary file is removed.
    * A destination that exists but is not a regular file (a FIFO, a device, a folder, or a symlink to
      one) is refused (``ACTInputError``) rather than replaced.
    * A write that fails on the disk (full, quota, I/O error; ``OSError`` or safetensors' error) raises
      ``ACTFileWriteError`` saying why; the old file is left as it was.
    * The new file keeps the mode of the file it replaces, or gets the normal ``0o666 & ~umask``
      (0644 under the usual umask), not the 0600 of a temporary file.
    * Writing onto a symlink replaces the file it points to and keeps the link.
    * Temporary files left by an earlier crashed write of the same name are removed first.
    """
    destination = check_destination(path)
    if not destination.parent.is_dir():
        raise ACTInputError(
            f"Cannot write {str(path)!r}: folder {str(destination.parent)!r} does not exist. Create it first."
        )
    if not os.access(destination.parent, os.W_OK):
        raise ACTInputError(
            f"Cannot write {str(path)!r}: folder {str(destination.parent)!r} is not writable. "
            "Choose another output folder or fix its permissions."
        )
    try:
        mode = stat.S_IMODE(destination.stat().st_mode)
        existed = True
    except FileNotFoundError:
        mode = _DEFAULT_MODE & ~_umask()
        existed = False
    clean_stale_temp_files(destination)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=_temp_prefix(destination.name), suffix=".tmp", dir=destination.parent
        )
    except OSError as error:
        raise ACTInputError(
            f"Cannot write {str(path)!r}: {error.strerror or error}. Check the folder and the name's length."
        ) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, destination)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if (isinstance(error, OSError) and not isinstance(error, ACTError)) or _is_safetensors_error(error):
            raise _write_failure(path, error, existed) from error
        raise
    return destination


def _is_safetensors_error(error: BaseException) -> bool:
    return type(error).__name__ == "SafetensorError"


def check_writable_output(path: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> Path:
    """Check, before any expensive work, that ``path`` can be written: suffix, folder, permissions, name.

    ``suffixes`` are lower-case (".safetensors"); the check is exact, so ``x.SAFETENSORS`` is refused with
    a message that names the expected suffix. Returns the path to pass to ``atomic_write``.
    """
    path = Path(path).expanduser()
    if path.suffix not in suffixes:
        hint = (
            f" (it must be lower case: {path.stem}{suffixes[0]})" if path.suffix.lower() in suffixes else ""
        )
        raise ACTInputError(f"{what} must end in {' or '.join(suffixes)}; got {path.name!r}{hint}.")
    destination = resolve_destination(path)
    if destination.is_dir():
        raise ACTInputError(f"{what} {str(path)!r} is a folder; give a file name ending in {suffixes[0]}.")
    destination = check_destination(path, what)
    if not destination.parent.is_dir():
        raise ACTInputError(f"{what}: folder {str(destination.parent)!r} does not exist. Create it first.")
    if not os.access(destination.parent, os.W_OK):
        raise ACTInputError(
            f"{what}: folder {str(destination.parent)!r} is not writable. Choose another folder or fix its "
            "permissions."
        )
    limit = os.pathconf(destination.parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    # The temporary file is ".<name>.<pid>.<random>.tmp": leave room for it.
    if len(destination.name.encode()) + 24 > limit:
        raise ACTInputError(
            f"{what}: the file name is too long ({len(destination.name)} characters; at most about "
            f"{limit - 24} here). Choose a shorter name."
        )
    return path
