"""Writing files safely: atomically, with normal permissions, through symlinks, cleaning up after crashes.

Every file the project writes (maps, LoRA exports, sweep grids) goes through ``atomic_write``, so a
reader sees the old file or the new one, never a partial one, and an interrupt (KeyboardInterrupt
included) leaves the old file in place.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ACTInputError

_DEFAULT_MODE = 0o666  # before the umask, as open() creates files


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
    * The new file keeps the mode of the file it replaces, or gets the normal ``0o666 & ~umask``
      (0644 under the usual umask), not the 0600 of a temporary file.
    * Writing onto a symlink replaces the file it points to and keeps the link.
    * Temporary files left by an earlier crashed write of the same name are removed first.
    """
    destination = resolve_destination(path)
    if not destination.parent.is_dir():
        raise ACTInputError(
            f"Cannot write {str(path)!r}: folder {str(destination.parent)!r} does not exist. Create it first."
        )
    if destination.is_dir():
        raise ACTInputError(f"Cannot write {str(path)!r}: it is a folder. Give a file name.")
    if not os.access(destination.parent, os.W_OK):
        raise ACTInputError(
            f"Cannot write {str(path)!r}: folder {str(destination.parent)!r} is not writable. "
            "Choose another output folder or fix its permissions."
        )
    try:
        mode = stat.S_IMODE(destination.stat().st_mode)
    except FileNotFoundError:
        mode = _DEFAULT_MODE & ~_umask()
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return destination


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
