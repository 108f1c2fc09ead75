"""Data Docs render offline: validate's Great Expectations pages in headless Chromium with no network.

Chromium (Debian's `chromium`, which .ci/run installs) opens the pages from files with every host name
unresolvable, so a page that still needed a CDN would show its headings only: the index's tables are
filled by bootstrap-table's JavaScript and styled by Bootstrap's CSS, both of which must come from the
report folder itself.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mammoseg import data_docs
from mammoseg.stages import validate
from mammoseg.synth import IMAGE_SIZES, scaled_size
from tests.conftest import REPO_ROOT, stage_config_for

CHROMIUM = shutil.which("chromium")
# The flags a headless run in CI needs (no sandbox as root, no GPU, no background traffic) and a rule
# that makes every host name unresolvable: the page gets no network even where the machine has one.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,900", "--virtual-time-budget=5000")
# Runs in a copy of the page, after its own scripts: what a person would see, as JSON in the DOM.
PROBE = """<script>window.addEventListener("load", () => setTimeout(() => {
  const table = document.querySelector(".ge-index-page-validation-results-table");
  const box = table ? table.getBoundingClientRect() : {width: 0, height: 0};
  document.body.setAttribute("data-probe", JSON.stringify({
    rows: table ? table.querySelectorAll("tbody tr").length : 0, width: box.width, height: box.height,
    text: table ? table.innerText : "", font: getComputedStyle(document.body).fontFamily}));
}, 500));</script>"""
REMOTE_ASSET = re.compile(r"""<(?:script|img)\b[^>]*\bsrc=["']https?:|<link\b[^>]*stylesheet[^>]*\bhref=["']https?:""")


def _chromium(page: Path, user_data: Path, *flags: str) -> str:
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *flags, page.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _probe(page: Path, user_data: Path) -> dict:
    """Open a copy of the page beside it (same relative links) with PROBE appended; return what it measured."""
    copy = page.with_name(f"{page.stem}.probe.html")
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(copy, user_data, "--dump-dom")
    copy.unlink()
    match = re.search(r'data-probe="([^"]*)"', dom)
    assert match, "the probe did not run"
    return json.loads(match[1].replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def report(prepared_data, tmp_path_factory) -> Path:
    """validate's report on the session's generated data."""
    sizes = [f"{r}x{c}" for r, c in (scaled_size(rows, columns, 0.1) for rows, columns in IMAGE_SIZES)]
    out = tmp_path_factory.mktemp("validation") / "report"
    validate.run(stage_config_for("validate", allowed_sizes=sizes, min_images=8, min_patients=3, workers=1),
                 prepared_data.inbreast, prepared_data.manifest, out)
    return out


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium (Debian package chromium) not installed")
def test_data_docs_render_offline_in_chromium(report, tmp_path):
    site = report / "data_docs"
    pages = sorted(site.rglob("*.html"))
    assert len(pages) == 3  # index, the suite, the validation result
    for page in pages:
        assert not REMOTE_ASSET.search(page.read_text()), f"{page} still loads a remote asset"

    measured = _probe(site / "index.html", tmp_path / "profile-probe")
    # bootstrap-table (local JavaScript) filled the table; Bootstrap's CSS (local) styled the page.
    assert measured["rows"] == 1 and validate.SUITE_NAME in measured["text"], measured
    assert measured["width"] > 600 and measured["height"] > 80, measured
    assert "apple-system" in measured["font"], measured  # Bootstrap 4's font stack, not the browser default

    screenshot = tmp_path / "data_docs_offline.png"
    _chromium(site / "index.html", tmp_path / "profile-shot", f"--screenshot={screenshot}")
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    assert pixels.shape[:2] == (900, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a rendered page: text, logo, table borders

    # The validation page: its expectation tables carry Font Awesome's status icons, drawn from the copy.
    (result_page,) = (site / "validations").rglob("*.html")
    dom = _chromium(result_page, tmp_path / "profile-result", "--dump-dom")
    assert "birads_known" in dom and 'class="fas fa-check-circle' in dom


def test_every_file_the_pages_load_is_pinned_installed_and_packaged():
    """Each CDN URL maps to an installed file of the package version it names, shipped in the wheel."""
    lock = json.loads((data_docs.ASSETS_DIR / "package-lock.json").read_text())["packages"]
    for url, relative in data_docs.CDN_FILES.items():
        folder = "/".join(relative.split("/")[:2 if relative.startswith("@") else 1])
        version = lock[f"node_modules/{folder}"]["version"]
        # The URL names the exact version, or only its major (`vega@5`: the newest 5.x, which the lock pins).
        assert version in url or url.endswith(f"@{version.split('.')[0]}"), (url, version)
        assert (data_docs.NODE_MODULES / relative).is_file(), relative
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["mammoseg"]
    unpackaged = [f for f in data_docs.asset_files()
                  if not any(fnmatch.fnmatch(f"data_docs_assets/node_modules/{f}", p) for p in patterns)]
    assert not unpackaged, f"pyproject.toml package-data misses {unpackaged}"
    assert any(f.endswith(".woff2") for f in data_docs.asset_files())  # Font Awesome's fonts come along
