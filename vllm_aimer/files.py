"""Writing files so that a reader never sees a half-written one (no package imports:
the API server's side of the worker channel uses it too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vllm_aimer.errors import AimerError

__all__ = ["atomic_write_text", "atomic_write_bytes", "ensure_writable_dir"]


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, then
    rename it over `path`: readers see the old file or the new one, never a part.

    Args:
        path: the file to (re)write; its directory must exist.
        data: the whole content.

    Raises:
        OSError: the directory cannot be written (the temporary file is removed).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files; plans are meant to be shared (e.g. with a server
        # running as another user), so give them the usual umask-derived mode.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create `path` if needed and prove this process can write there, before any
    heavy work.

    Args:
        path: the directory.
        what: how the user named it (an option or flag), for the error.

    Returns:
        The directory as a Path.

    Raises:
        AimerError: it cannot be created or written.
    """
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".aimer-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise AimerError(f"{what} directory {str(path)!r} is not writable ({e.strerror or e}).",
                         f"pass a {what} directory that this process can create and write.") from None
    return directory
