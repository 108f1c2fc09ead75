"""The command line itself: help for every stage, --params in both spellings, one-line user errors, no kfp."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

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
    custom.write_text(re.sub(r"(?m)^  size: \d+$", "  size: 384", (REPO_ROOT / "params.yaml").read_text(), count=1))
    with pytest.raises(SystemExit):
        main([*(["--params", str(custom)] if spelling == "separate" else [f"--params={custom}"]), "preprocess",
              "--help"])
    assert "default: 384" in capsys.readouterr().out



def test_a_negative_worker_count_is_a_one_line_error(tmp_path, capsys):
    custom = tmp_path / "params.yaml"
    custom.write_text(re.sub(r"(?m)^  workers: \d+( .*)?$", "  workers: -1", (REPO_ROOT / "params.yaml").read_text(),
                             count=1))
    code = main(["--params", str(custom), "ingest", "--inbreast", str(tmp_path), "--manifest-out",
                 str(tmp_path / "m" / "manifest.parquet"), "--masks-out", str(tmp_path / "masks")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{custom}: ingest.workers is -1; must be >= 0" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "masks").exists()

# What only the pipeline's own command (pipelines/, the `pipeline` extra) may import.
ORCHESTRATION = {"kfp", "kfp_server_api", "pipelines", "components"}


def _imported_packages(path: Path) -> set[str]:
    """Top-level names of every module a file imports, anywhere in its body (lazy imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
              and not node.level}
    return {name.split(".")[0] for name in names}


def test_the_core_never_imports_orchestration():
    """A stage image has no kfp: mammoseg and model must run without it (and without pipelines/)."""
    files = sorted([*(REPO_ROOT / "mammoseg").rglob("*.py"), *(REPO_ROOT / "model").rglob("*.py")])
    assert len(files) > 20
    offenders = {file.relative_to(REPO_ROOT).as_posix(): sorted(_imported_packages(file) & ORCHESTRATION)
                 for file in files if _imported_packages(file) & ORCHESTRATION}
    assert offenders == {}
    # And at run time, with kfp unimportable: every stage's help renders; the pipeline is another command.
    for argv, code, says in [*(([stage, "--help"], 0, f"usage: mammoseg {stage}") for stage in STAGES),
                             (["pipeline", "compile"], 2, "invalid choice: 'pipeline'")]:
        proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['kfp'] = None; "
                               f"from mammoseg.cli import main; sys.exit(main({argv!r}))"],
                              capture_output=True, text=True, cwd=REPO_ROOT, check=False)
        assert proc.returncode == code and says in proc.stdout + proc.stderr, (argv, proc.stderr[-2000:])
