"""Data Docs that render offline: rewrites Great Expectations' HTML pages to load local copies of their CSS/JS.

Reads a Data Docs site as GX writes it and the npm packages installed beside this module
(`mammoseg/data_docs_assets/`: package.json names the versions GX's templates load, package-lock.json
pins them with integrity hashes; `npm ci --prefix mammoseg/data_docs_assets` installs them, and
scripts/venv.sh runs it). Writes the files the pages use into the site's `static/vendor/` (with the
fonts and images their stylesheets point to) and rewrites each page to load them from there, so the
report opens fully from a file, in a tarball or in MLflow's artifact view, with no network.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from mammoseg.errors import UserError

log = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).with_name("data_docs_assets")
NODE_MODULES = ASSETS_DIR / "node_modules"
VENDOR_DIR = "static/vendor"  # inside the site; GX's own static/ (styles, images) sits beside it
# What GX 1.x's templates (render/view/templates/*.j2) load from CDNs -> the same file of the npm
# package at the version the URL names. The CDNs serve those packages' files: bootstrap's and
# popper's SRI hashes match the npm files byte for byte (checked when a page pins one).
CDN_FILES: dict[str, str] = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap/dist/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap/dist/js/bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/dist/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.js/dist/umd/popper.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css":
        "bootstrap-table/dist/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js":
        "bootstrap-table/dist/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.js",
    # The templates take the filter-control stylesheet from 1.19.0 (and its script from 1.19.1):
    # package.json installs that release too, under an alias.
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table-1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table-1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker/dist/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker/dist/js/bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "@forevolve/bootstrap-dark/dist/css/bootstrap-prefers-dark.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "@fortawesome/fontawesome-free/css/all.min.css",
    # Major-version URLs: package.json pins the newest release of that major (the CDN's answer).
    "https://cdn.jsdelivr.net/npm/vega@5": "vega/build/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite/build/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed/build/vega-embed.min.js",
}
# The navbar's logo comes from GX's web-assets bucket; the site's own static/images holds the same file.
_REMOTE_LOGO = re.compile(r"https://great-expectations-web-assets\.s3\.[a-z0-9.-]+\.amazonaws\.com/"
                          r"(?P<name>[\w.-]+\.(?:png|svg))(?:\?[^\"']*)?")
_TAG = re.compile(r"<(?:script|link|img)\b[^>]*>", re.IGNORECASE)
_URL_ATTRIBUTE = re.compile(r"""\b(?P<attribute>src|href)\s*=\s*(?P<quote>["'])(?P<url>[^"']*)(?P=quote)""")
_INTEGRITY = re.compile(r"""\s+integrity\s*=\s*(["'])(?P<value>[^"']*)\1""")
_CROSSORIGIN = re.compile(r"""\s+crossorigin(?:\s*=\s*(["'])[^"']*\1)?""")
_CSS_URL = re.compile(r"""url\(\s*(["']?)(?P<url>[^"')]+)\1\s*\)""")


def asset_files() -> list[str]:
    """Return every file (relative to node_modules) a site's pages may load: the CDN files and what their CSS uses."""
    files: set[str] = set()
    for relative in CDN_FILES.values():
        files.add(relative)
        if relative.endswith(".css") and (NODE_MODULES / relative).is_file():
            files.update(_stylesheet_files(relative))
    return sorted(files)


def _stylesheet_files(relative: str) -> set[str]:
    """Local files a stylesheet in node_modules refers to with url(...) (fonts, images), relative to node_modules."""
    text = (NODE_MODULES / relative).read_text(encoding="utf-8", errors="replace")
    found = set()
    for match in _CSS_URL.finditer(text):
        url = match["url"].split("#")[0].split("?")[0]
        if not url or ":" in url or url.startswith("/"):
            continue  # data: URIs, absolute URLs: nothing to copy
        target = os.path.normpath(os.path.join(os.path.dirname(relative), url))
        if (NODE_MODULES / target).is_file():
            found.add(Path(target).as_posix())
    return found


def _require_assets() -> None:
    """Check the npm packages are installed.

    Raises:
        UserError: a file the pages load is missing (the packages were never installed).
    """
    missing = [relative for relative in CDN_FILES.values() if not (NODE_MODULES / relative).is_file()]
    if missing:
        raise UserError(f"{NODE_MODULES / missing[0]}: Data Docs asset missing ({len(missing)} of "
                        f"{len(CDN_FILES)}); install them with `npm ci --prefix {ASSETS_DIR}` (scripts/venv.sh does)")


def _sri_matches(path: Path, integrity: str) -> bool:
    """Tell whether a file has one of the Subresource Integrity hashes listed (sha256/384/512-base64)."""
    for token in integrity.split():
        algorithm, _, expected = token.partition("-")
        if algorithm in ("sha256", "sha384", "sha512"):
            actual = base64.b64encode(hashlib.new(algorithm, path.read_bytes()).digest()).decode()
            if actual == expected:
                return True
    return False


def make_offline(site: Path) -> list[str]:
    """Copy the pages' CSS/JS into the site and point every page at the copies.

    A rewritten tag loses `integrity` and `crossorigin`: a browser refuses CORS mode for file://
    URLs, so the check is done here instead (the local file must have the hash the page pinned).

    Args:
        site: the Data Docs folder GX built (index.html, validations/, expectations/, static/).

    Returns:
        The remote URLs of scripts, stylesheets or images left in the pages (none with the GX
        version the lock was made for; a newer GX may add some, which are logged as warnings).

    Raises:
        UserError: the npm packages are not installed, or a file differs from the hash a page pins.
    """
    _require_assets()
    vendor = site / VENDOR_DIR
    for relative in asset_files():
        target = vendor / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(NODE_MODULES / relative, target)
    remaining: set[str] = set()
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        rewritten = _TAG.sub(lambda tag, page=page: _local_tag(tag[0], page, site, remaining), text)
        if rewritten != text:
            page.write_text(rewritten, encoding="utf-8")
    for url in sorted(remaining):
        log.warning("Data Docs page still loads %s (no local copy): it needs a network", url)
    return sorted(remaining)


def _local_tag(tag: str, page: Path, site: Path, remaining: set[str]) -> str:
    """Return a script/link/img tag with its CDN URL replaced by the local copy's relative path."""
    match = _URL_ATTRIBUTE.search(tag)
    if match is None or not match["url"].startswith(("http://", "https://", "//")):
        return tag
    url = match["url"]
    if url in CDN_FILES:
        local = site / VENDOR_DIR / CDN_FILES[url]
        integrity = _INTEGRITY.search(tag)
        if integrity is not None and not _sri_matches(local, integrity["value"]):
            raise UserError(f"{NODE_MODULES / CDN_FILES[url]}: differs from the file {url} pins by integrity hash; "
                            f"reinstall with `npm ci --prefix {ASSETS_DIR}`")
        tag = _CROSSORIGIN.sub("", _INTEGRITY.sub("", tag))
    elif (logo := _REMOTE_LOGO.fullmatch(url)) and (site / "static" / "images" / logo["name"]).is_file():
        local = site / "static" / "images" / logo["name"]
    else:
        if tag.lower().startswith(("<script", "<img")) or "stylesheet" in tag.lower():
            remaining.add(url)  # a plain <a>-like <link> (e.g. a canonical URL) needs no network to render
        return tag
    relative = Path(os.path.relpath(local, page.parent)).as_posix()
    return _URL_ATTRIBUTE.sub(lambda m: f"{m['attribute']}={m['quote']}{relative}{m['quote']}", tag, count=1)
