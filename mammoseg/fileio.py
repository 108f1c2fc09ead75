"""Small file helpers shared by the stages: atomic writes and content digests."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file through a temporary sibling and rename it into place.

    A crash leaves either the old file or the new one, never half a file.

    Args:
        path: the file to (re)write.
        write: called with the temporary path; must write the whole file there.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
