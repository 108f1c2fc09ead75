"""The command line itself: help for every stage, --params in both spellings, one-line user errors."""

from __future__ import annotations

import pytest

from mammoseg.cli import STAGES, main
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_help_renders(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mammoseg" in capsys.readouterr().out


@pytest.mark.parametrize("spelling", ["separate", "joined"])
def test_params_file_is_read_in_both_spellings(spelling, tmp_path, capsys):
    missing = tmp_path / "nowhere.yaml"
    args = ["--params", str(missing)] if spelling == "separate" else [f"--params={missing}"]
    code = main([*args, "preprocess", "--inbreast", "i", "--manifest", "m.parquet", "--masks", "m", "--dataset-out",
                 str(tmp_path / "d")])
    assert code == 2
    assert f"{missing}: params file not found" in capsys.readouterr().err
    custom = tmp_path / "params.yaml"
    custom.write_text((REPO_ROOT / "params.yaml").read_text().replace("  size: 256", "  size: 384"))
    with pytest.raises(SystemExit):
        main([*(["--params", str(custom)] if spelling == "separate" else [f"--params={custom}"]), "preprocess",
              "--help"])
    assert "default: 384" in capsys.readouterr().out
