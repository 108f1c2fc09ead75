"""Small file helpers shared by the stages: atomic writes and content digests."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mammoseg.errors import UserError


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file through a temporary sibling and rename it into place.

    A crash leaves either the old file or the new one, never half a file.

    Args:
        path: the file to (re)write.
        write: called with the temporary path; must write the whole file there.

    Raises:
        UserError: the disk is full (the file is named; an existing file at path is kept).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # A full disk is the user's to fix, and says so in one line naming the file; torch.save reports
        # it as a RuntimeError from its C++ writer ("iostream error"), so the free space decides there.
        free = _free_bytes(path.parent)
        if _out_of_space(exc, free):
            left = "" if free is None else f" ({free >> 20} MiB free)"
            raise UserError(f"{path}: no space left on its device{left}; the previous file, if any, "
                            "is unchanged") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


# Below this, a write that failed without saying why (torch's C++ writer) is taken for a full disk.
_NEARLY_FULL_BYTES = 64 << 20


def _free_bytes(folder: Path) -> int | None:
    """Free bytes on folder's filesystem, or None when that cannot be read."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _out_of_space(exc: BaseException, free: int | None) -> bool:
    """Whether a failed write ran out of disk: ENOSPC/EDQUOT, or an unspecific error on a nearly full disk."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return free is not None and free < _NEARLY_FULL_BYTES


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def staging_folder(target: Path) -> Path:
    """Create an empty staging folder beside target, with the permissions a plain mkdir would give.

    tempfile.mkdtemp makes the folder 0700; renamed into place, that would lock the group that runs
    the next stage out of the output. The usual mode (0777 less the umask) is restored here.

    Args:
        target: the folder the staging folder will later replace (its parent must exist).

    Returns:
        The new folder, on target's filesystem so replace_folder can rename it into place.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def replace_folder(staging: Path, target: Path) -> None:
    """Put a fully written staging folder where target is.

    The old target is renamed aside before the new one takes its name and deleted only afterwards,
    so at every moment either the old or the new folder is complete.

    Args:
        staging: the new folder, on the same filesystem as target.
        target: the folder to replace (may not exist yet).
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
