"""Atomic writes: a full disk is a one-line error naming the file, and the previous file survives."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mammoseg import fileio
from mammoseg.errors import UserError
from mammoseg.fileio import write_atomically


def _fill_disk(tmp: Path) -> None:
    tmp.write_bytes(b"half")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"good")
    with pytest.raises(UserError, match=r"checkpoint\.pt: no space left on its device"):
        write_atomically(target, _fill_disk)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_torch_saves_unspecific_error_on_a_nearly_full_disk_is_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.pt"

    def save_fails(tmp: Path) -> None:
        torch.save({"w": torch.zeros(1)}, tmp)
        # what torch.save said when the disk filled during a main job
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos; "
                           "basic_ios::clear: iostream error")

    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda _: SimpleNamespace(free=1 << 20))
    with pytest.raises(UserError, match=r"model\.pt: no space left"):
        write_atomically(target, save_fails)
    assert not target.exists()


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path: Path) -> None:
    def bug(tmp: Path) -> None:
        raise RuntimeError("a bug, not the disk")

    def denied(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "denied")

    with pytest.raises(RuntimeError, match="a bug"):
        write_atomically(tmp_path / "x.bin", bug)
    with pytest.raises(PermissionError):
        write_atomically(tmp_path / "y.bin", denied)
